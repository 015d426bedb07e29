"""The stream: epoch plans, partner policies and the `MidasDataset` IterableDataset.

- `epoch_plan`: pure functions of (seed, epoch): order, batches per rank and worker, partners.
- `partners`: the partner policies (a name-keyed table), their options and their one check.
- `knn_graph`: the mined k-NN graph that the paired research policies match on.
- `dataset`: `MidasDataset` (reading, batch assembly, resume state) and `MidasLoader`.
"""

from midas_data.stream.dataset import MidasDataset, MidasLoader, collate, materialize_misaligned

__all__ = ["MidasDataset", "MidasLoader", "collate", "materialize_misaligned"]
