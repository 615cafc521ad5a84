"""Preemption: SIGTERM or SIGUSR1 stops a run after a step that every rank agrees on.

The signal handler only records the signal. At each step boundary every rank calls
`Preemption.agreed()`, an all-reduce MAX of one scalar, so a signal that reached any rank
stops all of them after the same step; the trainer then checkpoints that step, marks the
MLflow run KILLED and returns, and the process exits 0 with a resumable checkpoint.
`sparsedist launch` forwards both signals to its ranks as SIGUSR1, once this handler is installed.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Records SIGTERM/SIGUSR1 from construction on; `agreed()` is the collective decision."""

    def __init__(self, device: torch.device):
        self.device = device
        self.received = 0  # the last signal's number, 0 when none
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for sig in SIGNALS:
                signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def agreed(self) -> int:
        """The signal any rank received (0: none). A collective: every rank calls it after the same step."""
        flag = torch.tensor([self.received], dtype=torch.int32, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
