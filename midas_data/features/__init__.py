"""Per-modality features and unimodal confidences (`midas-data extract`).

- `encoders`: reference encoders (MLP, small CNN, ResNet-18) and their registry.
- `extract`: warm-up unimodal models, or features the user brings.
- `probe`: cross-fitted linear-probe confidences for user features.
- `tables`: the features Arrow tables and their fingerprints.
"""
