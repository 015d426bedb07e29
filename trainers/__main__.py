"""`python -m midas_data.trainers DATASET OUT [options]` (also works under torchrun)."""

from midas_data.trainers.run import main

if __name__ == "__main__":
    main()
