"""Trackers read back: an offline W&B run and a TensorBoard event file hold what the JSONL log holds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from fluxlora import tracking
from fluxlora.config import TrainConfig
from fluxlora.metrics import read_jsonl
from fluxlora.trainer import train

from .conftest import reset_accelerate, train_config
from .helpers import wandb_offline


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


DEFAULTS = dict(max_train_steps=4, checkpointing_steps=2, validation_steps=2, validation_width=64, validation_height=64,
                validation_inference_steps=2, optimizer="adamw", run_name="tracked run")


def make_cfg(cache: Path, model: Path, out: Path, **overrides) -> TrainConfig:
    return train_config(cache, model, out, **{**DEFAULTS, **overrides})


def test_wandb_offline_run_holds_metrics_config_images_and_resumes(demo_cache, tiny_flux_dev, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    train(make_cfg(demo_cache, tiny_flux_dev, out, report_to="wandb", wandb_tags=["demo", "tiny"],
                   wandb_log_model=True))
    run_id = json.loads((out / "run.json").read_text())["wandb_id"]
    path = wandb_offline.run_file(out / "wandb")
    assert path.name == f"run-{run_id}.wandb"

    info = wandb_offline.run_info(path)
    assert info.display_name == "tracked run" and list(info.tags) == ["demo", "tiny"]
    config = wandb_offline.config(path)
    assert config["rank"] == 16 and config["learning_rate"] == 1e-3 and config["optimizer"] == "adamw"

    jsonl = {row["step"]: row for row in read_jsonl(out / "logs.jsonl")}
    rows = [r for r in wandb_offline.history(path) if "loss" in r]
    assert [r["_step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        for key in ("loss", "lr", "grad_norm", "images_per_s", "sigma"):
            assert row[key] == pytest.approx(jsonl[row["_step"]][key])
    images = [r for r in wandb_offline.history(path) if "validation/_type" in r]  # nested keys come flat
    assert [r["_step"] for r in images] == [0, 2, 4]
    assert images[0]["validation/_type"] == "images/separated" and images[0]["validation/count"] == 2
    assert images[0]["validation/captions"] == (Path(__file__).parents[1] / "demo" /
                                                "validation_prompts.txt").read_text().splitlines()
    media = list(path.parent.glob("files/media/images/validation_*.png"))
    assert len(media) == 6

    # a resumed run continues the same W&B run
    reset_accelerate()
    train(make_cfg(demo_cache, tiny_flux_dev, out, report_to="wandb", max_train_steps=6,
                   resume_from_checkpoint="latest"))
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    resumed = [r["_step"] for r in wandb_offline.history(files[-1]) if "loss" in r]
    assert resumed == [5, 6]


def test_a_run_is_named_after_its_output_folder_unless_named(tmp_path, monkeypatch):
    """The W&B run's and the Oxen branch's name: --run_name, else the output folder's own name."""
    monkeypatch.chdir(tmp_path)
    assert tracking.run_name(SimpleNamespace(run_name=None, output_dir="loras/sks-dog/")) == "sks-dog"
    assert tracking.run_name(SimpleNamespace(run_name=None, output_dir=".")) == tmp_path.name
    assert tracking.run_name(SimpleNamespace(run_name="tracked run", output_dir="loras/sks-dog")) == "tracked run"


def test_tensorboard_event_file_holds_the_jsonl_losses(demo_cache, tiny_flux_dev, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(make_cfg(demo_cache, tiny_flux_dev, out, report_to="tensorboard"))
    runs = []
    for folder in {p.parent for p in (out / "logs").rglob("events.out.tfevents.*")}:  # hparams get a subfolder
        runs.append(EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0}).Reload())
    (acc,) = [run for run in runs if "loss" in run.Tags()["scalars"]]
    losses = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert losses == [(row["step"], pytest.approx(row["loss"])) for row in read_jsonl(out / "logs.jsonl")]
    assert {"validation/0", "validation/1"} <= set(acc.Tags()["images"])


def test_results_are_published_to_oxen_on_a_new_branch_and_resume_reuses_it(demo_cache, tiny_flux_dev, tmp_path,
                                                                            monkeypatch):
    import oxen

    from fluxlora import oxen as fluxlora_oxen
    from fluxlora.trainer import LORA_FILE

    from .test_oxen import FakeServer, fake_remote_class

    monkeypatch.setenv("OXEN_CONFIG_DIR", str(tmp_path / "oxen-config"))
    (tmp_path / "oxen-config").mkdir()
    oxen.user.config_user("Test User", "test@example.com")
    server = FakeServer({"README.md": b"# results"})
    monkeypatch.setattr(fluxlora_oxen, "OxenRemote", fake_remote_class(server))

    # the demo cache as if built with --trigger_phrase sks: the model card names it
    cache = Path(shutil.copytree(demo_cache, tmp_path / "cache"))
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["fingerprint"]["trigger_phrase"] = "sks"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "run"
    train(make_cfg(cache, tiny_flux_dev, out, oxen_repo="me/loras", oxen_upload_checkpoints=True))
    branch = json.loads((out / "run.json").read_text())["oxen_branch"]
    assert branch.startswith("tracked-run") and server.branches["main"] == server.history(branch)[-1]
    files = server.files_at(branch)
    assert files[LORA_FILE] == (out / LORA_FILE).read_bytes()
    assert files["checkpoints/checkpoint-2/" + LORA_FILE] == (out / "checkpoint-2" / LORA_FILE).read_bytes()
    assert {"logs.jsonl", "loss_curve.png", "samples_grid.png", "README.md"} <= set(files)
    assert sum(p.startswith("samples/step-") for p in files) == 6
    assert b"load_lora_weights" in files["README.md"] and b"Trigger phrase: `sks`" in files["README.md"]
    assert server.files_at("main") == {"README.md": b"# results"}  # main untouched

    reset_accelerate()
    train(make_cfg(cache, tiny_flux_dev, out, oxen_repo="me/loras", max_train_steps=6,
                   resume_from_checkpoint="latest"))
    assert [b for b in server.branches if b != "main"] == [branch]  # the same branch
    assert server.files_at(branch)[LORA_FILE] == (out / LORA_FILE).read_bytes()
