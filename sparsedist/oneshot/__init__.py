"""One-shot N:M pruning baselines: magnitude, Wanda, SparseGPT and ALPS, calibrated block by block.

`prune_oneshot` prunes a model; the per-layer criteria live in `scores` (magnitude, Wanda),
`sparsegpt` and `alps`.
"""

from sparsedist.oneshot.calibration import calibration_batches
from sparsedist.oneshot.prune import METHODS, OneShotMethod, prune_oneshot

__all__ = ["METHODS", "OneShotMethod", "calibration_batches", "prune_oneshot"]
