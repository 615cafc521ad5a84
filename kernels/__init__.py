"""Triton kernels of sparsedist's sparse paths, importable as `sparsedist_kernels`.

Each kernel has a torch reference in `sparsedist.sparsity` (the specification, and the
path on devices without Triton); the kernels match their masks bit for bit and their values
within the tolerance their docstrings state. On a machine without a GPU they run under
`TRITON_INTERPRET=1` (slow: tests use small shapes).
"""
