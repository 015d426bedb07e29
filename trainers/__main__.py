"""`python -m trainers DATASET OUT [options]` (also works under torchrun)."""

from trainers.run import main

if __name__ == "__main__":
    main()
