"""The stream: epoch plans, partner policies and the `MidasDataset` IterableDataset.

- `epoch_plan`: pure functions of (seed, epoch): order, batches per rank and worker, partners.
- `dataset`: `MidasDataset` and `MidasLoader`.
"""

from midas_data.stream.dataset import MidasDataset, MidasLoader, collate, materialize_misaligned

__all__ = ["MidasDataset", "MidasLoader", "collate", "materialize_misaligned"]
