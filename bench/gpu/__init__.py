"""The one-shot GPU check (`bench/gpu_check.py`), one module per concern.

- `harness`: the checkout on sys.path, JSON that survives a kill (`Report`), each part in
  its own process group under a hard time budget (`run_part`), the machine's description.
- `sampler`: GPU utilisation every 0.5 s from a separate process (pynvml, else nvidia-smi).
- `exactness`: the float64 oracle in torch and the checks of a k-NN result against it.
- `mining`: parts `mine` (1M x 512, ours vs an unconstrained search in the same run) and
  `mine_big` (10M x 128, as far as the budget goes).
- `fixture`: the CREMA-D-sized dataset, written once and reused.
- `training`: part `train` (stream alone, compute alone, Joint and MIDAS end to end).
- `extract_warmup`: part `extract` (the `extract` stage's warm-up on the GPU).
"""
