"""N:M sparsity: mask primitives, the sparse linear layer and the training methods."""

from sparsedist.sparsity.layer import SparseLinear
from sparsedist.sparsity.masks import count_flips, mask_digest, nm_mask, pack_mask, unpack_mask
from sparsedist.sparsity.methods import METHODS, SparsityMethod, make_method

__all__ = [
    "METHODS",
    "SparseLinear",
    "SparsityMethod",
    "count_flips",
    "make_method",
    "mask_digest",
    "nm_mask",
    "pack_mask",
    "unpack_mask",
]
