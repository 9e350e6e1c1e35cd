"""Stopping a run cleanly before the scheduler kills it, as Megatron-LM does.

``--exit-signal-handler``: SIGTERM (what SLURM sends at the walltime, or on preemption, some
seconds before SIGKILL) only sets a flag; the loop finishes the iteration it is in, saves a
checkpoint and exits 0. ``--exit-duration-in-mins``: the same once the wall time since the
trainer started exceeds the budget, for jobs that would rather stop than be signalled.

Every rank installs the handler, but the signal may reach the ranks at different moments (or
only some of them), so the decision is all-reduced (max) after every iteration: all ranks stop
at the same iteration and save one consistent checkpoint, and none waits forever in the next
iteration's collectives for a rank that left.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Optional

import torch
import torch.distributed as dist

from megatron_prior import parallel


class EarlyExit:
    """The stop conditions of one run; ``install`` at start-up, ``release`` at the end."""

    def __init__(self, on_sigterm: bool, duration_mins: Optional[float]) -> None:
        self.on_sigterm = on_sigterm
        self.duration_mins = duration_mins
        self.started = time.monotonic()
        self._received = False
        self._previous = None

    def install(self) -> None:
        if self.on_sigterm:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def release(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        # Nothing else here: the handler runs between two bytecodes of whatever the loop is doing.
        self._received = True

    def reason(self) -> Optional[str]:
        """Why every rank should stop now, or None. A collective: call it on every rank."""
        if not self.on_sigterm and self.duration_mins is None:
            return None
        minutes = (time.monotonic() - self.started) / 60.0
        over = self.duration_mins is not None and minutes > self.duration_mins
        flags = torch.tensor([int(self._received), int(over)], dtype=torch.int32, device=parallel.device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        received, over = (bool(v) for v in flags.tolist())
        if received:
            return "SIGTERM received (--exit-signal-handler)"
        if over:
            return f"wall time over --exit-duration-in-mins {self.duration_mins:g} on some rank"
        return None
