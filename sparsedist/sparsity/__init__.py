"""N:M sparsity: mask primitives, the sparse linear layer and the training methods."""

from sparsedist.sparsity.layer import SparseLinear
from sparsedist.sparsity.masks import count_flips, flip_rate, mask_digest, nm_mask, pack_mask, unpack_mask
from sparsedist.sparsity.methods import METHODS, SparsityMethod, make_method
from sparsedist.sparsity.mvue import mvue24, mvue24_inclusion_probabilities
from sparsedist.sparsity.soft_threshold import soft_threshold, soft_threshold_scale, soft_threshold_scale_terms
from sparsedist.sparsity.transposable import TRANSPOSABLE_PATTERNS, transposable_mask

__all__ = [
    "METHODS",
    "TRANSPOSABLE_PATTERNS",
    "SparseLinear",
    "SparsityMethod",
    "count_flips",
    "flip_rate",
    "make_method",
    "mask_digest",
    "mvue24",
    "mvue24_inclusion_probabilities",
    "nm_mask",
    "pack_mask",
    "soft_threshold",
    "soft_threshold_scale",
    "soft_threshold_scale_terms",
    "transposable_mask",
    "unpack_mask",
]
