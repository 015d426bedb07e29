"""The MIDAS objective as pure torch functions.

- `terms`: confidences, soft labels, modality and hard-sample weights, the alpha rule.
- `batch`: the same terms taken straight from a stream batch, for a user's own model.
"""

from midas_data.loss.batch import (
    aligned_loss,
    batch_alpha_stats,
    batch_misaligned_loss,
    misaligned_targets,
)
from midas_data.loss.terms import *  # noqa: F403  (the pure functions, listed in terms.__all__)
from midas_data.loss.terms import __all__ as _terms_all

__all__ = [*_terms_all, "aligned_loss", "batch_alpha_stats", "batch_misaligned_loss", "misaligned_targets"]
