"""Resumable checkpoints that a kill at any moment cannot corrupt.

A checkpoint is written to `checkpoint-<step>.tmp/`, renamed to `checkpoint-<step>/` and then marked
with a `COMPLETE` file; only marked folders are ever resumed from, so a kill while writing leaves the
previous checkpoint the latest. Accelerate saves optimizer, scheduler and RNG states; the hooks below
make it save the LoRA weights only (not the 12B frozen base) and load them back. Under FSDP, whose
`save_state` would write every process's shard of the base (24 GB per checkpoint), `save_fsdp_state`
and `load_fsdp_state` take its place: the same files, with the LoRA and its optimizer state gathered
into full tensors, so that an FSDP checkpoint also resumes on another number of processes.
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
from accelerate.checkpointing import load_accelerator_state, save_accelerator_state
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from .lora_io import full_tensor

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter_fp32.safetensors"
FSDP_OPTIMIZER_FILE = "optimizer_full.pt"  # under FSDP: the LoRA's optimizer state, gathered
_NAME = re.compile(r"checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is untouched."""


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the LoRA weights as trained (fp32), keyed as peft names them, on the CPU. Under
    FSDP the shards are gathered: every process must call this."""
    return {k: full_tensor(v.detach()).to("cpu", copy=True).contiguous()
            for k, v in get_peft_model_state_dict(model).items()}


def set_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Put full LoRA tensors (as `adapter_state` gives them) into the model; under FSDP each process
    keeps its own shard of them."""
    sharded = {name: param for name, param in model.named_parameters() if isinstance(param, DTensor)}
    if not sharded:
        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", None)
    else:  # peft's keys are the parameters' names without the adapter's (".default")
        lora = {name.replace(".default.", "."): param for name, param in sharded.items() if param.requires_grad}
        unexpected = sorted(state.keys() - lora.keys()) or sorted(lora.keys() - state.keys())
        if not unexpected:
            with torch.no_grad():
                for key, param in lora.items():
                    full = state[key].to(param.device, param.dtype)
                    param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements,
                                                             src_data_rank=None).to_local())
    if unexpected:
        raise RuntimeError(f"{source} does not fit the model: {unexpected[:5]}; resume with the same --rank and "
                           f"--lora_layers")


def register_lora_hooks(accelerator: Accelerator, transformer: torch.nn.Module) -> None:
    """Make `save_state`/`load_state` store the fp32 LoRA weights instead of the whole model."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            if accelerator.is_main_process:
                save_file(adapter_state(accelerator.unwrap_model(model)), os.path.join(output_dir, ADAPTER_FILE))
            if weights:
                weights.pop()  # accelerate would otherwise write the frozen base too

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            set_adapter_state(accelerator.unwrap_model(models.pop()), load_file(os.path.join(input_dir, ADAPTER_FILE)),
                              f"{input_dir}/{ADAPTER_FILE}")

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


def save_fsdp_state(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, folder: Path) -> None:
    """`save_state` for FSDP2 models (every process calls it): the gathered fp32 LoRA and its full
    optimizer state from the main process, scheduler and RNG states as accelerate writes them."""
    adapter = adapter_state(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the main process receives it all
    optimizer_state = get_optimizer_state_dict(model, _bare(optimizer), options=options)
    if accelerator.is_main_process:
        save_file(adapter, folder / ADAPTER_FILE)
        torch.save(optimizer_state, folder / FSDP_OPTIMIZER_FILE)
    save_accelerator_state(str(folder), [], [], [scheduler], [], accelerator.process_index, accelerator.step)


def load_fsdp_state(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, folder: Path) -> None:
    """Restore what `save_fsdp_state` wrote, into this run's shards (any number of processes)."""
    if not (folder / FSDP_OPTIMIZER_FILE).is_file():
        raise CheckpointError(f"{folder} was written without FSDP (it has no {FSDP_OPTIMIZER_FILE}); resume it with "
                              f"the accelerate config it was trained with, or start a new run from its LoRA with "
                              f"--init_lora {folder}/pytorch_lora_weights.safetensors")
    set_adapter_state(model, load_file(folder / ADAPTER_FILE), f"{folder}/{ADAPTER_FILE}")
    optimizer_state = torch.load(folder / FSDP_OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, _bare(optimizer), optimizer_state, options=StateDictOptions(full_state_dict=True))
    load_accelerator_state(str(folder), [], [], [scheduler], [], accelerator.process_index)


def _bare(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # inside accelerate's AcceleratedOptimizer


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any],
                    export_lora: Callable[[Path], None], total_limit: int | None = None,
                    save_state: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint-<step> on every process (a collective save), atomically.

    `state` (JSON) holds what accelerate does not: step, data position, world size. `export_lora`
    writes the user-facing LoRA file into the folder (called on every process: under FSDP all of
    them gather the LoRA, the main process writes). `save_state` writes the training state into the
    folder: accelerate's `save_state` unless given (`save_fsdp_state` under FSDP).
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        (save_state or (lambda folder: accelerator.save_state(str(folder))))(tmp)
        export_lora(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            _fsync_tree(tmp)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(output_dir)
        kept = f"{previous[-1][1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write {final} ({err.strerror or err}); {kept}. Free space in "
                              f"{Path(output_dir).resolve()} (or lower --checkpoints_total_limit) and resume "
                              f"with --resume_from_checkpoint latest") from err
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again: a stop signal on a checkpoint step, or a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        (final / COMPLETE).write_text(str(step))
        _fsync_dir(final.parent)
        if total_limit is not None:
            for _, old in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path,
                    load_state: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Restore LoRA, optimizer, scheduler and RNG states (accelerate's `load_state` unless
    `load_state` is given); return the trainer state."""
    if load_state is None and (path / FSDP_OPTIMIZER_FILE).is_file():
        raise CheckpointError(f"{path} was written under FSDP; resume it with an FSDP accelerate config "
                              f"(accelerate_configs/fsdp.yaml), or start a new run from its LoRA with "
                              f"--init_lora {path}/pytorch_lora_weights.safetensors")
    try:
        (load_state or (lambda folder: accelerator.load_state(str(folder))))(path)
    except ValueError as err:  # torch: "loaded state dict contains a parameter group that doesn't match ..."
        raise CheckpointError(f"{path}: its optimizer state does not fit this run ({err}). It was written with "
                              f"another --rank, --lora_layers or --optimizer, or by an earlier version of this "
                              f"trainer (before the LoRA was stepped as one flat tensor); resume with the flags it "
                              f"was trained with, or start a new run from its LoRA with "
                              f"--init_lora {path}/pytorch_lora_weights.safetensors") from err
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
