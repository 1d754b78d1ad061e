"""FSDP2: the trainer's checkpoint state for sharded LoRA weights, and training under fsdp.yaml.

On the CPU the sharding comes from `fully_shard` over gloo processes (accelerate applies FSDP
only on GPUs): 2 processes save after one AdamW step, 1 process loads and takes the second; both
must match the same two steps without sharding. The whole trainer under accelerate_configs/fsdp.yaml
needs 2 GPUs (`gpu` tests).
"""
from __future__ import annotations

import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fluxlora.checkpoint import FSDP_OPTIMIZER_FILE, adapter_state

from .helpers.fsdp_state import build, step
from .test_distributed import REPO, accelerate_launch, adapter, assert_same_lora, flags, free_port, launch

HELPER = Path(__file__).resolve().parent / "helpers" / "fsdp_state.py"


def run_helper(phase: str, processes: int, tiny_flux_dev: Path, checkpoint: Path, out: Path, logs: Path) -> None:
    launch([accelerate_launch("multi_gpu_ddp.yaml", "--num_processes", str(processes), "--main_process_port",
                              str(free_port()), str(HELPER), "--model", str(tiny_flux_dev), "--checkpoint",
                              str(checkpoint), "--out", str(out), "--phase", phase)], logs)


def read(path: Path) -> tuple[dict[str, torch.Tensor], float]:
    with safe_open(str(path), "pt") as f:
        lr = float(f.metadata()["lr"])
    return load_file(path), lr


@pytest.mark.slow
def test_fsdp_state_of_two_processes_resumes_on_one(tiny_flux_dev, tmp_path):
    model, optimizer, scheduler = build(str(tiny_flux_dev), None)  # the same steps without sharding
    step(model, optimizer, scheduler, 1)
    after_one, lr_one = adapter_state(model), scheduler.get_last_lr()[0]
    step(model, optimizer, scheduler, 2)
    after_two, lr_two = adapter_state(model), scheduler.get_last_lr()[0]
    assert any("lora_B" in k for k in after_two) and len(after_two) > 50

    checkpoint = tmp_path / "checkpoint"
    run_helper("save", 2, tiny_flux_dev, checkpoint, tmp_path / "saved.safetensors", tmp_path / "logs-save")
    saved, lr = read(tmp_path / "saved.safetensors")
    assert lr == pytest.approx(lr_one)
    for key, value in after_one.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=1e-6, msg=key)
    # the checkpoint holds whole tensors: the LoRA and both Adam moments of every LoRA weight
    for key, value in load_file(checkpoint / "adapter_fp32.safetensors").items():
        torch.testing.assert_close(value, after_one[key], rtol=0, atol=1e-6, msg=key)
    moments = torch.load(checkpoint / FSDP_OPTIMIZER_FILE, weights_only=True)["state"]
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(moments) == sorted(lora_names)
    first = dict(model.named_parameters())[lora_names[0]]
    assert moments[lora_names[0]]["exp_avg"].shape == first.shape

    run_helper("load", 1, tiny_flux_dev, checkpoint, tmp_path / "resumed.safetensors", tmp_path / "logs-load")
    resumed, lr = read(tmp_path / "resumed.safetensors")
    assert lr == pytest.approx(lr_two)
    for key, value in after_two.items():  # the Adam moments carried over: a fresh optimizer would differ
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------ on 2 GPUs
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
GPU_RUN = dict(max_train_steps=4, checkpointing_steps=2, optimizer="adamw", learning_rate=1e-3, seed=7,
               train_batch_size=1, mixed_precision="no", validation_steps=2, report_to="none")


def train_launch(config: str, out: Path, demo_cache: Path, tiny_flux_dev: Path, *extra: str) -> str:
    # eager: compiling the tiny blocks would take most of the test's time (bench_train_step.py runs
    # FSDP compiled on the full model)
    script = [str(REPO / "train_flux_lora.py"), "--no-compile",
              *flags(**GPU_RUN, embeddings_dir=demo_cache, pretrained_model_name_or_path=tiny_flux_dev,
                     output_dir=out), *extra]
    command = accelerate_launch(config, "--num_processes", "2", "--main_process_port", str(free_port()), *script)
    return launch([command], out.parent / f"logs-{out.name}")[0]


@pytest.mark.gpu
@TWO_GPUS
def test_fsdp_on_two_gpus_trains_what_ddp_trains_and_resumes(demo_cache, tiny_flux_dev, tmp_path):
    """accelerate_configs/fsdp.yaml against multi_gpu_ddp.yaml, same flags (fp32, previews at steps
    0, 2 and 4): the same LoRA in both (gathered from FSDP's shards into checkpoints and the exported
    file); checkpoints hold the adapter, not the base; a run resumed from the step-2 checkpoint ends
    where the whole one does."""
    ddp = tmp_path / "ddp"
    train_launch("multi_gpu_ddp.yaml", ddp, demo_cache, tiny_flux_dev)
    fsdp = tmp_path / "fsdp"
    train_launch("fsdp.yaml", fsdp, demo_cache, tiny_flux_dev)
    expected = adapter(ddp / "checkpoint-4")
    assert any(v.abs().max() > 1e-4 for k, v in expected.items() if "lora_B" in k)
    assert_same_lora(adapter(fsdp / "checkpoint-4"), expected, atol=1e-5)
    exported = load_file(fsdp / "pytorch_lora_weights.safetensors")
    reference = load_file(ddp / "pytorch_lora_weights.safetensors")
    assert exported.keys() == reference.keys()
    assert_same_lora(exported, reference, atol=1e-2)  # bf16 files
    # the adapter and its optimizer state, not accelerate's sharded copy of the base
    assert sorted(p.name for p in (fsdp / "checkpoint-2").iterdir()) == sorted([
        "COMPLETE", "adapter_fp32.safetensors", FSDP_OPTIMIZER_FILE, "pytorch_lora_weights.safetensors",
        "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin", "trainer_state.json"])
    previews = sorted(p.relative_to(ddp) for p in (ddp / "samples").glob("step-*/*.png"))
    assert len(previews) == 6  # 2 prompts at steps 0, 2, 4
    assert sorted(p.relative_to(fsdp) for p in (fsdp / "samples").glob("step-*/*.png")) == previews

    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed, ignore=shutil.ignore_patterns("checkpoint-4"))
    train_launch("fsdp.yaml", resumed, demo_cache, tiny_flux_dev, "--resume_from_checkpoint", "latest")
    assert_same_lora(adapter(resumed / "checkpoint-4"), adapter(fsdp / "checkpoint-4"), atol=1e-6)


@pytest.mark.parametrize("kind, fsdp2, options, flag", [
    ("DEEPSPEED", False, {}, "config_file"),
    ("FSDP", False, {"optimizer": "adamw"}, "config_file"),
    ("FSDP", True, {}, "optimizer"),  # the default adamw8bit
    ("FSDP", True, {"optimizer": "adamw", "low_memory": True, "mixed_precision": "bf16"}, "base_model_precision"),
    ("FSDP", True, {"optimizer": "adamw", "base_model_precision": "fp8", "mixed_precision": "bf16"},
     "base_model_precision"),
    ("FSDP", True, {"optimizer": "adamw", "cuda_graphs": True}, "cuda_graphs"),
])
def test_what_fsdp_cannot_do_is_refused_with_the_flag_to_change(demo_cache, tiny_flux_dev, tmp_path, kind, fsdp2,
                                                                 options, flag):
    from accelerate.utils import DistributedType

    from fluxlora.config import ConfigError
    from fluxlora.trainer import check_distributed

    from .conftest import train_config

    cfg = train_config(demo_cache, tiny_flux_dev, tmp_path / "run", **options)
    accelerator = types.SimpleNamespace(distributed_type=DistributedType[kind], is_fsdp2=fsdp2)
    with pytest.raises(ConfigError) as err:
        check_distributed(accelerator, cfg)
    assert err.value.flag == flag
    accelerator = types.SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    assert check_distributed(accelerator, train_config(demo_cache, tiny_flux_dev, tmp_path / "ok", optimizer="adamw"))
