"""optim.SkippingStep: a non-finite step leaves no trace, decided without the host reading the gradient norm."""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from fluxlora.optim import SkippingStep

OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adamw8bit": lambda params: bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.1),
}


def run(name: str, grads: list[torch.Tensor], defer: bool | None, device: str = "cpu") -> tuple:
    """Optimizer steps over `grads` (one [8192] gradient each) through SkippingStep, or plain steps when
    `defer` is None; a warm-up schedule, so that a schedule that advanced too far shows in the LR.
    Returns the parameter, the optimizer state, the LR and the outcomes."""
    param = torch.nn.Parameter(torch.linspace(-1, 1, 8192, device=device))
    optimizer = OPTIMIZERS[name]([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    updates = SkippingStep(optimizer, scheduler, [param], defer=bool(defer))
    outcomes = []
    for step, grad in enumerate(grads, start=1):
        param.grad = grad.to(device)
        if defer is None:
            optimizer.step()
            scheduler.step()
        else:
            outcomes += updates.settle()  # where the trainer reads them: before the next update
            updates.step(param.grad.norm(), step)
    outcomes += updates.settle()
    state = {key: value.clone() if isinstance(value, torch.Tensor) else value
             for key, value in optimizer.state[param].items()}
    return param.detach().clone(), state, scheduler.get_last_lr(), outcomes


def assert_same(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        same = torch.equal(a[1][key], b[1][key]) if isinstance(a[1][key], torch.Tensor) else a[1][key] == b[1][key]
        assert same, key
    assert a[2] == b[2]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("defer", [True, False], ids=["on_the_device", "on_the_host"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_non_finite_step_leaves_parameters_state_count_and_schedule_as_they_were(name, defer, device):
    """Steps 1, 2, 4, 5 finite; step 3 NaN, or infinite at step 5 in another run. The result is the
    optimizer's over the finite gradients alone: the same parameter, moments and step count to the bit,
    and the schedule advanced only by applied steps. On CUDA, AdamW8bit steps without bitsandbytes'
    synchronisation and the outcome comes back through pinned memory."""
    torch.manual_seed(0)
    good = [torch.randn(8192) for _ in range(4)]
    for bad, position in ((torch.full((8192,), float("nan")), 2), (torch.full((8192,), float("inf")), 4)):
        grads = good[:position] + [bad] + good[position:]
        skipping = run(name, grads, defer, device)
        assert_same(skipping, run(name, good, None, device))
        assert [(o.step, o.applied) for o in skipping[3]] == [(s, s != position + 1) for s in range(1, 6)]
        assert all(o.grad_norm == pytest.approx(g.norm().item()) for o, g in zip(skipping[3], grads) if o.applied)


def test_on_the_device_the_host_reads_nothing_until_settle(monkeypatch):
    """The decision stays on the device: stepping reads no tensor on the host (on a GPU, each read waits
    for the GPU to finish the backward pass); settle does. With AdamW8bit, the default optimizer, whose
    step count is a Python int (torch's AdamW reads its own count, a CPU tensor)."""
    param = torch.nn.Parameter(torch.ones(8192))
    optimizer = OPTIMIZERS["adamw8bit"]([param])
    updates = SkippingStep(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), [param],
                           defer=True)
    param.grad = torch.ones(8192)
    updates.step(param.grad.norm(), 1)  # the first step creates the state: decided on the host
    assert [o.applied for o in updates.settle()] == [True]

    def no_host_read(*args):
        raise AssertionError("read on the host")

    with monkeypatch.context() as patch:
        for method in ("item", "__bool__", "__float__", "tolist"):
            patch.setattr(torch.Tensor, method, no_host_read)
        param.grad = torch.full((8192,), float("nan"))
        updates.step(param.grad.norm(), 2)
    assert [(o.step, o.applied) for o in updates.settle()] == [(2, False)]
    assert torch.isfinite(param).all()
