"""Rendering images through diffusers' FluxPipeline: previews during training and sample.py.

Previews need no text encoder: the cached T5/CLIP embeddings of the validation prompts go in as
`prompt_embeds`/`pooled_prompt_embeds`, and the pipeline is built around the training transformer.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from PIL import Image, ImageDraw, PngImagePlugin

from .config import SampleConfig
from .lora_io import check_lora_keys, read_lora_as_diffusers
from .models import DTYPES, attention_backends


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


@dataclass(frozen=True)
class PromptJob:
    """One image to render; `index` orders outputs and splits work across processes."""

    index: int
    prompt: str
    seed: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float


def read_prompts(cfg: SampleConfig) -> list[PromptJob]:
    """Prompts from --prompt and --prompt_file (plain lines, or JSONL with per-prompt settings)."""
    rows: list[dict[str, Any]] = [{"prompt": p} for p in cfg.prompt]
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        jsonl = path.suffix == ".jsonl" or (lines and lines[0].lstrip().startswith("{"))
        for number, line in enumerate(lines, 1):
            if not jsonl:
                rows.append({"prompt": line.strip()})
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"--prompt_file {path}, line {number}: not JSON ({err})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"--prompt_file {path}, line {number}: needs a \"prompt\" string")
            for key in ("width", "height"):
                if key in row and (int(row[key]) <= 0 or int(row[key]) % 16):
                    raise ValueError(f"--prompt_file {path}, line {number}: {key} {row[key]} is not a multiple of 16")
            rows.append(row)
    return [PromptJob(index=i, prompt=row["prompt"], seed=int(row.get("seed", cfg.seed + i)),
                      width=int(row.get("width", cfg.width)), height=int(row.get("height", cfg.height)),
                      num_inference_steps=int(row.get("num_inference_steps", cfg.num_inference_steps)),
                      guidance_scale=float(row.get("guidance_scale", cfg.guidance_scale)))
            for i, row in enumerate(rows)]


def load_pipeline(cfg: SampleConfig, device: torch.device) -> FluxPipeline:
    """FluxPipeline with the LoRAs loaded as named adapters at their scales."""
    pipe = FluxPipeline.from_pretrained(cfg.pretrained_model_name_or_path, revision=cfg.revision,
                                        variant=cfg.variant, dtype=DTYPES[cfg.mixed_precision])
    names = []
    for i, path in enumerate(cfg.lora):
        state = read_lora_as_diffusers(path)  # kohya files too: diffusers' own converter drops layers
        check_lora_keys(pipe.transformer, state, source=f"--lora {path}")  # a LoRA of another model
        name = f"lora{i}"
        pipe.load_lora_weights(state, adapter_name=name)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=cfg.lora_scale or [1.0] * len(names))
    if cfg.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()
    if cfg.compile:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_jobs(pipe: FluxPipeline, jobs: Sequence[PromptJob], *, batch_size: int, max_sequence_length: int,
                device: torch.device) -> list[Image.Image]:
    """Render jobs in batches of equal settings; job i's image depends only on its own seed."""
    def settings(job: PromptJob) -> tuple:
        return job.width, job.height, job.num_inference_steps, job.guidance_scale

    images: list[Image.Image] = []
    start = 0
    while start < len(jobs):
        first = jobs[start]
        group = [first]
        while (len(group) < batch_size and start + len(group) < len(jobs)
               and settings(jobs[start + len(group)]) == settings(first)):
            group.append(jobs[start + len(group)])
        with attention_backends(device):
            out = pipe(prompt=[j.prompt for j in group], width=first.width, height=first.height,
                       num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
                       max_sequence_length=max_sequence_length,
                       generator=[torch.Generator(device=device).manual_seed(j.seed) for j in group])
        images += out.images
        start += len(group)
    return images


def run_sample(cfg: SampleConfig, accelerator: Accelerator) -> Path:
    """Render every prompt once across processes; write PNGs, index.jsonl and grid.png."""
    out = Path(cfg.output_dir)
    jobs = read_prompts(cfg)
    mine = [j for j in jobs if j.index % accelerator.num_processes == accelerator.process_index]
    pipe = load_pipeline(cfg, accelerator.device)
    loras = [{"path": str(p), "scale": s} for p, s in zip(cfg.lora, cfg.lora_scale or [1.0] * len(cfg.lora))]
    variants = [("lora" if cfg.lora else "base", True)] + ([("base", False)] if cfg.compare else [])
    rows = []
    for name, with_lora in variants:
        if cfg.lora:
            (pipe.enable_lora if with_lora else pipe.disable_lora)()
        images = render_jobs(pipe, mine, batch_size=cfg.batch_size, max_sequence_length=cfg.max_sequence_length,
                             device=accelerator.device)
        for job, image in zip(mine, images):
            info = {**asdict(job), "model": cfg.pretrained_model_name_or_path,
                    "loras": json.dumps(loras if with_lora else [])}
            path = save_png(image, out / f"{job.index:04d}-{name}.png", info)
            rows.append({**info, "variant": name, "file": path.name})
    part = out / f"index.part{accelerator.process_index}.jsonl"
    part.write_text("".join(json.dumps(r) + "\n" for r in rows))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        merged = []
        for i in range(accelerator.num_processes):
            piece = out / f"index.part{i}.jsonl"
            merged += [json.loads(line) for line in piece.read_text().splitlines()]
            piece.unlink()
        merged.sort(key=lambda r: (r["index"], r["variant"] != "base"))
        (out / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in merged))
        grid_rows = [[Image.open(out / r["file"]) for r in merged if r["variant"] == v] for v, _ in variants]
        image_grid(grid_rows, [v for v, _ in variants]).save(out / "grid.png")
    accelerator.wait_for_everyone()
    return out
