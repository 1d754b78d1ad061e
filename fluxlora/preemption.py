"""Stopping cleanly on SIGTERM, SIGINT and SIGUSR1 (what SLURM sends before a time limit).

The handler only records the request; the training loop checks it between optimizer steps, saves a
resumable checkpoint and exits with `EXIT_PREEMPTED`, so a wrapper (or SLURM's requeue) knows to
start again with `--resume_from_checkpoint latest`. A second signal of the same kind is not caught
again: the process then dies as it would without us.
"""
from __future__ import annotations

import signal
from types import FrameType

import torch
from accelerate import Accelerator

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; the checkpoint to resume from is on disk
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """Records stop signals; `agreed()` makes every process see a signal that reached any of them."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # Repeats are ignored: launchers (torchrun, srun) forward the signal a process group already
        # got, and a second one must not kill the checkpoint being written. SIGKILL still stops it.
        self.signal = self.signal or signum

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every process if any process was signalled (one all-reduce with several processes)."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        flag = torch.tensor(float(self.signal is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
