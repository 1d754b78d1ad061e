"""Flags and YAML configs: diffusers' names, the file's values under the command line's, errors that
name the flag, all before any model loads."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fluxlora.config import DEFAULT_LORA_LAYERS, PrecomputeConfig, SampleConfig, TrainConfig, parse_config


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path) -> Path:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    return tmp_path / "cache"


def error_of(cls, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(cls, argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_defaults_are_the_original_notebooks(cache):
    cfg = parse_config(TrainConfig, ["--embeddings_dir", str(cache)])
    assert (cfg.rank, cfg.alpha, cfg.optimizer, cfg.learning_rate, cfg.lr_scheduler) == (16, 16.0, "adamw8bit", 1e-4,
                                                                                          "constant")
    assert (cfg.train_batch_size, cfg.max_train_steps, cfg.checkpointing_steps) == (1, 2000, 200)
    assert cfg.max_grad_norm == 1.0
    assert cfg.mixed_precision == "bf16" and cfg.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev"
    assert cfg.lora_layers == list(DEFAULT_LORA_LAYERS) and cfg.timestep_sampling == "logit_normal"


def test_yaml_supplies_flags_and_the_command_line_wins(cache, tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"embeddings_dir: {cache}\nrank: 32\nlearning_rate: 5.0e-5\n"
                         "lora_layers: [attn.to_q, attn.to_k]\ngradient_checkpointing: true\n")
    cfg = parse_config(TrainConfig, ["--config", str(yaml_file), "--rank", "8"])
    assert cfg.rank == 8 and cfg.alpha == 8.0  # alpha follows rank unless given
    assert parse_config(TrainConfig, ["--config", str(yaml_file), "--lora_alpha", "4"]).alpha == 4.0
    assert cfg.learning_rate == 5e-5 and cfg.lora_layers == ["attn.to_q", "attn.to_k"]
    assert cfg.gradient_checkpointing is True


def test_list_flags_take_several_values_or_repeats():
    cfg = parse_config(SampleConfig, ["--prompt", "a cat", "a dog", "--prompt", "a fox", "--seed", "1", "2"])
    assert cfg.prompt == ["a cat", "a dog", "a fox"]


@pytest.mark.parametrize("argv, flag", [
    (["--rank", "0"], "--rank"),
    (["--validation_width", "1000"], "--validation_width"),
    (["--resolutions", "500"], "--resolutions"),
    (["--caption_dropout", "1.5"], "--caption_dropout"),
    (["--lora_dropout", "1"], "--lora_dropout"),  # [0, 1): dropping every LoRA input trains nothing
    (["--lora_alpha", "0"], "--lora_alpha"),
    (["--max_grad_norm", "-1"], "--max_grad_norm"),
    (["--cuda_graphs", "--gradient_accumulation_steps", "2"], "--cuda_graphs"),
    (["--base_model_precision", "fp8", "--mixed_precision", "fp16"], "--base_model_precision"),
    (["--low_memory", "--mixed_precision", "no"], "--low_memory"),
    (["--init_lora", "/nonexistent.safetensors"], "--init_lora"),
    (["--resume_from_checkpoint", "/nonexistent-checkpoint"], "--resume_from_checkpoint"),
    (["--oxen_branch", "x"], "--oxen_repo"),
    (["--wandb_log_model"], "--wandb_log_model"),
    (["--pretrained_model_name_or_path", "./no/such/model"], "--pretrained_model_name_or_path"),
    (["--optimizer", "sgd"], "--optimizer"),
])
def test_bad_training_flags_name_the_flag(cache, capsys, argv, flag):
    assert flag in error_of(TrainConfig, ["--embeddings_dir", str(cache), *argv], capsys)


def test_a_missing_cache_says_how_to_build_it(tmp_path, capsys):
    message = error_of(TrainConfig, ["--embeddings_dir", str(tmp_path / "nothing")], capsys)
    assert "--embeddings_dir" in message and "precompute_embeddings.py" in message


def test_incompatible_flags_are_refused(cache, tmp_path, capsys):
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"")
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    message = error_of(TrainConfig, ["--embeddings_dir", str(cache), "--init_lora", str(lora),
                                     "--resume_from_checkpoint", str(checkpoint)], capsys)
    assert "--init_lora" in message and "--resume_from_checkpoint" in message


def test_yaml_errors_name_the_key(cache, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"embeddings_dir: {cache}\nrnak: 4\n")
    assert "'rnak'" in error_of(TrainConfig, ["--config", str(bad)], capsys)
    bad.write_text(f"embeddings_dir: {cache}\nrank: four\n")
    assert "--rank" in error_of(TrainConfig, ["--config", str(bad)], capsys)


def test_precompute_and_sample_flags(capsys, tmp_path):
    assert "--dataset" in error_of(PrecomputeConfig, ["--embeddings_dir", str(tmp_path)], capsys)
    assert "--max_sequence_length" in error_of(PrecomputeConfig, ["--dataset", "d", "--embeddings_dir", "e",
                                                                   "--max_sequence_length", "600"], capsys)
    assert "--width" in error_of(SampleConfig, ["--prompt", "x", "--width", "1000"], capsys)


def test_every_flag_has_help():
    from fluxlora.config import build_parser

    for cls in (PrecomputeConfig, TrainConfig, SampleConfig):
        for action in build_parser(cls, "")._actions:
            assert action.help and len(action.help) > 10, (cls.__name__, action.dest)


@pytest.mark.parametrize("script, argv, status", [
    ("train_flux_lora.py", ["--help"], 0),
    ("train_flux_lora.py", ["--embeddings_dir", "/nonexistent-cache"], 2),
    ("sample.py", ["--help"], 0),
    ("sample.py", ["--prompt", "x", "--width", "1000"], 2),
    ("precompute_embeddings.py", ["--help"], 0),
    ("precompute_embeddings.py", ["--embeddings_dir", "e"], 2),
    ("convert_lora.py", ["--help"], 0),
    ("convert_lora.py", ["in.safetensors", "out.safetensors", "--to", "comfy"], 2),
])
def test_scripts_answer_help_and_flags_to_fix_before_importing_torch(script, argv, status):
    """--help and a flag to fix come back at once: the scripts import torch and diffusers (15 s on a 2-core
    machine) only after their flags are checked."""
    probe = ("import runpy, sys\n"
             "sys.argv = sys.argv[1:]\n"
             "try:\n"
             "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as stop:\n"
             "    print('exit', stop.code, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", probe, str(REPO / script), *argv], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.split()[-3:] == ["exit", str(status), "False"], result.stdout + result.stderr
