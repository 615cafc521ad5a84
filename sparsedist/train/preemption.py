"""Preemption: SIGTERM or SIGUSR1 stops a run after a step that every rank agrees on.

The signal handler only records the signal. Every `AGREEMENT_INTERVAL` steps (`due`) every rank
calls `Preemption.agreed()`, an all-reduce MAX of one scalar, so a signal that reached any rank
stops all of them after the same step; the trainer then checkpoints that step, marks the
MLflow run KILLED and returns, and the process exits 0 with a resumable checkpoint.

Why not after every step: the decision is read back to the host, and a read-back waits for the
device to drain its queue. Once per optimizer step that cost is already spent on the gradient
norm (the non-finite skip); a second read every step would be a second stall. At an interval
the run stops at most `AGREEMENT_INTERVAL - 1` steps later than it could (Slurm's
`--signal-seconds` must leave room for them and a checkpoint: docs/cluster.md).
`sparsedist launch` forwards both signals to its ranks as SIGUSR1, once this handler is installed.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
AGREEMENT_INTERVAL = 10
"""Steps between agreements: one read-back per 10 steps, a stop at most 9 steps after the signal."""


class Preemption:
    """Records SIGTERM/SIGUSR1 from construction on; `agreed()` is the collective decision."""

    def __init__(self, device: torch.device, interval: int = AGREEMENT_INTERVAL):
        self.device = device
        self.interval = interval
        self.received = 0  # the last signal's number, 0 when none
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for sig in SIGNALS:
                signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def due(self, done: int) -> bool:
        """Whether the ranks agree after `done` steps (the same answer on every rank: it depends on `done` only)."""
        return done % self.interval == 0

    def agreed(self) -> int:
        """The signal any rank received (0: none). A collective: every rank calls it after the same step (one
        where `due`); it reads one scalar back to the host."""
        flag = torch.tensor([self.received], dtype=torch.int32, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
