"""sample.py: the same images as diffusers' FluxPipeline, LoRA files of every format, outputs, errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from PIL import Image
from safetensors.torch import save_file

import sample
from fluxlora.config import DEFAULT_LORA_LAYERS, ConfigError, SampleConfig, parse_config
from fluxlora.graph_passes import BLOCK_COMPILE_OPTIONS
from fluxlora.lora_io import convert_lora_file, read_lora, save_lora
from fluxlora.models import load_transformer
from fluxlora.prompts import PromptJob, read_prompts
from fluxlora.sampling import load_pipeline, render_jobs, run_sample, use_loras
from fluxlora.tiny import transformer_config
from tests.conftest import reset_accelerate
from tests.test_lora_io import lora_transformer

from .conftest import repo_env

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "two blue squares on a white background"]
# 64 px, 2 steps and 32 T5 tokens keep a tiny-model image well under a second on the CPU; fp32
# ("no") makes CPU runs bit-reproducible, so equality can be exact.
FAST = {"width": 64, "height": 64, "num_inference_steps": 2, "max_sequence_length": 32, "mixed_precision": "no"}


def make_cfg(model, out, **overrides) -> SampleConfig:
    cfg = SampleConfig(**{"pretrained_model_name_or_path": str(model), "output_dir": str(out), "prompt": PROMPTS,
                          **FAST, **overrides})
    cfg.validate()
    return cfg


def argv(model, out, *extra) -> list[str]:
    """sample.py flags for the FAST settings."""
    flags = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(out)]
    for key, value in FAST.items():
        flags += [f"--{key}", str(value)]
    return flags + list(extra)


@pytest.fixture
def accelerator():
    reset_accelerate()  # another test may have built one with other settings
    return Accelerator(cpu=True)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def reference(model, prompt, seed, *, loras=(), scales=None, fuse=False, max_sequence_length=32, **settings):
    """The image diffusers' FluxPipeline gives: LoRA files loaded by path, weighted by set_adapters
    when `scales` are given, with `fuse` merged into the weights by fuse_lora and the adapters
    unloaded, noise from a CPU generator."""
    pipe = FluxPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    names = [f"adapter{i}" for i in range(len(loras))]
    for name, path in zip(names, loras):
        pipe.load_lora_weights(path, adapter_name=name)
    if scales:
        pipe.set_adapters(names, scales)
    if fuse:
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    call = {"width": 64, "height": 64, "num_inference_steps": 2, **settings}
    image = pipe(prompt, max_sequence_length=max_sequence_length, generator=torch.Generator().manual_seed(seed),
                 **call).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_flux_dev):
    """LoRA files of the tiny dev model with random A and B (a visible effect):
    "a" rank 4 alpha 8 on every default layer, "b" rank 2 alpha 2 on attention only, and "a" as
    kohya sd-scripts writes it."""
    folder = tmp_path_factory.mktemp("loras")
    a = save_lora(folder / "a.safetensors", lora_transformer(tiny_flux_dev, rank=4, alpha=8, seed=1),
                  dtype=torch.float32)
    b = save_lora(folder / "b.safetensors", lora_transformer(tiny_flux_dev, rank=2, alpha=2, seed=2,
                                                             targets=("attn.to_q", "attn.to_k", "attn.to_v")),
                  dtype=torch.float32)
    return {"a": str(a), "b": str(b), "a_kohya": str(convert_lora_file(a, folder / "a_kohya.safetensors", "kohya"))}


# ---------------------------------------------------------------------------------------------
# The same images as diffusers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_without_lora_the_images_are_flux_pipelines(tiny_flux_dev, tiny_flux_schnell, tmp_path, variant):
    model = tiny_flux_dev if variant == "dev" else tiny_flux_schnell
    reset_accelerate()
    assert sample.main(argv(model, tmp_path, "--prompt", *PROMPTS, "--seed", "7", "--guidance_scale", "4.5")) == 0

    for i, prompt in enumerate(PROMPTS):
        expected = reference(model, prompt, 7, guidance_scale=4.5)
        assert np.array_equal(pixels(tmp_path / f"{i:04d}-base.png"), expected)
    # Not all one colour: equal images mean something.
    assert pixels(tmp_path / "0000-base.png").std() > 10
    assert not np.array_equal(pixels(tmp_path / "0000-base.png"), pixels(tmp_path / "0001-base.png"))


def test_default_t5_length_is_the_models(tiny_flux_dev, tiny_flux_schnell, tmp_path, accelerator):
    for model, length in ((tiny_flux_dev, 512), (tiny_flux_schnell, 256)):
        out = tmp_path / Path(model).name
        run_sample(make_cfg(model, out, prompt=PROMPTS[:1], max_sequence_length=None), accelerator)
        assert Image.open(out / "0000-base.png").text["max_sequence_length"] == str(length)
        assert np.array_equal(pixels(out / "0000-base.png"),
                              reference(model, PROMPTS[0], 0, max_sequence_length=length, guidance_scale=3.5))


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "adapters"])
def test_with_a_lora_the_images_are_load_lora_weights(tiny_flux_dev, loras, tmp_path, accelerator, fuse):
    """By default the LoRA is merged into the weights (diffusers' fuse_lora); --no-fuse_lora renders
    through the adapters. Either way, --compare's base images come first, from the model without it."""
    run_sample(make_cfg(tiny_flux_dev, tmp_path, lora=[loras["a"]], compare=True, fuse_lora=fuse), accelerator)

    for i, prompt in enumerate(PROMPTS):
        with_lora = pixels(tmp_path / f"{i:04d}-lora.png")
        adapters = reference(tiny_flux_dev, prompt, 0, loras=[loras["a"]])
        if fuse:
            assert np.array_equal(with_lora, reference(tiny_flux_dev, prompt, 0, loras=[loras["a"]], fuse=True))
            assert np.abs(with_lora - adapters).max() <= 1  # merged or beside the base: the same LoRA
        else:
            assert np.array_equal(with_lora, adapters)
        # --compare's base image is the model without the LoRA, same seed
        base = pixels(tmp_path / f"{i:04d}-base.png")
        assert np.array_equal(base, reference(tiny_flux_dev, prompt, 0))
        assert np.abs(with_lora - base).mean() > 5  # the LoRA matters
    rows = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [row["lora_fused"] for row in rows] == [False, fuse] * len(PROMPTS)


def test_two_loras_at_their_scales_are_set_adapters(tiny_flux_dev, loras, tmp_path, accelerator):
    scales = [0.6, 1.5]
    run_sample(make_cfg(tiny_flux_dev, tmp_path, prompt=PROMPTS[:1], lora=[loras["a"], loras["b"]],
                        lora_scale=scales), accelerator)

    image = pixels(tmp_path / "0000-lora.png")
    both = [loras["a"], loras["b"]]
    assert np.array_equal(image, reference(tiny_flux_dev, PROMPTS[0], 0, loras=both, scales=scales, fuse=True))
    assert not np.array_equal(image, reference(tiny_flux_dev, PROMPTS[0], 0, loras=both, fuse=True))  # scales matter
    assert [row["loras"] for row in map(json.loads, (tmp_path / "index.jsonl").read_text().splitlines())] == [
        [{"path": loras["a"], "scale": 0.6}, {"path": loras["b"], "scale": 1.5}]]


def test_fusing_merges_each_lora_at_its_scale_and_drops_the_adapters(tiny_flux_dev, loras, accelerator):
    """use_loras(fuse=True): W + sum of scale * alpha / rank * B @ A from the files, and plain nn.Linear layers
    (no LoRA work left per step). On the tiny model in fp32 fused and adapter images are the same pixels, so
    the weights are what is checked."""
    pipe = load_pipeline(make_cfg(tiny_flux_dev, "unused", lora=[loras["a"], loras["b"]], lora_scale=[0.6, 1.5]),
                         accelerator.device)
    base = pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight.detach().clone()
    key = "transformer.transformer_blocks.0.attn.to_q"
    delta = 0
    for name, scale in (("a", 0.6 * 8 / 4), ("b", 1.5 * 2 / 2)):  # lora_scale * alpha / rank
        state, _ = read_lora(loras[name])
        delta = delta + scale * state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]

    use_loras(pipe, fuse=True)
    fused = pipe.transformer.transformer_blocks[0].attn.to_q
    assert type(fused) is torch.nn.Linear
    assert not [name for name, _ in pipe.transformer.named_modules() if "lora" in name]
    torch.testing.assert_close(fused.weight, base + delta)
    assert (delta.abs() > 1e-3).float().mean() > 0.5  # the LoRAs change the weights


def test_kohya_and_converted_files_give_the_diffusers_files_image(tiny_flux_dev, loras, tmp_path, accelerator):
    """The kohya export, and that export converted back to diffusers keys with alpha folded in (as
    ai-toolkit files have no adapter header), render what the original file renders."""
    back = convert_lora_file(loras["a_kohya"], tmp_path / "back.safetensors", "diffusers")
    assert "lora_adapter_metadata" not in read_lora(back)[1]
    images = {}
    for name, path in (("diffusers", loras["a"]), ("kohya", loras["a_kohya"]), ("back", str(back))):
        run_sample(make_cfg(tiny_flux_dev, tmp_path / name, prompt=PROMPTS[:1], lora=[path]), accelerator)
        images[name] = pixels(tmp_path / name / "0000-lora.png")
    # alpha / rank = 2 is folded into kohya-converted weights: equal up to float rounding
    for name in ("kohya", "back"):
        assert np.abs(images[name] - images["diffusers"]).max() <= 1, name


def test_a_kohya_file_at_alpha_equal_to_rank_gives_exactly_the_same_image(tiny_flux_dev, tmp_path, accelerator):
    diffusers_file = save_lora(tmp_path / "lora.safetensors", lora_transformer(tiny_flux_dev, rank=4, alpha=4),
                               dtype=torch.float32)
    kohya_file = convert_lora_file(diffusers_file, tmp_path / "kohya.safetensors", "kohya")
    images = []
    for path in (diffusers_file, kohya_file):
        out = tmp_path / path.stem
        run_sample(make_cfg(tiny_flux_dev, out, prompt=PROMPTS[:1], lora=[str(path)]), accelerator)
        images.append(pixels(out / "0000-lora.png"))
    assert np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], reference(tiny_flux_dev, PROMPTS[0], 0))


def test_single_file_transformer_gives_the_folders_image(tiny_flux_dev, tmp_path, accelerator):
    """A transformer saved as one file loads with the rest from --base_components.

    It is saved in diffusers' key layout: diffusers' BFL-layout converter hard-codes full-size FLUX
    widths (3072/12288) when splitting the single blocks' linear1, so a tiny model cannot go
    through it.
    """
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dev, subfolder="transformer")
    single = tmp_path / "flux-tiny.safetensors"
    save_file(transformer.state_dict(), single)
    run_sample(make_cfg(single, tmp_path / "single", prompt=PROMPTS[:1], base_components=str(tiny_flux_dev)),
               accelerator)

    loaded = load_transformer(str(single), base_components=str(tiny_flux_dev), dtype=torch.float32).state_dict()
    assert loaded.keys() == transformer.state_dict().keys()
    assert all(torch.equal(loaded[key], value) for key, value in transformer.state_dict().items())
    image = tmp_path / "single" / "0000-base.png"
    # the same weights at other addresses, where CPUs with AVX-512 can take other kernels: 1 pixel in 12,288 was
    # 1 off on one such machine
    assert np.abs(pixels(image) - reference(tiny_flux_dev, PROMPTS[0], 0)).max() <= 1
    assert Image.open(image).text["base_components"] == str(tiny_flux_dev)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def test_pngs_index_and_grid_record_how_each_image_was_made(tiny_flux_dev, loras, tmp_path, accelerator):
    run_sample(make_cfg(tiny_flux_dev, tmp_path, lora=[loras["a"]], lora_scale=[0.8], compare=True, seed=[3]),
               accelerator)

    rows = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [(row["index"], row["variant"]) for row in rows] == [(0, "base"), (0, "lora"), (1, "base"), (1, "lora")]
    for row in rows:
        text = Image.open(tmp_path / row["file"]).text
        expected = {"prompt": PROMPTS[row["index"]], "seed": "3", "width": "64", "height": "64",
                    "num_inference_steps": "2", "guidance_scale": "3.5", "max_sequence_length": "32",
                    "mixed_precision": "no", "quantize": "none", "model": str(tiny_flux_dev),
                    "variant": row["variant"]}
        assert {key: text[key] for key in expected} == expected
        assert json.loads(text["loras"]) == ([{"path": loras["a"], "scale": 0.8}] if row["variant"] == "lora" else [])
        assert row["seed"] == 3 and row["loras"] == json.loads(text["loras"])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted([r["file"] for r in rows] + ["grid.png"])

    # A row per variant, a 256 px cell per prompt (under an 18 px label), base first.
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    assert grid.size == (2 * 256, 2 * (256 + 18))
    base_cell = np.asarray(grid.crop((0, 18, 256, 18 + 256)), dtype=np.int16)
    first_base = Image.open(tmp_path / "0000-base.png").convert("RGB").resize((256, 256))
    assert np.array_equal(base_cell, np.asarray(first_base, dtype=np.int16))


def test_jsonl_prompts_set_their_own_seed_size_steps_and_guidance(tiny_flux_dev, tmp_path, accelerator):
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text(json.dumps({"prompt": PROMPTS[0], "seed": 11, "width": 96, "height": 48,
                                       "num_inference_steps": 3, "guidance_scale": 5.0}) + "\n\n"
                           + json.dumps({"prompt": PROMPTS[1]}) + "\n")
    cfg = make_cfg(tiny_flux_dev, tmp_path / "out", prompt=["a tree"], prompt_file=str(prompt_file),
                   seed=[100, 200])
    jobs = read_prompts(cfg)
    # flag prompts first, each with every --seed unless its line sets its own
    assert [(j.prompt, j.seed, j.width, j.height, j.num_inference_steps, j.guidance_scale) for j in jobs] == [
        ("a tree", 100, 64, 64, 2, 3.5), ("a tree", 200, 64, 64, 2, 3.5),
        (PROMPTS[0], 11, 96, 48, 3, 5.0),
        (PROMPTS[1], 100, 64, 64, 2, 3.5), (PROMPTS[1], 200, 64, 64, 2, 3.5)]
    assert [job.index for job in jobs] == list(range(5))

    cfg.prompt, cfg.seed = [], [100]
    run_sample(cfg, accelerator)
    assert Image.open(tmp_path / "out" / "0000-base.png").size == (96, 48)
    assert np.array_equal(pixels(tmp_path / "out" / "0000-base.png"),
                          reference(tiny_flux_dev, PROMPTS[0], 11, width=96, height=48, num_inference_steps=3,
                                    guidance_scale=5.0))
    assert np.array_equal(pixels(tmp_path / "out" / "0001-base.png"), reference(tiny_flux_dev, PROMPTS[1], 100))


def test_a_text_prompt_file_has_one_prompt_a_line(tiny_flux_dev, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(f"{PROMPTS[0]}\n\n  {PROMPTS[1]}  \n")
    jobs = read_prompts(make_cfg(tiny_flux_dev, tmp_path, prompt=[], prompt_file=str(prompt_file), seed=[4]))
    assert [(job.prompt, job.seed) for job in jobs] == [(PROMPTS[0], 4), (PROMPTS[1], 4)]
    # a file of JSON lines under another name is read as JSONL (its first line starts with "{")
    prompt_file.write_text('\n{"prompt": "a fox", "seed": 9}\n')
    jobs = read_prompts(make_cfg(tiny_flux_dev, tmp_path, prompt=[], prompt_file=str(prompt_file), seed=[4]))
    assert [(job.prompt, job.seed) for job in jobs] == [("a fox", 9)]


def test_each_prompt_is_rendered_once_per_seed(tiny_flux_dev, tmp_path):
    cfg = parse_config(SampleConfig, argv(tiny_flux_dev, tmp_path, "--prompt", *PROMPTS, "--seed", "5", "1", "9"))
    assert [(job.index, job.prompt, job.seed) for job in read_prompts(cfg)] == [
        (0, PROMPTS[0], 5), (1, PROMPTS[0], 1), (2, PROMPTS[0], 9),
        (3, PROMPTS[1], 5), (4, PROMPTS[1], 1), (5, PROMPTS[1], 9)]


def test_batches_give_each_prompt_its_batch_of_one_image(tiny_flux_dev, accelerator):
    pipe = load_pipeline(make_cfg(tiny_flux_dev, "unused"), accelerator.device)
    calls = []

    def counting(**kwargs):
        calls.append(len(kwargs["prompt"]))
        return pipe(**kwargs)

    settings = {"num_inference_steps": 2, "guidance_scale": 3.5}
    jobs = [PromptJob(0, PROMPTS[0], 1, 64, 64, **settings), PromptJob(1, PROMPTS[1], 2, 64, 64, **settings),
            PromptJob(2, PROMPTS[0], 3, 64, 64, **settings), PromptJob(3, PROMPTS[1], 4, 48, 64, **settings)]
    batched = render_jobs(counting, jobs, batch_size=2, max_sequence_length=32, device=accelerator.device)
    assert calls == [2, 1, 1]  # a batch holds only jobs of the same size
    single = render_jobs(pipe, jobs, batch_size=1, max_sequence_length=32, device=accelerator.device)

    for one, many in zip(single, batched):
        one, many = np.asarray(one, dtype=np.int16), np.asarray(many, dtype=np.int16)
        assert one.shape == many.shape
        assert np.abs(one - many).max() <= 1  # batched matmuls round differently, nothing more
    # and each job keeps its own seed: images of one prompt with two seeds differ
    assert np.abs(np.asarray(single[0], dtype=np.int16) - np.asarray(single[2], dtype=np.int16)).mean() > 5


def test_compile_gives_every_block_the_graph_passes(tiny_flux_dev, loras, monkeypatch, accelerator):
    """--compile: diffusers' regional compile of each block, with the training's graph passes (among them the
    one that runs the unfused LoRAs' sibling down projections as one GEMM; tests/test_graph_passes.py checks the
    passes themselves). torch.compile is stubbed: the options are what is checked."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append((self, kwargs)))
    pipe = load_pipeline(make_cfg(tiny_flux_dev, "unused", lora=[loras["a"]], compile=True), accelerator.device)

    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    assert [module for module, _ in calls] == blocks
    for _, kwargs in calls:
        assert kwargs == {"fullgraph": True, "options": BLOCK_COMPILE_OPTIONS}


# ---------------------------------------------------------------------------------------------
# Low memory
# ---------------------------------------------------------------------------------------------


def test_fp8_storage_stays_close_to_bf16(tiny_flux_dev, loras, tmp_path, accelerator):
    bf16 = {**FAST, "mixed_precision": "bf16"}
    pipe = load_pipeline(make_cfg(tiny_flux_dev, tmp_path, lora=[loras["a"]], quantize="fp8", **bf16),
                         accelerator.device)
    linear = pipe.transformer.transformer_blocks[0].attn.to_q
    assert linear.base_layer.weight_fp8.dtype == torch.float8_e4m3fn  # stored in fp8, one copy (no backward)
    assert linear.base_layer.weight_t_fp8 is None
    assert linear.lora_A["lora0"].weight.dtype == torch.bfloat16  # LoRA layers are left alone

    images = {}
    for quantize in ("none", "fp8"):
        out = tmp_path / quantize
        run_sample(make_cfg(tiny_flux_dev, out, prompt=PROMPTS[:1], lora=[loras["a"]], compare=True,
                            quantize=quantize, **bf16), accelerator)
        images[quantize] = {v: pixels(out / f"0000-{v}.png") for v in ("base", "lora")}
    for variant in ("base", "lora"):
        assert np.abs(images["fp8"][variant] - images["none"][variant]).mean() < 3, variant
    assert np.abs(images["fp8"]["lora"] - images["fp8"]["base"]).mean() > 5  # the LoRA still acts


@pytest.mark.gpu
def test_nf4_runs_on_the_gpu_with_the_lora_acting(tiny_flux_dev, loras, tmp_path):
    import bitsandbytes as bnb

    reset_accelerate()
    accelerator = Accelerator()
    bf16 = {**FAST, "mixed_precision": "bf16", "prompt": PROMPTS[:1], "lora": [loras["a"]], "compare": True}
    cfg = make_cfg(tiny_flux_dev, tmp_path / "nf4", quantize="nf4", **bf16)
    pipe = load_pipeline(cfg, accelerator.device)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer, bnb.nn.Linear4bit)
    del pipe
    run_sample(cfg, accelerator)
    run_sample(make_cfg(tiny_flux_dev, tmp_path / "bf16", **bf16), accelerator)

    nf4, reference_lora, reference_base = (pixels(tmp_path / folder / f"0000-{variant}.png") for folder, variant in
                                           (("nf4", "lora"), ("bf16", "lora"), ("bf16", "base")))
    # 4-bit weights move the image, but it stays the LoRA's image
    assert np.abs(nf4 - reference_lora).mean() < np.abs(nf4 - reference_base).mean()


@pytest.mark.parametrize("option", [{"quantize": "nf4"}, {"cpu_offload": True}])
def test_gpu_only_options_without_cuda_name_the_flag(tiny_flux_dev, tmp_path, monkeypatch, option):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=f"^--{next(iter(option))}: needs a CUDA GPU"):
        make_cfg(tiny_flux_dev, tmp_path, **option)


# ---------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------


def test_sizes_not_multiples_of_16_are_refused(tiny_flux_dev, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(SampleConfig, argv(tiny_flux_dev, tmp_path, "--prompt", "x", "--width", "72"))
    assert exit_info.value.code == 2
    assert "--width: 72 is not a positive multiple of 16" in capsys.readouterr().err

    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "height": 100}) + "\n")
    with pytest.raises(ConfigError, match=r"^--prompt_file: .*prompts.jsonl, line 2: --height: 100 is not a "
                                          r"positive multiple of 16"):
        read_prompts(make_cfg(tiny_flux_dev, tmp_path, prompt=[], prompt_file=str(prompt_file)))


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "steps": 4}', r"unknown keys \['steps'\]"),
    ('{"prompt": "a", "seed": 1.5}', "seed must be an integer, not 1.5"),
    ('{"prompt": "a", "seed": true}', "seed must be an integer, not True"),
    ('{"prompt": "a", "guidance_scale": "high"}', "guidance_scale must be a number"),
    ('{"prompt": "a", "num_inference_steps": 0}', "num_inference_steps must be at least 1"),
    ('{"seed": 3}', 'needs a "prompt" string'),
    ('{"prompt": "a",', "not JSON"),
])
def test_bad_jsonl_lines_name_the_file_and_line(tiny_flux_dev, tmp_path, line, message):
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=f"^--prompt_file: .*prompts.jsonl, line 2: {message}"):
        read_prompts(make_cfg(tiny_flux_dev, tmp_path, prompt=[], prompt_file=str(prompt_file)))


def test_missing_model_and_lora_files_name_the_flag(tiny_flux_dev, tmp_path, capsys):
    cases = [(["--pretrained_model_name_or_path", str(tmp_path / "nowhere.safetensors")],
              "--pretrained_model_name_or_path: "),
             (["--lora", str(tmp_path / "missing.safetensors")], "--lora: "),
             (["--pretrained_model_name_or_path", str(tiny_flux_dev / "transformer" / "config.json"),
               "--base_components", str(tmp_path / "nowhere")], "--base_components: ")]
    for extra, flag in cases:
        with pytest.raises(SystemExit) as exit_info:
            parse_config(SampleConfig, argv(tiny_flux_dev, tmp_path, "--prompt", "x", *extra))
        assert exit_info.value.code == 2
        assert f"error: {flag}" in capsys.readouterr().err


def test_models_that_do_not_load_name_the_flag(tiny_flux_dev, tmp_path, capsys):
    # a hub id that is not in the cache (offline), a folder that is not a pipeline, a file that is
    # not a transformer
    not_a_transformer = tmp_path / "lora.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, not_a_transformer)
    cases = [("nobody-here/no-such-flux", "--pretrained_model_name_or_path: cannot load nobody-here/no-such-flux"),
             (str(tmp_path), "--pretrained_model_name_or_path: cannot load"),
             (str(not_a_transformer), "--pretrained_model_name_or_path: .* is not a FLUX.1 transformer checkpoint")]
    for model, message in cases:
        reset_accelerate()
        status = sample.main(argv(model, tmp_path / "out", "--prompt", "x", "--base_components", str(tiny_flux_dev)))
        assert status == 2
        err = capsys.readouterr().err
        assert err.startswith("sample.py: error: ") and re.search(message, err), err


def test_a_lora_of_another_model_names_lora(tiny_flux_dev, tmp_path, capsys):
    """A LoRA of a transformer with half the width: same module names, other sizes."""
    narrow = FluxTransformer2DModel(**{**transformer_config("dev"), "num_attention_heads": 2})
    narrow.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(DEFAULT_LORA_LAYERS)))
    path = save_lora(tmp_path / "narrow.safetensors", narrow)
    reset_accelerate()
    assert sample.main(argv(tiny_flux_dev, tmp_path / "out", "--prompt", "x", "--lora", str(path))) == 2
    err = capsys.readouterr().err
    assert f"--lora: file {path} does not fit the model: layer sizes differ" in err
    assert "transformer.single_transformer_blocks.0.attn.to_q: LoRA maps 32 -> 32 features, the layer 64 -> 64" in err
    assert not (tmp_path / "out" / "0000-lora.png").exists()


# ---------------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_write_each_image_once_and_as_one_process_does(tiny_flux_dev, loras, tmp_path, accelerator):
    prompts = ["a red circle", "a blue square", "a green tree"]  # 2 + 1: an uneven split
    flags = argv(tiny_flux_dev, tmp_path / "two", "--prompt", *prompts, "--lora", loras["a"], "--compare")
    env = repo_env()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "sample.py"), *flags], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    run_sample(make_cfg(tiny_flux_dev, tmp_path / "one", prompt=prompts, lora=[loras["a"]], compare=True),
               accelerator)

    rows = [json.loads(line) for line in (tmp_path / "two" / "index.jsonl").read_text().splitlines()]
    files = [row["file"] for row in rows]
    assert len(files) == len(set(files)) == 6  # each (prompt, variant) once
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(files + ["grid.png", "index.jsonl"])
    assert (tmp_path / "one" / "index.jsonl").read_text() == (tmp_path / "two" / "index.jsonl").read_text()
    for name in files + ["grid.png"]:
        assert np.array_equal(pixels(tmp_path / "one" / name), pixels(tmp_path / "two" / name)), name
