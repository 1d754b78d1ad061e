"""precompute_embeddings' throughput on FLUX.1-dev's full VAE, CLIP and T5-XXL (random weights),
beside the naive loop (one `encode_prompt` and one `vae.encode` per image), in one process.

    python bench/bench_precompute.py --images 256 --res 1024

Images are synthetic JPEGs of varied sizes and aspect ratios with distinct captions. Prints one
JSON line per implementation: images/s of the encoding phase (model loading excluded, reported
apart), and for fluxlora also end to end. The random model is written to --workdir once and reused by
later runs; `--no_naive` times fluxlora alone (for A/B runs of its variants).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402

from bench.full_flux import save_without_transformer  # noqa: E402
from fluxlora import buckets, precompute  # noqa: E402
from fluxlora.config import PrecomputeConfig  # noqa: E402
from fluxlora.data import load_image  # noqa: E402

WORDS = ("red blue green golden misty quiet old new bright dark river mountain city street forest cat dog "
         "portrait studio light evening morning painting photo sketch warm cold tall small wide lake tower").split()


def make_dataset(folder: Path, count: int, res: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        w, h = rng.choice([(1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2)])
        scale = rng.uniform(1.0, 1.5) * res / (w * h) ** 0.5
        size = (int(w * scale), int(h * scale))
        gradient = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None] * np.ones((size[1], 1, 3))
        noise = np.random.default_rng(i).normal(0, 20, (size[1], size[0], 3))
        Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
        caption = f"image {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
        (folder / f"{i:05d}.txt").write_text(caption)
    return folder


def timed_phases(record: dict) -> None:
    """Inside precompute.run, count model loading apart from encoding (`load_s`), and time the text
    and image phases, which run concurrently (`text_s`, `images_s`: each from its start to its end)."""
    # (function, record key, synchronize after it): the loads queue uploads; the phases wait for their own
    # results, and a device-wide sync would wait for the other phase's work too
    for name, key, sync in (("_load_text_pipeline", "load_s", True), ("_load_vae", "load_s", True),
                            ("_text_phase", "text_s", False), ("_image_phase", "images_s", False)):
        real = getattr(precompute, name)

        def wrapper(*args, _real=real, _key=key, _sync=sync, **kwargs):
            start = time.perf_counter()
            out = _real(*args, **kwargs)
            if _sync:
                torch.cuda.synchronize()
            record[_key] = record.get(_key, 0.0) + time.perf_counter() - start
            return out

        setattr(precompute, name, wrapper)


def bench_fluxlora(model: Path, data: Path, out: Path, res: int, images: int) -> dict:
    record = {"load_s": 0.0}
    timed_phases(record)
    cfg = PrecomputeConfig(dataset=str(data), embeddings_dir=str(out), pretrained_model_name_or_path=str(model),
                           resolutions=[res])
    cfg.validate()
    torch.cuda.synchronize()
    start = time.perf_counter()
    precompute.run(cfg, Accelerator())
    total = time.perf_counter() - start
    encode = total - record["load_s"]
    return dict(impl="fluxlora", images=images, res=res, total_s=round(total, 2), load_s=round(record["load_s"], 2),
                text_s=round(record.get("text_s", 0.0), 2), images_s=round(record.get("images_s", 0.0), 2),
                img_per_s=round(images / encode, 2), img_per_s_end_to_end=round(images / total, 2))


@torch.inference_mode()
def bench_naive(model: Path, data: Path, res: int, images: int) -> dict:
    from diffusers import FluxPipeline

    start = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(model, transformer=None, dtype=torch.bfloat16).to("cuda")
    torch.cuda.synchronize()
    load = time.perf_counter() - start
    start = time.perf_counter()
    for path in sorted(data.glob("*.jpg")):
        caption = path.with_suffix(".txt").read_text()
        pipe.encode_prompt(prompt=caption, prompt_2=None, max_sequence_length=512)
        image = load_image(path.read_bytes(), str(path))
        bucket = buckets.nearest_bucket(*image.size, res)
        pixels = buckets.pixels_to_tensor(buckets.resize_to_bucket(image, bucket))[None]
        pipe.vae.encode(pixels.to("cuda", torch.bfloat16)).latent_dist.mean.cpu()
    torch.cuda.synchronize()
    sec = time.perf_counter() - start
    return dict(impl="naive", images=images, res=res, total_s=round(sec + load, 2), load_s=round(load, 2),
                img_per_s=round(images / sec, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--workdir", default="/tmp/bench-precompute")
    ap.add_argument("--no_naive", action="store_true", help="skip the naive loop (an A/B of fluxlora variants)")
    args = ap.parse_args()
    work = Path(args.workdir)
    for stale in ("cache", "data"):  # a cache left by an earlier run would be reused, not timed
        shutil.rmtree(work / stale, ignore_errors=True)
    model = work / "flux-random"
    if not (model / "complete").exists():  # the random model (~10 GB) is reused by later runs
        shutil.rmtree(model, ignore_errors=True)
        save_without_transformer(model)
        (model / "complete").touch()
    torch.cuda.empty_cache()
    data = make_dataset(work / "data", args.images, args.res)
    card = torch.cuda.get_device_name()
    if not args.no_naive:
        print(json.dumps({**bench_naive(model, data, args.res, args.images), "card": card}), flush=True)
        torch.cuda.empty_cache()
    print(json.dumps({**bench_fluxlora(model, data, work / "cache", args.res, args.images), "card": card}),
          flush=True)


if __name__ == "__main__":
    main()
