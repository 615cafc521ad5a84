"""Validation loss and perplexity, reduced over ranks so they do not depend on the world size."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsedist.parallel.backend import ParallelBackend
from sparsedist.train.losses import lm_loss


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
             backend: ParallelBackend) -> dict[str, float]:
    """Token-weighted mean loss over this rank's batches and every other rank's, and its perplexity."""
    device = backend.runtime.device
    was_training = model.training
    model.eval()
    loss_sum = tokens = 0.0
    for inputs, labels in batches:
        with backend.autocast():
            logits = model(input_ids=inputs.to(device), use_cache=False).logits
        loss_sum += float(lm_loss(logits, labels.to(device))) * labels.numel()
        tokens += labels.numel()
    model.train(was_training)
    backend.after_eval(model)
    loss_sum, tokens = backend.all_reduce_sum([loss_sum, tokens])
    loss = loss_sum / tokens
    return {"val_loss": loss, "val_ppl": math.exp(loss)}
