"""The MIDAS objective as pure torch functions.

- `terms`: confidences, soft labels, modality and hard-sample weights, the alpha rule.
- `batch`: the same terms taken straight from a stream batch, for a user's own model.
- `alpha`: the authors' per-batch alpha step (the pooled once-per-epoch step is in `terms`).
"""

from midas_data.loss.alpha import (
    DirectionSums,
    authors_alpha_step,
    authors_alpha_update,
    authors_batch_ratios,
    direction_sums,
)
from midas_data.loss.batch import (
    aligned_loss,
    batch_alpha_stats,
    batch_misaligned_loss,
    misaligned_targets,
)
from midas_data.loss.terms import *  # noqa: F403  (the pure functions, listed in terms.__all__)
from midas_data.loss.terms import __all__ as _terms_all

__all__ = [*_terms_all, "DirectionSums", "authors_alpha_step", "authors_alpha_update",
           "authors_batch_ratios", "direction_sums", "aligned_loss", "batch_alpha_stats", "batch_misaligned_loss", "misaligned_targets"]
