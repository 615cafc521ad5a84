"""Triton kernels of sparsedist's sparse paths, importable as `sparsedist_kernels`.

Each kernel has a torch reference in `sparsedist.sparsity` (the specification, and the
path on devices without Triton); the kernels match their masks bit for bit and their values
within the tolerance their docstrings state. On a machine without a GPU they run under
`TRITON_INTERPRET=1` (slow: tests use small shapes).
"""

import importlib

_KERNELS = {"geglu": "gated", "swiglu": "gated", "masked_decay_": "masks", "nm_prune": "masks",
            "transposable_mask_bits": "masks", "mvue24": "mvue", "soft_threshold": "soft_threshold"}


def __getattr__(name: str):
    """`from sparsedist_kernels import mvue24`: the kernel, its module (and Triton) imported on first use."""
    if name not in _KERNELS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_KERNELS[name]}"), name)
