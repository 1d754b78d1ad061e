"""Rendering images through diffusers' FluxPipeline: previews during training and sample.py.

Previews need no text encoder: the cached T5/CLIP embeddings of the validation prompts go in as
`prompt_embeds`/`pooled_prompt_embeds`, and the pipeline is built around the training transformer.

sample.py renders with FluxPipeline itself, loaded and called as a diffusers user would (LoRAs
through `load_lora_weights` and `set_adapters`, then merged by `fuse_lora` unless --no-fuse_lora), so
its images are exactly diffusers' for the same model, prompt, seed and settings; its work is what
surrounds that: prompts and per-prompt settings, single-file and quantised transformers, LoRA files
of other tools, several processes, and outputs that record how each image was made.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import (
    AutoencoderKL,
    BitsAndBytesConfig,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from PIL import Image, ImageDraw, PngImagePlugin

from . import fp8
from .config import MAX_SEQUENCE_LENGTH, ConfigError, SampleConfig
from .graph_passes import BLOCK_COMPILE_OPTIONS
from .lora_io import TRANSFORMER_PREFIX, check_lora_keys, detect_format, read_lora, read_lora_as_diffusers
from .models import DTYPES, attention_backends, cublas_without_workspace, load_transformer, unloadable_message
from .prompts import PromptJob, read_prompts


def embeddings_pipeline(transformer: FluxTransformer2DModel, vae: AutoencoderKL,
                        scheduler: FlowMatchEulerDiscreteScheduler) -> FluxPipeline:
    """A FluxPipeline without text encoders, for prompts given as cached embeddings."""
    return FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)


@torch.no_grad()
def render_from_embeddings(pipe: FluxPipeline, embeddings: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                           width: int, height: int, steps: int, guidance_scale: float, seed: int,
                           device: torch.device) -> list[Image.Image]:
    """One image per (T5 [L,D], CLIP [P]) pair; prompt i uses seed + i, so rounds are comparable."""
    images = []
    for i, (t5, clip) in enumerate(embeddings):
        generator = torch.Generator(device=device).manual_seed(seed + i)
        out = pipe(prompt_embeds=t5[None].to(device, pipe.transformer.dtype),
                   pooled_prompt_embeds=clip[None].to(device, pipe.transformer.dtype),
                   width=width, height=height, num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=generator)
        images.append(out.images[0])
    return images


def save_png(image: Image.Image, path: str | Path, info: Mapping[str, Any]) -> Path:
    """Save a PNG whose text chunks record how it was made (prompt, seed, settings, LoRAs)."""
    meta = PngImagePlugin.PngInfo()
    for key, value in info.items():
        meta.add_text(str(key), str(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=meta)
    return path


def image_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] = (), cell: int = 256) -> Image.Image:
    """Rows of images scaled to `cell` px high, each row headed by its label."""
    label_h = 18 if labels else 0
    scaled = [[im.resize((max(1, round(im.width * cell / im.height)), cell)) for im in row] for row in rows]
    width = max((sum(im.width for im in row) for row in scaled), default=cell)
    grid = Image.new("RGB", (width, len(scaled) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(scaled):
        top = r * (cell + label_h)
        if labels:
            draw.text((4, top + 3), labels[r], fill="black")
        x = 0
        for im in row:
            grid.paste(im.convert("RGB"), (x, top + label_h))
            x += im.width
    return grid


def _lora_for_diffusers(transformer: FluxTransformer2DModel, path: str) -> str | dict[str, torch.Tensor]:
    """What `load_lora_weights` gets for a LoRA file, once it is known to fit the transformer.

    A diffusers-format file with `transformer.` keys (this toolkit's, diffusers', ai-toolkit's) goes
    in by path, so diffusers reads it exactly as `load_lora_weights(path)` does, alpha from its
    header included. Other files (kohya sd-scripts, unprefixed keys) go through lora_io: diffusers'
    own kohya converter assumes full-size widths and drops the final layer, and it skips keys
    without the prefix. Checking first also stops diffusers from silently widening the
    transformer's layers to fit a LoRA of another shape (its route for FLUX Control LoRAs).
    """
    try:
        state, _ = read_lora(path)
        check_lora_keys(transformer, state, source=f"file {path}")
        if detect_format(state) == "diffusers" and all(key.startswith(TRANSFORMER_PREFIX) for key in state):
            return path
        return read_lora_as_diffusers(path)
    except ValueError as err:
        raise ConfigError("lora", str(err)) from None


def load_pipeline(cfg: SampleConfig, device: torch.device) -> FluxPipeline:
    """FluxPipeline with the LoRAs loaded as adapters at their scales, then the memory and speed options."""
    dtype = DTYPES[cfg.mixed_precision]
    components = cfg.components
    quantization = None
    if cfg.quantize == "nf4":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    transformer = load_transformer(cfg.pretrained_model_name_or_path, base_components=cfg.base_components,
                                   revision=cfg.revision, variant=cfg.variant, dtype=dtype,
                                   quantization_config=quantization)
    try:
        pipe = FluxPipeline.from_pretrained(components, transformer=transformer, revision=cfg.revision,
                                            variant=cfg.variant, dtype=dtype)
    except OSError as err:
        raise ConfigError("base_components" if cfg.single_file else "pretrained_model_name_or_path",
                          unloadable_message(components, err)) from None
    names = [f"lora{i}" for i in range(len(cfg.lora))]
    for name, path in zip(names, cfg.lora):
        pipe.load_lora_weights(_lora_for_diffusers(pipe.transformer, path), adapter_name=name)
    if names:
        pipe.set_adapters(names, adapter_weights=cfg.lora_scales)
    if cfg.quantize == "fp8":
        # After the LoRAs (peft would give adapters loaded later the fp8 dtype). Inference needs no
        # transposed copy: half the bf16 memory, and fp8 matmuls where the GPU has them.
        fp8.quantize_blocks(pipe.transformer, device, keep_transpose=False, move=not cfg.cpu_offload)
    if cfg.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()
    if cfg.compile:
        compile_for_sampling(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compile_for_sampling(transformer: FluxTransformer2DModel) -> None:
    """diffusers' regional compile (each block type once), with the blocks' graph passes as in training
    (graph_passes): among them, the down projections of unfused LoRAs on sibling layers (and of several
    adapters) as one GEMM: 1024 px with one LoRA 4.13 -> 4.10 s per image on an H200 (bench/RESULTS.md, session 11)."""
    transformer.compile_repeated_blocks(fullgraph=True, options=BLOCK_COMPILE_OPTIONS)


def use_loras(pipe: FluxPipeline, fuse: bool) -> None:
    """Turn the loaded LoRAs on. With `fuse`, merge them (at their set_adapters scales) into the
    transformer's weights and drop the adapter layers, as `pipe.fuse_lora(); pipe.unload_lora_weights()`:
    no LoRA matmuls per step (one rank-16 LoRA cost 9% of a compiled 1024 px image, bench/RESULTS.md
    session 11); each weight is rounded to its dtype once, as when ComfyUI applies a LoRA."""
    pipe.enable_lora()
    if fuse:
        pipe.fuse_lora()
        pipe.unload_lora_weights()


def render_jobs(pipe: FluxPipeline, jobs: Sequence[PromptJob], *, batch_size: int, max_sequence_length: int,
                device: torch.device) -> list[Image.Image]:
    """The jobs' images in order, from calls of up to `batch_size` consecutive jobs of equal settings.

    Each job's noise comes from its own generator (FluxPipeline draws one latent per generator), so
    batching changes an image only by float rounding. Generators are on the CPU, so a seed starts
    from the same noise on any device.
    """
    def settings(job: PromptJob) -> tuple[int, int, int, float]:
        return job.width, job.height, job.num_inference_steps, job.guidance_scale

    images: list[Image.Image] = []
    for (width, height, steps, guidance), same in itertools.groupby(jobs, key=settings):
        same = list(same)
        for start in range(0, len(same), batch_size):
            group = same[start:start + batch_size]
            with attention_backends(device, cudnn=True):
                out = pipe(prompt=[job.prompt for job in group], width=width, height=height,
                           num_inference_steps=steps, guidance_scale=guidance,
                           max_sequence_length=max_sequence_length,
                           generator=[torch.Generator().manual_seed(job.seed) for job in group])
            images += out.images
    return images


def _merge_outputs(out: Path, num_processes: int, variants: Sequence[str], labels: Sequence[str]) -> None:
    """Main process: the processes' index parts into index.jsonl, and grid.png with a row per variant."""
    rows = []
    for i in range(num_processes):
        part = out / f"index.part{i}.jsonl"
        rows += [json.loads(line) for line in part.read_text().splitlines()]
        part.unlink()
    rows.sort(key=lambda row: (row["index"], variants.index(row["variant"])))
    (out / "index.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    grid = [[Image.open(out / row["file"]) for row in rows if row["variant"] == v] for v in variants]
    image_grid(grid, labels).save(out / "grid.png")


def run_sample(cfg: SampleConfig, accelerator: Accelerator) -> Path:
    """Render every job once across processes; write PNGs, index.jsonl and grid.png to --output_dir.

    Process p renders jobs p, p + n, ... (n processes); with --compare it renders each of them
    without and with the LoRAs, same seeds. Returns the output folder.
    """
    out = Path(cfg.output_dir)
    jobs = read_prompts(cfg)
    mine = jobs[accelerator.process_index::accelerator.num_processes]
    cublas_without_workspace(accelerator.device)  # as the trainer (and so its previews) runs
    pipe = load_pipeline(cfg, accelerator.device)
    guidance_embeds = pipe.transformer.config.guidance_embeds
    max_sequence_length = cfg.max_sequence_length or MAX_SEQUENCE_LENGTH["dev" if guidance_embeds else "schnell"]
    loras = [{"path": path, "scale": scale} for path, scale in zip(cfg.lora, cfg.lora_scales)]
    variants = (["base"] if cfg.compare or not cfg.lora else []) + (["lora"] if cfg.lora else [])
    settings = {"model": cfg.pretrained_model_name_or_path,
                **({"base_components": cfg.base_components} if cfg.single_file else {}),
                "max_sequence_length": max_sequence_length, "mixed_precision": cfg.mixed_precision,
                "quantize": cfg.quantize}
    out.mkdir(parents=True, exist_ok=True)
    fuse = cfg.fuse_lora and cfg.quantize == "none"  # quantized weights keep the LoRAs as adapters
    rows = []
    for variant in variants:  # "base" first: fusing is for good
        if variant == "lora":
            use_loras(pipe, fuse)
        elif cfg.lora:
            pipe.disable_lora()
        images = render_jobs(pipe, mine, batch_size=cfg.batch_size, max_sequence_length=max_sequence_length,
                             device=accelerator.device)
        for job, image in zip(mine, images):
            row = {**asdict(job), **settings, "variant": variant, "loras": loras if variant == "lora" else [],
                   "lora_fused": variant == "lora" and fuse}
            path = save_png(image, out / f"{job.index:04d}-{variant}.png", {**row, "loras": json.dumps(row["loras"])})
            rows.append({**row, "file": path.name})
    (out / f"index.part{accelerator.process_index}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        named = ", ".join(f"{Path(lora['path']).name} x{lora['scale']:g}" for lora in loras)
        _merge_outputs(out, accelerator.num_processes, variants, [f"{v}: {named}" if v == "lora" else v
                                                                  for v in variants])
    accelerator.wait_for_everyone()
    return out
