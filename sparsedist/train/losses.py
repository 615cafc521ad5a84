"""Training losses: next-token cross-entropy and logit distillation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparsedist.config.schema import DistillConfig


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (labels are already shifted), computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


KL_CHUNK_TOKENS = 1024


@dataclass
class TopK:
    """A teacher's k most likely tokens per position, [..., k]: their log-probabilities at the
    distillation temperature (fp32) and vocabulary indices. With k = vocabulary it is the whole
    distribution; with fewer, the KL misses the teacher's tail (its probability mass outside the k)."""

    logprobs: torch.Tensor
    indices: torch.Tensor


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")


def _topk_kl_sum(student: torch.Tensor, logprobs: torch.Tensor, indices: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1).gather(-1, indices.long())
    return (logprobs.exp() * (logprobs - log_p_student)).sum()


def distill_kl(student: torch.Tensor, teacher: torch.Tensor | TopK, temperature: float,
               chunk: int = KL_CHUNK_TOKENS) -> torch.Tensor:
    """KL(teacher ‖ student) at temperature T, summed over the vocabulary (or the teacher's top k),
    mean over tokens, times T².

    Computed `chunk` tokens at a time under activation checkpointing, so the fp32
    log-probabilities of at most one chunk exist at once, in the forward and the backward.
    """
    student = student.flatten(0, 1)
    if isinstance(teacher, TopK):
        parts = zip(student.split(chunk), teacher.logprobs.flatten(0, 1).split(chunk),
                    teacher.indices.flatten(0, 1).split(chunk), strict=True)
        total = sum(checkpoint(_topk_kl_sum, s, lp, ix, temperature, use_reentrant=False) for s, lp, ix in parts)
    else:
        total = sum(
            checkpoint(_kl_sum, s, t, temperature, use_reentrant=False)
            for s, t in zip(student.split(chunk), teacher.flatten(0, 1).split(chunk), strict=True)
        )
    return total / student.shape[0] * temperature**2


def training_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | TopK | None, cfg: DistillConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """weight·KL + (1−weight)·CE with a teacher, plain CE without; and the parts for logging, as detached 0-d
    tensors on the loss's device (read back only where a step is logged: no synchronisation here)."""
    ce = lm_loss(logits, labels)
    if teacher_logits is None:
        return ce, {"ce": ce.detach()}
    kl = distill_kl(logits, teacher_logits, cfg.temperature)
    return cfg.weight * kl + (1 - cfg.weight) * ce, {"ce": ce.detach(), "kd": kl.detach()}
