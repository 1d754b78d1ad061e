"""Faults: pre-emption signals, kill -9 at any moment, full disks, non-finite losses."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fluxlora import flow
from fluxlora.checkpoint import COMPLETE, CheckpointError, complete_checkpoints, resolve_checkpoint
from fluxlora.config import TrainConfig
from fluxlora.preemption import EXIT_PREEMPTED
from fluxlora.trainer import NonFiniteLoss, train

from .conftest import train_config

REPO = Path(__file__).resolve().parent.parent
ADAPTER = "adapter_fp32.safetensors"


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def flags(cache: Path, model: Path, out: Path, steps: int, every: int) -> list[str]:
    return ["--embeddings_dir", str(cache), "--pretrained_model_name_or_path", str(model), "--output_dir", str(out),
            "--mixed_precision", "no", "--max_train_steps", str(steps), "--checkpointing_steps", str(every),
            "--validation_steps", "0", "--optimizer", "adamw", "--learning_rate", "1e-3", "--seed", "3"]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "train_flux_lora.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_rows(out: Path, rows: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    log = out / "logs.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stdout.read()[-2000:]}")
        if log.is_file() and len(log.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError("trainer made no progress")


def final_adapter(out: Path, steps: int) -> dict[str, torch.Tensor]:
    return load_file(out / f"checkpoint-{steps}" / ADAPTER)


def assert_same_lora(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def uninterrupted(demo_cache, tiny_flux_dev, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    proc = start(flags(demo_cache, tiny_flux_dev, out, 12, 3))
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-2000:]
    return final_adapter(out, 12)


def test_latest_is_the_highest_complete_step(tmp_path):
    for step in (2, 10, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (2, 10):  # 12 was renamed into place but killed before its marker
        (tmp_path / f"checkpoint-{step}" / COMPLETE).write_text(str(step))
    (tmp_path / "checkpoint-14.tmp").mkdir()
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [2, 10]  # by number, not by name
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"
    assert resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-2")) == tmp_path / "checkpoint-2"
    with pytest.raises(FileNotFoundError, match="no COMPLETE marker"):
        resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-12"))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_same_run(demo_cache, tiny_flux_dev, tmp_path,
                                                                      uninterrupted):
    out = tmp_path / "run"
    proc = start(flags(demo_cache, tiny_flux_dev, out, 12, 3))
    wait_for_rows(out, 4, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED
    # the signal's checkpoint is taken at the step where training stopped: nothing done is lost
    step, saved = complete_checkpoints(out)[-1]
    last_logged = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()][-1]["step"]
    assert step == last_logged and 4 <= step < 12
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == step
    proc = start(flags(demo_cache, tiny_flux_dev, out, 12, 3) + ["--resume_from_checkpoint", "latest"])
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-2000:]
    assert_same_lora(final_adapter(out, 12), uninterrupted)


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing_beyond_the_last_checkpoint(demo_cache, tiny_flux_dev, tmp_path,
                                                                           uninterrupted):
    """Three kill -9s at random moments (checkpoint writes included), each followed by a resume."""
    out = tmp_path / "run"
    rng = random.Random(0)
    for _ in range(3):
        extra = ["--resume_from_checkpoint", "latest"] if complete_checkpoints(out) else []
        proc = start(flags(demo_cache, tiny_flux_dev, out, 12, 3) + extra)
        wait_for_rows(out, 1, proc)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait()
        for step, folder in complete_checkpoints(out):  # every complete checkpoint is whole
            assert load_file(folder / ADAPTER) and (folder / "optimizer.bin").is_file()
    extra = ["--resume_from_checkpoint", "latest"] if complete_checkpoints(out) else []
    proc = start(flags(demo_cache, tiny_flux_dev, out, 12, 3) + extra)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-2000:]
    assert_same_lora(final_adapter(out, 12), uninterrupted)


DEFAULTS = dict(max_train_steps=6, checkpointing_steps=2, optimizer="adamw", seed=3)


def cfg(cache: Path, model: Path, out: Path, **overrides) -> TrainConfig:
    return train_config(cache, model, out, **{**DEFAULTS, **overrides})


def poison_steps(monkeypatch, bad: set[int]) -> None:
    """Make the loss non-finite on the given (1-based) optimizer steps."""
    calls = {"n": 0}
    real = flow.flow_matching_loss

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] in bad else value

    monkeypatch.setattr(flow, "flow_matching_loss", loss)


def test_a_non_finite_step_is_skipped(demo_cache, tiny_flux_dev, tmp_path, monkeypatch, caplog):
    poison_steps(monkeypatch, {3})
    with caplog.at_level("WARNING"):
        train(cfg(demo_cache, tiny_flux_dev, tmp_path / "run", max_train_steps=4))
    assert any("non-finite" in r.getMessage() and "step 3" in r.getMessage() for r in caplog.records)
    after_2 = load_file(tmp_path / "run" / "checkpoint-2" / ADAPTER)
    after_4 = load_file(tmp_path / "run" / "checkpoint-4" / ADAPTER)
    assert all(torch.isfinite(v).all() for v in after_4.values())
    assert any(not torch.equal(after_2[k], after_4[k]) for k in after_2)  # step 4 did train


def test_too_many_non_finite_steps_stop_with_the_last_good_state(demo_cache, tiny_flux_dev, tmp_path, monkeypatch):
    poison_steps(monkeypatch, {3, 4, 5})
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="resume_from_checkpoint"):
        train(cfg(demo_cache, tiny_flux_dev, out, max_nan_steps=3))
    # the host learns of step 5's failure while step 6 runs, before step 6 updates anything: the stop saves
    # checkpoint-5 (5 steps done, 3 to 5 skipped), the state of checkpoint-2
    assert [s for s, _ in complete_checkpoints(out)] == [2, 4, 5]
    saved = load_file(out / "checkpoint-5" / ADAPTER)
    assert_same_lora(saved, load_file(out / "checkpoint-2" / ADAPTER))
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_disk_full_while_saving_keeps_the_previous_checkpoint(demo_cache, tiny_flux_dev, tmp_path, monkeypatch):
    from accelerate import Accelerator

    real = Accelerator.save_state
    calls = {"n": 0}

    def save_state(self, output_dir, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(output_dir, "partial.bin").write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="checkpoint-2 is intact"):
        train(cfg(demo_cache, tiny_flux_dev, out))
    assert [s for s, _ in complete_checkpoints(out)] == [2]
    assert not list(out.glob("*.tmp"))
    assert load_file(out / "checkpoint-2" / ADAPTER)
