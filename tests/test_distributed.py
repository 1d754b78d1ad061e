"""Several processes on the CPU (gloo) through `accelerate launch` and the repository's configs.

The trainer's promise: every sample's draws depend only on the seed and its place in the stream,
so N processes with batch B train exactly what one process with batch N x B does, and a
checkpoint resumes on another number of processes. Here 2 x 1 against 1 x 2 (same global batch),
with gradient accumulation, caption dropout and a cosine schedule with warmup, on the tiny model.

Elsewhere: two precompute processes build the same cache as one in
tests/test_precompute.py::test_two_processes_build_the_same_cache_as_one, and sample.py over two
processes is tested in tests/test_sample.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fluxlora.checkpoint import ADAPTER_FILE, FSDP_OPTIMIZER_FILE
from fluxlora.config import TrainConfig
from fluxlora.metrics import read_jsonl
from fluxlora.trainer import train

from .conftest import repo_env, reset_accelerate

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "accelerate_configs"
DUMP_SCRIPT = REPO / "tests" / "helpers" / "train_dump.py"
FSDP_SCRIPT = REPO / "tests" / "helpers" / "train_fsdp_cpu.py"
STEPS = 6
# Global batch 2 in every run. The cosine schedule with warmup and the accumulation make the
# learning rate and the optimizer state depend on the step count across a resume.
COMMON = dict(max_train_steps=STEPS, checkpointing_steps=2, gradient_accumulation_steps=2, caption_dropout=0.3,
              lr_scheduler="cosine", lr_warmup_steps=2, optimizer="adamw", learning_rate=1e-3, seed=7,
              mixed_precision="no", validation_steps=0)
LORA_ATOL = 1e-6  # fp32 AdamW: measured differences between 1 x 2 and 2 x 1 are below 1e-7


# ------------------------------------------------------------------------------------ helpers
def train_here(**values) -> Path:
    """A 1-process run in this process: one thread, as each process of `accelerate launch` gets,
    because two cores shared by several threads make the tiny model's steps 20x slower."""
    cfg = TrainConfig(**{**COMMON, **values})
    cfg.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate()
    try:
        train(cfg)
    finally:
        reset_accelerate()
        torch.set_num_threads(threads)
    return Path(cfg.output_dir)


def flags(**values) -> list[str]:
    return [arg for key, value in values.items() for arg in (f"--{key}", str(value))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(commands: list[list[str]], logs: Path, timeout: float = 400) -> list[str]:
    """Run the launchers together (as the machines of one job would) and return their output;
    fails the test unless every one exits 0."""
    env = repo_env(WANDB_MODE="offline", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for i, command in enumerate(commands):
        files.append(open(logs / f"launcher-{i}.log", "w"))
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=files[-1], stderr=subprocess.STDOUT,
                                      start_new_session=True))  # its own group: a timeout ends its workers too
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        for file in files:
            file.close()
    outputs = [(logs / f"launcher-{i}.log").read_text() for i in range(len(commands))]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    return outputs


def accelerate_launch(config: str, *launch_args: str) -> list[str]:
    # the configs announce bf16 for GPUs; these CPU runs announce the fp32 they train in
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--mixed_precision", "no", *launch_args]


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / ADAPTER_FILE if path.is_dir() else path)


def assert_same_lora(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=atol, msg=key)


def assert_log_matches(run: Path, reference: Path, steps: range) -> None:
    """Rows for `steps` once each, with the reference run's loss (the mean over processes) and lr."""
    rows = read_jsonl(run / "logs.jsonl")
    assert [r["step"] for r in rows] == list(steps)
    expected = {r["step"]: r for r in read_jsonl(reference / "logs.jsonl")}
    for row in rows:
        ref = expected[row["step"]]
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5), row["step"]
        assert row["lr"] == pytest.approx(ref["lr"], rel=1e-6, abs=1e-12), row["step"]
        assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), row["step"]


def copy_run_until(run: Path, dst: Path, step: int) -> Path:
    """`run` as a job killed before its first checkpoint after `step` would have left it."""
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("dump"))
    for folder in dst.glob("checkpoint-*"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    (dst / "pytorch_lora_weights.safetensors").unlink()
    return dst


# ------------------------------------------------------------------------------------ configs
def _keys_without_comment(text: str) -> list[str]:
    missing, previous = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        key = re.match(r"\s*([A-Za-z_]+):", line)
        if key and "#" not in line and not previous.startswith("#"):
            missing.append(key.group(1))
        previous = stripped
    return missing


@pytest.mark.parametrize("name, distributed_type", [
    ("single_gpu.yaml", "NO"), ("multi_gpu_ddp.yaml", "MULTI_GPU"), ("multi_node.yaml", "MULTI_GPU"),
    ("fsdp.yaml", "FSDP")])
def test_config_loads_in_accelerate_and_every_key_is_explained(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    path = CONFIGS / name
    config = load_config_from_file(str(path))  # raises on keys accelerate does not know
    assert config.compute_environment.value == "LOCAL_MACHINE"
    assert config.distributed_type.value == distributed_type
    assert config.dynamo_config == {}  # the scripts' --compile, never accelerate's whole-model compile
    assert _keys_without_comment(path.read_text()) == []
    # fsdp_config keys become launcher flags by name; accelerate ignores unknown ones silently
    known = {action.dest for action in launch_command_parser()._actions}
    assert [key for key in config.fsdp_config if key not in known] == []


def test_fsdp_config_gives_a_plugin_that_wraps_both_flux_block_types(tiny_flux_dev, monkeypatch):
    """What `accelerate launch --config_file fsdp.yaml` hands to the processes, read back the way
    each process's Accelerator does. (FSDP itself needs GPUs: accelerate shards only over them.)"""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from diffusers import FluxTransformer2DModel
    from torch.distributed.fsdp import StateDictType

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", "4",
                                               "train_flux_lora.py"])
    _validate_launch_command(args)
    assert args.use_fsdp
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FULL_SHARD
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert not plugin.cpu_ram_efficient_loading and not plugin.activation_checkpointing
    model = FluxTransformer2DModel.from_pretrained(tiny_flux_dev, subfolder="transformer")
    plugin.set_auto_wrap_policy(model)  # raises if a class name is not in the model
    wrapped = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
    assert {cls.__name__ for cls in wrapped} == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}


# ------------------------------------------------------------------------------------ SLURM
# Stand-ins for SLURM's commands and for `accelerate`, first on PATH: srun runs its command once per
# node (SLURM_NODEID 0, 1, ...) on this machine; the launcher records its arguments and which
# signals it ignores, then exits, or with SHIM_WAIT waits until scancel has "signalled the steps".
SHIMS = {
    "srun": """#!/bin/bash
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
""",
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$SHIM_DIR/calls"
[ "$1 $2" = "show hostnames" ] && printf 'node-a\\nnode-b\\n'
exit 0
""",
    "scancel": """#!/bin/bash
echo "scancel $*" >> "$SHIM_DIR/calls"
touch "$SHIM_DIR/signalled"
""",
    "accelerate": """#!/bin/bash
printf '%s\\n' "$@" > "$SHIM_DIR/launcher-$SLURM_NODEID.args"
awk '/^SigIgn/ {print $2}' /proc/$$/status > "$SHIM_DIR/launcher-$SLURM_NODEID.sigign"
[ -z "${SHIM_WAIT:-}" ] && exit 0
for _ in $(seq 300); do [ -f "$SHIM_DIR/signalled" ] && exit 1; sleep 0.1; done
exit 2
""",
}
SLURM_SCRIPT = REPO / "scripts" / "slurm_train.sbatch"


@pytest.fixture
def slurm(tmp_path):
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in SHIMS.items():
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SHIM_DIR": str(shims),
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4", "VENV": str(tmp_path / "no-venv"),
           "EMBEDDINGS_DIR": str(tmp_path / "cache"), "OUTPUT_DIR": str(tmp_path / "run")}
    return shims, env


def launcher_args(shims: Path, node: int):
    from accelerate.commands.launch import launch_command_parser

    argv = (shims / f"launcher-{node}.args").read_text().splitlines()
    assert argv[0] == "launch"
    return launch_command_parser().parse_args(argv[1:])


def ignores_usr1(shims: Path, node: int) -> bool:
    mask = int((shims / f"launcher-{node}.sigign").read_text(), 16)
    return bool(mask >> (signal.SIGUSR1 - 1) & 1)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_slurm_script_starts_one_launcher_per_node(slurm, tmp_path, checkpointed):
    shims, env = slurm
    if checkpointed:  # a requeued job: its run folder holds a complete checkpoint
        (tmp_path / "run" / "checkpoint-200").mkdir(parents=True)
        (tmp_path / "run" / "checkpoint-200" / "COMPLETE").write_text("200")
    done = subprocess.run(["bash", str(SLURM_SCRIPT), "--rank", "32"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    resume = ["--resume_from_checkpoint", "latest"] if checkpointed else []
    for node in (0, 1):
        args = launcher_args(shims, node)
        assert args.config_file == str(CONFIGS / "multi_node.yaml")
        assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 8, node)
        assert (args.main_process_ip, args.main_process_port) == ("node-a", 20000 + 4242)
        assert args.training_script == str(REPO / "train_flux_lora.py")
        assert args.training_script_args == ["--embeddings_dir", str(tmp_path / "cache"), "--output_dir",
                                             str(tmp_path / "run"), *resume, "--rank", "32"]
        assert ignores_usr1(shims, node)  # SIGUSR1 is for the training processes, not the launcher
    assert "requeue" not in (shims / "calls").read_text()


def test_slurm_script_passes_the_time_limit_signal_on_and_requeues(slurm):
    """SLURM's SIGUSR1 (--signal=B:USR1@120) reaches the batch script only: it signals the steps,
    waits for the launchers to finish (the processes save a checkpoint), then requeues the job."""
    shims, env = slurm
    script = subprocess.Popen(["bash", str(SLURM_SCRIPT)], env={**env, "SHIM_WAIT": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(300):
            if all((shims / f"launcher-{node}.sigign").is_file() for node in (0, 1)):
                break
            assert script.poll() is None, script.stdout.read()
            time.sleep(0.1)
        script.send_signal(signal.SIGUSR1)
        output, _ = script.communicate(timeout=60)
    finally:
        if script.poll() is None:
            script.kill()
    assert script.returncode == 0, output
    calls = (shims / "calls").read_text().splitlines()
    assert calls[-2:] == ["scancel --signal=USR1 4242", "scontrol requeue 4242"]
    assert "requeueing" in output


# ------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def one_process(demo_cache, tiny_flux_dev, tmp_path_factory) -> Path:
    """The reference: 1 process x batch 2, checkpoints at steps 2, 4, 6."""
    return train_here(embeddings_dir=str(demo_cache), pretrained_model_name_or_path=str(tiny_flux_dev),
                      output_dir=str(tmp_path_factory.mktemp("one-process") / "run"), train_batch_size=2)


@pytest.fixture(scope="module")
def two_processes(demo_cache, tiny_flux_dev, tmp_path_factory) -> Path:
    """2 processes x batch 1 on one machine (multi_gpu_ddp.yaml), each dumping its LoRA weights."""
    root = tmp_path_factory.mktemp("two-processes")
    out = root / "run"
    launch([accelerate_launch("multi_gpu_ddp.yaml", "--num_processes", "2", "--main_process_port", str(free_port()),
                              str(DUMP_SCRIPT), "--dump_dir", str(out / "dump"),
                              *flags(**COMMON, embeddings_dir=demo_cache, pretrained_model_name_or_path=tiny_flux_dev,
                                     output_dir=out, train_batch_size=1))],
           root / "logs")
    return out


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(two_processes, one_process):
    ranks = [adapter(two_processes / "dump" / f"rank-{r}.safetensors") for r in (0, 1)]
    assert_same_lora(ranks[1], ranks[0], atol=0)  # DDP keeps the replicas identical, bit for bit
    assert_same_lora(adapter(two_processes / f"checkpoint-{STEPS}"), ranks[0], atol=0)
    reference = adapter(one_process / f"checkpoint-{STEPS}")
    assert any(v.abs().max() > 1e-4 for k, v in reference.items() if "lora_B" in k)  # lora_B starts at 0
    assert_same_lora(ranks[0], reference, atol=LORA_ATOL)
    assert_same_lora(adapter(two_processes / "checkpoint-2"), adapter(one_process / "checkpoint-2"), atol=LORA_ATOL)
    assert_log_matches(two_processes, one_process, range(1, STEPS + 1))
    # DDP sends no buffers before each forward (the fp8 base keeps its weights in buffers), and its
    # buckets hold the gradients (no copy back per step)
    ddp = json.loads((two_processes / "dump" / "rank-1.json").read_text())
    assert ddp == {"wrapper": "DistributedDataParallel", "broadcast_buffers": False, "gradient_as_bucket_view": True}
    state = json.loads((two_processes / "checkpoint-2" / "trainer_state.json").read_text())
    assert (state["world_size"], state["global_batch"], state["step"]) == (2, 2, 2)


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_on_one(two_processes, one_process, demo_cache, tiny_flux_dev, tmp_path):
    """Killed after its step-2 checkpoint, the 2 x 1 run continues as 1 x 2 and ends where the
    uninterrupted 1 x 2 run does: LoRA, Adam moments, schedule position and data position carry."""
    run = copy_run_until(two_processes, tmp_path / "run", step=2)
    train_here(embeddings_dir=str(demo_cache), pretrained_model_name_or_path=str(tiny_flux_dev), output_dir=str(run),
               train_batch_size=2, resume_from_checkpoint="latest")
    assert_same_lora(adapter(run / f"checkpoint-{STEPS}"), adapter(one_process / f"checkpoint-{STEPS}"),
                     atol=LORA_ATOL)
    assert_log_matches(run, one_process, range(1, STEPS + 1))


@pytest.mark.slow
def test_two_machines_on_localhost_resume_a_one_process_checkpoint(one_process, demo_cache, tiny_flux_dev,
                                                                    tmp_path):
    """multi_node.yaml with two launchers of one process each (machine ranks 0 and 1) meeting at
    127.0.0.1: they pick up the 1 x 2 run's step-2 checkpoint as 2 x 1 and end identical to each
    other and to the uninterrupted run."""
    run = copy_run_until(one_process, tmp_path / "run", step=2)
    port = str(free_port())
    script = [str(DUMP_SCRIPT), "--dump_dir", str(run / "dump"),
              *flags(**COMMON, embeddings_dir=demo_cache, pretrained_model_name_or_path=tiny_flux_dev, output_dir=run,
                     train_batch_size=1, resume_from_checkpoint="latest")]
    outputs = launch([accelerate_launch("multi_node.yaml", "--num_machines", "2", "--num_processes", "2",
                                        "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                                        "--main_process_port", port, *script) for rank in (0, 1)],
                     tmp_path / "logs")
    assert "train:" in outputs[0] and "train:" not in outputs[1]  # the progress bar: machine 0's main process
    ranks = [adapter(run / "dump" / f"rank-{r}.safetensors") for r in (0, 1)]
    assert_same_lora(ranks[1], ranks[0], atol=0)
    assert_same_lora(ranks[0], adapter(one_process / f"checkpoint-{STEPS}"), atol=LORA_ATOL)
    assert_log_matches(run, one_process, range(1, STEPS + 1))


@pytest.mark.slow
def test_fsdp_trains_what_ddp_trains_and_resumes(two_processes, demo_cache, tiny_flux_dev, tmp_path):
    """fsdp.yaml's FSDP2 over 2 CPU processes (tests/helpers/train_fsdp_cpu.py: accelerate shards only
    GPU processes by itself), with previews: the same LoRA as the DDP run, gathered from the shards
    into checkpoints that hold the adapter and its optimizer state, not the base; killed after the
    step-2 checkpoint, it resumes to the same end."""
    run = tmp_path / "run"
    script = [str(FSDP_SCRIPT), *flags(**{**COMMON, "validation_steps": 3}, embeddings_dir=demo_cache,
                                       pretrained_model_name_or_path=tiny_flux_dev, train_batch_size=1,
                                       validation_width=64, validation_height=48, validation_inference_steps=2)]
    command = accelerate_launch("fsdp.yaml", "--num_processes", "2")
    output = launch([[*command, "--main_process_port", str(free_port()), *script, "--output_dir", str(run)]],
                    tmp_path / "logs")[0]
    assert "prepared model: FSDPFluxTransformer2DModel" in output
    assert_same_lora(adapter(run / f"checkpoint-{STEPS}"), adapter(two_processes / f"checkpoint-{STEPS}"),
                     atol=LORA_ATOL)
    assert sorted(p.name for p in (run / "checkpoint-2").iterdir()) == sorted([
        "COMPLETE", "adapter_fp32.safetensors", FSDP_OPTIMIZER_FILE, "pytorch_lora_weights.safetensors",
        "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin", "trainer_state.json"])
    assert sorted(p.parent.name for p in (run / "samples").glob("step-*/*.png")) == \
        ["step-000000"] * 2 + ["step-000003"] * 2 + ["step-000006"] * 2  # every process rendered, one saved
    assert_log_matches(run, two_processes, range(1, STEPS + 1))

    resumed = copy_run_until(run, tmp_path / "resumed", step=2)
    launch([[*command, "--main_process_port", str(free_port()), *script, "--output_dir", str(resumed),
             "--resume_from_checkpoint", "latest"]], tmp_path / "logs-resumed")
    assert_same_lora(adapter(resumed / f"checkpoint-{STEPS}"), adapter(run / f"checkpoint-{STEPS}"), atol=LORA_ATOL)
