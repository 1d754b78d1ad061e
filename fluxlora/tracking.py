"""Experiment trackers through Accelerate (W&B, TensorBoard) and the run's identity across resumes.

The JSONL log (metrics.py) is always written; trackers are extra. `run.json` in the run folder keeps
what must survive a resume: the W&B run id (a resumed run continues the same W&B run) and the Oxen
branch results were uploaded to.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Sequence

from accelerate import Accelerator
from PIL import Image

from .config import TrainConfig

RUN_FILE = "run.json"


def load_run_info(output_dir: Path) -> dict[str, Any]:
    path = output_dir / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_run_info(output_dir: Path, info: dict[str, Any]) -> None:
    path = output_dir / RUN_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path)


def run_name(cfg: TrainConfig) -> str:
    return cfg.run_name or Path(cfg.output_dir).resolve().name


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """The full config for trackers: lists as comma-joined strings (TensorBoard's hparams need scalars)."""
    return {k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in dataclasses.asdict(cfg).items()}


def init_trackers(accelerator: Accelerator, cfg: TrainConfig, info: dict[str, Any]) -> None:
    """Start the trackers on the main process; W&B resumes the run recorded in `info` if any."""
    if not accelerator.is_main_process or cfg.report_to == "none":
        return
    init_kwargs: dict[str, Any] = {}
    if cfg.report_to in ("wandb", "all"):
        info.setdefault("wandb_id", uuid.uuid4().hex[:8])  # W&B run ids: lowercase letters and digits
        init_kwargs["wandb"] = {"name": run_name(cfg), "id": info["wandb_id"], "resume": "allow",
                                "entity": cfg.wandb_entity, "tags": list(cfg.wandb_tags) or None,
                                "dir": str(Path(cfg.output_dir))}
    accelerator.init_trackers(cfg.tracker_project_name, config=flat_config(cfg), init_kwargs=init_kwargs)


def log_images(accelerator: Accelerator, images: Sequence[Image.Image], prompts: Sequence[str], step: int) -> None:
    """Previews to every tracker: W&B images captioned with their prompts, TensorBoard images."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=p) for im, p in zip(images, prompts)]}, step=step)
        elif tracker.name == "tensorboard":
            import numpy as np

            for i, (image, prompt) in enumerate(zip(images, prompts)):
                tracker.writer.add_image(f"validation/{i}", np.asarray(image.convert("RGB")), step,
                                         dataformats="HWC")
                tracker.writer.add_text(f"validation/{i}/prompt", prompt, step)


def log_lora_artifact(accelerator: Accelerator, lora: Path, name: str, metadata: dict[str, Any]) -> None:
    """The final LoRA as a W&B model artifact (`--wandb_log_model`)."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            safe = re.sub(r"[^\w.-]+", "-", name)  # W&B artifact names: letters, digits, - _ .
            artifact = wandb.Artifact(name=f"{safe}-lora", type="model", metadata=metadata)
            artifact.add_file(str(lora))
            tracker.run.log_artifact(artifact)
