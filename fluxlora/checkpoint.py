"""Resumable checkpoints that a kill at any moment cannot corrupt.

A checkpoint is written to `checkpoint-<step>.tmp/`, renamed to `checkpoint-<step>/` and then marked
with a `COMPLETE` file; only marked folders are ever resumed from, so a kill while writing leaves the
previous checkpoint the latest. Accelerate saves optimizer, scheduler and RNG states; the hooks below
make it save the LoRA weights only (not the 12B frozen base) and load them back.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter_fp32.safetensors"
_NAME = re.compile(r"checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is untouched."""


def register_lora_hooks(accelerator: Accelerator, transformer: torch.nn.Module) -> None:
    """Make `save_state`/`load_state` store the fp32 LoRA weights instead of the whole model."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            if accelerator.is_main_process:
                state = get_peft_model_state_dict(accelerator.unwrap_model(model))
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                          os.path.join(output_dir, ADAPTER_FILE))
            if weights:
                weights.pop()  # accelerate would otherwise write the frozen base too

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            model = accelerator.unwrap_model(models.pop())
            state = load_file(os.path.join(input_dir, ADAPTER_FILE))
            result = set_peft_model_state_dict(model, state)
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"{input_dir}/{ADAPTER_FILE} does not fit the model: "
                                   f"{result.unexpected_keys[:5]}; resume with the same --rank and --lora_layers")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(output_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _NAME.match(child.name)
            if match and (child / COMPLETE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_checkpoint(output_dir: str | Path, spec: str) -> Path:
    """The folder that `--resume_from_checkpoint` names: 'latest' or a path."""
    if spec == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}; "
                                    f"drop the flag to start a new run, or point --output_dir at the run to resume")
        return found[-1][1]
    path = Path(spec)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: not a complete checkpoint (no {COMPLETE} "
                                f"marker; it was interrupted while being written); use 'latest'")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any],
                    export_lora: Callable[[Path], None], total_limit: int | None = None) -> Path:
    """Write checkpoint-<step> on every process (accelerate's collective save), atomically.

    `state` (JSON) holds what accelerate does not: step, data position, world size. `export_lora`
    writes the user-facing LoRA file into the folder (main process only).
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            export_lora(tmp)
            _fsync_tree(tmp)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(output_dir)
        kept = f"{previous[-1][1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write {final} ({err.strerror or err}); {kept}. Free space in "
                              f"{Path(output_dir).resolve()} (or lower --checkpoints_total_limit) and resume "
                              f"with --resume_from_checkpoint latest") from err
    if accelerator.is_main_process:
        if final.exists():  # a re-save of the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        (final / COMPLETE).write_text(str(step))
        _fsync_dir(final.parent)
        if total_limit is not None:
            for _, old in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore LoRA, optimizer, scheduler and RNG states; return the trainer state."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
