"""The optimizer (--optimizer) and its step, which skips itself where the gradient is not finite.

Skipping a step whose loss or gradient is NaN or infinite needs the gradient norm, which the GPU
computes at the end of the backward pass. Reading it before stepping made the host wait for the GPU
every step, and the GPU then wait while the host launched the next step's first kernels (the optimizer,
the data, the transformer's prologue): a kernel profile of the 0.30 s fp8 step at 1024 px on an H200
found the GPU idle for ~15 ms of it (bench/RESULTS.md, session 11). `SkippingStep` decides on the GPU
instead: it keeps a copy of the parameters and optimizer state, steps, and puts the copy back where the
norm is not finite. The host reads the outcome a step later, once the GPU is past it, and then steps the
LR schedule (or takes back the optimizer's step count of a skipped step), before the next update. The
copy lives only during the step: 0.4 GB for FLUX's default LoRA with AdamW8bit (the fp8 1024 px step's
peak rose 0.6 GiB).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .config import TrainConfig
from .metrics import HostCopy


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.adam_weight_decay,
                                   eps=cfg.adam_epsilon)
    if cfg.optimizer == "prodigy":
        import prodigyopt
        return prodigyopt.Prodigy(params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.adam_weight_decay,
                                  eps=cfg.adam_epsilon)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.adam_weight_decay,
                             eps=cfg.adam_epsilon)


@contextlib.contextmanager
def without_bitsandbytes_sync(device: torch.device) -> Iterator[None]:
    """bitsandbytes' optimizers (0.50) call torch.cuda.synchronize() after each parameter's update. Their
    kernels run on the legacy default stream: where torch's current stream is that one too, the update is
    ordered with what follows without it (bitsandbytes PR 2050 drops it for non-paged CUDA optimizers)."""
    import bitsandbytes.optim.optimizer as bnb_optimizer

    if device.type != "cuda" or torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
        yield
        return
    real = bnb_optimizer.sync_gpu
    bnb_optimizer.sync_gpu = lambda tensor: None
    try:
        yield
    finally:
        bnb_optimizer.sync_gpu = real


@dataclass
class Outcome:
    """An optimizer step as the host learns it: applied or skipped, and the gradient norm."""
    step: int
    applied: bool
    grad_norm: float


class SkippingStep:
    """optimizer.step() and scheduler.step() for each optimizer step, skipped where its gradient norm is
    not finite. Call `step` after the gradients are ready; `settle` returns the outcomes of the steps
    taken since the last call, and must run before the next `step` (it steps the schedule) and before
    the optimizer or schedule state is saved.

    On the GPU (`defer`), a step decides there and the host learns of it at `settle`: place that call
    where the GPU is busy with later work, and it does not wait. Otherwise (Prodigy, whose step-size
    estimate lives in Python floats; FSDP's sharded tensors; fp16's gradient scaler, which reads the
    gradients itself; an optimizer without state yet, before its first step) the host reads the norm
    first, as diffusers-style loops do.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 params: list[torch.Tensor], defer: bool):
        self.optimizer, self.scheduler, self.params, self.defer = optimizer, scheduler, params, defer
        bnb = type(getattr(optimizer, "optimizer", optimizer)).__module__.startswith("bitsandbytes")  # accelerate wraps
        self._no_sync = (lambda: without_bitsandbytes_sync(params[0].device)) if bnb else contextlib.nullcontext
        self.pending: list[tuple[int, HostCopy]] = []  # (step, its finite flag and gradient norm)
        self.settled: list[Outcome] = []

    def step(self, grad_norm: torch.Tensor, step: int) -> None:
        """Apply the optimizer step numbered `step` unless `grad_norm` [] is NaN or infinite."""
        tensors = self._state_tensors() if self.defer else None
        if tensors is None:  # decided on the host, now
            norm = grad_norm.item()
            if math.isfinite(norm):
                self._optimizer_step()
                self.scheduler.step()
            self.settled.append(Outcome(step, math.isfinite(norm), norm))
            return
        finite = torch.isfinite(grad_norm)
        saved = [t.clone() for t in tensors]
        self._optimizer_step()
        with torch.no_grad():
            for tensor, old in zip(tensors, saved):
                torch.where(finite, tensor, old, out=tensor)  # in place: no third copy of the state
        self.pending.append((step, HostCopy(finite, grad_norm.float())))

    def settle(self) -> list[Outcome]:
        """The outcomes of the steps since the last call, in order; steps the schedule for each applied
        one, and takes back the optimizer's step count of each skipped one."""
        for step, copy in self.pending:
            finite, grad_norm = copy.get()
            if finite:
                self.scheduler.step()
            else:
                self._uncount()
            self.settled.append(Outcome(step, bool(finite), float(grad_norm)))
        outcomes, self.pending, self.settled = self.settled, [], []
        return outcomes

    def _optimizer_step(self) -> None:
        with self._no_sync():
            self.optimizer.step()

    def _state_tensors(self) -> list[torch.Tensor] | None:
        """The parameters and the optimizer's state tensors (not its step counts), or None while some
        parameter has no state yet (its first step creates it)."""
        tensors = list(self.params)
        for param in self.params:
            state = self.optimizer.state.get(param)
            if not state:
                return None
            tensors += [value for key, value in state.items() if key != "step" and isinstance(value, torch.Tensor)]
        return tensors

    def _uncount(self) -> None:
        """Undo the step count a skipped step added (AdamW's bias correction reads it)."""
        for param in self.params:
            state = self.optimizer.state[param]
            if "step" in state:
                state["step"] -= 1
