"""Mining misaligned partners (`midas-data mine-misaligned`).

- `knn`: exact (and IVF) k-NN with a guaranteed different label, per class.
- `pairs`: the pairs table (schema, writing, reading, validation).
- `stage`: the stage itself: features in, pairs parts out, with reports.
"""
