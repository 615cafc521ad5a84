"""Adam whose second moment and step use a modified first moment: AST's optimizer and CAST's AdamS.

For every parameter, with g its gradient and t its step count:

    m ← β₁m + (1−β₁)g              the stored buffer: the raw gradient EMA, never overwritten
    u = modify(param, W, m, t)      AST: m + λ(t)(1−M)⊙W;  CAST: (1−α_t)m + α_t·λ·sign(W) where M = 0
    v ← β₂v + (1−β₂)u²              from u, for every parameter (dense ones have u = m)
    W ← W(1−γ·wd) − γ·(u/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)

t counts the updates this optimizer has made (a step skipped for non-finite gradients is not
one; a checkpoint restores it), so the schedules of `modify` need no step from outside. It is
kept as a Python int beside the `step` state tensor (which checkpoints save), and read from that
tensor only once after it is created elsewhere or written by a load: a step reads nothing back.
Because v is built from the smoothed u rather than from g², steps are larger than
AdamW's at the same learning rate (about 2.5× on the tiny models): recipes lower lr.
All arithmetic runs on each rank's local values (rows under FSDP2, a flat partition under
ZeRO), element-wise and in place, in chunks of CHUNK elements: u and the denominator go to
two scratch chunks allocated once per step, so the update's temporaries stay small and few
whatever the tensors. The state tensors are shaped like the parameters (DTensors under
FSDP2) so checkpoints reshard them like the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Local = Callable[[torch.Tensor], torch.Tensor]
Modify = Callable[[torch.Tensor, slice, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(parameter, chunk of its flattened local values, W and m of that chunk, scratch of its size, 0-based index
t − 1 of this update) -> u of that chunk: m itself, or the scratch holding u."""
CHUNK = 1 << 20


class MomentAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 local: Local, modify: Modify):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.local = local
        self.modify = modify
        self._counts: dict[torch.Tensor, tuple[torch.Tensor, int, int]] = {}
        """Per parameter: (its `step` state tensor, that tensor's version, its value) as last seen here."""

    @torch.no_grad()
    def init_state(self) -> None:
        """Create zero moments for every parameter without a step (checkpoint loaders call it:
        DCP would otherwise take a zero-gradient step, which `modify` must not see)."""
        for group in self.param_groups:
            for param in group["params"]:
                self._state(param)

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            self._counts[param] = (state["step"], state["step"]._version, 0)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        return state

    def _count(self, param: torch.Tensor, step: torch.Tensor) -> int:
        """Updates made to `param`, as a Python int: read from its `step` tensor only where that tensor is new or
        was written elsewhere (a checkpoint load), so a step reads no tensor back (on the CPU any read counts)."""
        seen = self._counts.get(param)
        if seen is not None and seen[0] is step and seen[1] == step._version:
            return seen[2]
        return int(step.item())

    @torch.no_grad()
    def step(self, closure=None):
        largest = max((self.local(p).numel() for group in self.param_groups for p in group["params"]), default=0)
        scratches: dict[torch.dtype, torch.Tensor] = {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state(param)
                t = self._count(param, state["step"]) + 1
                state["step"].fill_(t)  # the tensor checkpoints save and load
                self._counts[param] = (state["step"], state["step"]._version, t)
                w, g = self.local(param).view(-1), self.local(param.grad).view(-1)
                m, v = self.local(state["exp_avg"]).view(-1), self.local(state["exp_avg_sq"]).view(-1)
                scratch = scratches.get(w.dtype)
                if scratch is None:
                    scratch = scratches[w.dtype] = w.new_empty(2, min(CHUNK, largest))
                for start in range(0, w.numel(), CHUNK):
                    part = slice(start, start + CHUNK)
                    n = w[part].numel()
                    m[part].lerp_(g[part], 1 - beta1)
                    u = self.modify(param, part, w[part], m[part], scratch[0, :n], t - 1)
                    v[part].mul_(beta2).addcmul_(u, u, value=1 - beta2)
                    denom = torch.sqrt(v[part], out=scratch[1, :n]).div_(math.sqrt(1 - beta2**t)).add_(eps)
                    w[part].mul_(1 - lr * wd).addcdiv_(u, denom, value=-lr / (1 - beta1**t))
        return None
