"""One optimizer step in the order every run takes it: the method's `begin`, the forward and backward of each
micro-batch, the backend's reduced, clipped update (with the method's `update` on the gradients), the
method's `end`, then the forms of W̃ the micro-batches shared released (sparsity/product.py). The trainer
and the step-time benchmark both take steps through it."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from sparsedist.parallel.backend import ParallelBackend
from sparsedist.sparsity.product import release_weight_forms
from sparsedist.student import Student

LossOf = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""(micro-batch index, inputs, labels) -> (loss tensor, its parts as 0-d tensors), under the backend's autocast."""


def optimizer_step(step: int, student: Student, backend: ParallelBackend,
                   micro_batches: list[tuple[torch.Tensor, torch.Tensor]] | Iterable, loss_of: LossOf,
                   max_norm: float | None) -> tuple[float, dict[str, torch.Tensor]]:
    """Take optimizer step `step` (0-based) over this rank's micro-batches; returns the gradient norm before
    clipping (non-finite: the update was skipped) and the mean of the loss and its parts.

    The means are accumulated on the device as 0-d float64 tensors (the sums the host made before): reading
    a loss back per micro-batch would stall the host on the device every time. The gradient norm is the step's
    one read-back (the backend's)."""
    student.method.begin(step)
    micro_batches = list(micro_batches)
    parts_sum: dict[str, torch.Tensor] = {}
    for i, (inputs, labels) in enumerate(micro_batches):
        inputs, labels = inputs.to(backend.runtime.device), labels.to(backend.runtime.device)
        with backend.autocast():
            loss, parts = loss_of(i, inputs, labels)
        backend.backward(student.model, loss / len(micro_batches), last=i == len(micro_batches) - 1)
        for key, value in {"loss": loss.detach(), **parts}.items():
            share = torch.as_tensor(value, device=backend.runtime.device).double() / len(micro_batches)
            parts_sum[key] = parts_sum[key] + share if key in parts_sum else share
    grad_norm = backend.step(student.model, student.optimizer, max_norm, step, student.method)
    student.method.end(step)
    release_weight_forms(student.model)
    return grad_norm, parts_sum
