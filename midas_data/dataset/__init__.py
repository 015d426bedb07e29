"""The on-disk dataset format: payload encodings, the manifest, sharding, reading, verifying.

- `formats`: encoding and bounded, pickle-free decoding of payloads (.npy, .png, .wav, text).
- `manifest`: manifest.json (schema, classes, splits, shards with sha256, fingerprint).
- `split`: the stratified train/val/test split.
- `shards`: `build_dataset`, which writes WebDataset tars plus Arrow offset indexes.
- `reader`: `open_dataset` and `SplitReader`, random access by byte offset.
- `verify`: full verification of shards against the manifest and the index.
- `inspect`: the text report of `midas-data inspect`.
"""
