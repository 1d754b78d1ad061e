"""Seconds per 1024 px, 28-step image: sample.py's rendering code beside a plain FluxPipeline call,
on FLUX.1-dev's full architecture with random weights (T5-XXL, CLIP-L, VAE, transformer), one process.

    python bench/bench_sample.py [--images 3] [--compile] [--lora] [--fp8]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.full_flux import random_pipeline  # noqa: E402
from fluxlora import fp8  # noqa: E402
from fluxlora.models import attention_backends, cublas_without_workspace  # noqa: E402
from fluxlora.prompts import PromptJob  # noqa: E402
from fluxlora.config import DEFAULT_LORA_LAYERS  # noqa: E402
from fluxlora.sampling import compile_for_sampling, render_jobs, use_loras  # noqa: E402

PROMPT = "a lighthouse on a cliff above a stormy sea at dusk, oil painting"


def timed(fn, images: int) -> float:
    fn(0)  # warm-up: kernels, allocator, compilation
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(images):
        fn(i + 1)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / images


def random_lora(transformer: torch.nn.Module, rank: int = 16) -> dict[str, torch.Tensor]:
    """A rank-`rank` LoRA on the trainer's default layers, as load_lora_weights takes it (bf16, on the GPU)."""
    state = {}
    for name, module in transformer.named_modules():
        targeted = any(name == p or name.endswith("." + p) for p in DEFAULT_LORA_LAYERS)  # as peft matches them
        if isinstance(module, torch.nn.Linear) and targeted:
            for part, shape in (("lora_A", (rank, module.in_features)), ("lora_B", (module.out_features, rank))):
                weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.01
                state[f"transformer.{name}.{part}.weight"] = weight
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--compile", action="store_true", help="sample.py --compile (regional torch.compile)")
    ap.add_argument("--lora", action="store_true", help="then also with a random rank-16 LoRA: as adapters, "
                                                           "then fused (sample.py's default)")
    ap.add_argument("--fp8", action="store_true", help="then also sample.py --quantize fp8")
    args = ap.parse_args()
    device = torch.device("cuda")
    cublas_without_workspace(device)  # as sample.py does, before the first matmul (all rows)
    pipe = random_pipeline("cuda")
    pipe.set_progress_bar_config(disable=True)
    card = torch.cuda.get_device_name()
    common = dict(height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=3.5)

    def plain(seed: int) -> None:
        with attention_backends(device):
            pipe(prompt=PROMPT, generator=torch.Generator("cuda").manual_seed(seed), **common)

    def ours(seed: int) -> None:
        job = PromptJob(index=0, prompt=PROMPT, seed=seed, width=args.size, height=args.size,
                        num_inference_steps=args.steps, guidance_scale=3.5)
        render_jobs(pipe, [job], batch_size=1, max_sequence_length=512, device=device)

    rows = [("FluxPipeline", plain), ("fluxlora sample.py", ours)]
    for name, fn in rows:
        sec = timed(fn, args.images)
        print(json.dumps(dict(impl=name, card=card, size=args.size, steps=args.steps, compiled=False,
                              s_per_image=round(sec, 3), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))),
              flush=True)
    if args.compile:
        compile_for_sampling(pipe.transformer)
        sec = timed(ours, args.images)
        print(json.dumps(dict(impl="fluxlora sample.py", card=card, size=args.size, steps=args.steps, compiled=True,
                              s_per_image=round(sec, 3))), flush=True)
    if args.lora:
        pipe.load_lora_weights(random_lora(pipe.transformer), adapter_name="lora0")
        for fuse in (False, True):
            use_loras(pipe, fuse)
            sec = timed(ours, args.images)
            print(json.dumps(dict(impl=f"fluxlora sample.py --lora --{'' if fuse else 'no-'}fuse_lora", card=card,
                                  size=args.size, steps=args.steps, compiled=args.compile, s_per_image=round(sec, 3))),
                  flush=True)
    if args.fp8:  # sample.py --quantize fp8 (as load_pipeline applies it), compiled as above if --compile
        fp8.quantize_blocks(pipe.transformer, device, keep_transpose=False)
        torch.cuda.reset_peak_memory_stats()
        sec = timed(ours, args.images)
        print(json.dumps(dict(impl="fluxlora sample.py --quantize fp8", card=card, size=args.size, steps=args.steps,
                              compiled=args.compile, s_per_image=round(sec, 3),
                              peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))), flush=True)


if __name__ == "__main__":
    main()
