"""Aspect-ratio buckets: which (width, height) an image is trained at, and how it gets there.

FLUX.1 packs the 8x-downsampled VAE latent into 2x2 patches, so both sides of a training image
must be multiples of 16 pixels; a 1024x1024 image becomes 64 * 64 = 4096 transformer tokens.
Rather than cropping every image to a square, each image goes to the bucket (a fixed width and
height near ``resolution**2`` pixels) whose aspect ratio is closest to its own, is scaled to cover
it and centre-cropped. Images in one bucket can then be batched together.

The table rule (``bucket_table``), for a resolution ``R`` and step ``S`` (16):

* for every short side ``s`` that is a multiple of ``S`` and at most ``R``, the long side is the
  largest multiple of ``S`` with ``s * long <= R**2``; so a bucket's area is never above ``R**2``
  and below it by less than ``S * s <= S * R`` pixels (under 1.6 % at 1024, 6.25 % at 256);
* buckets with ``long / s > max_aspect`` are dropped; each landscape bucket is mirrored into a
  portrait one; the table is sorted by aspect ratio (width / height, tallest first).

``(R, R)`` is always in the table (``s = R`` gives ``long = R``), and the long side grows strictly
as the short side shrinks, so no two buckets share an aspect ratio.

``python -m fluxlora.buckets > docs/buckets.md`` regenerates the documented tables.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache

import numpy as np
import PIL.Image
import torch
from PIL import ImageOps

# FLUX.1 needs multiples of 16 pixels: 8x VAE downsampling times 2x2 latent packing.
BUCKET_STEP = 16
DEFAULT_MAX_ASPECT = 4.0
# Images needing more than this much upscaling to cover a bucket are better skipped at that
# resolution: past ~2x the LoRA learns the resampling blur as part of the subject/style. A 300x600
# image needs ~2.4x for the 1024 bucket (skipped there) but only ~1.2x at 512 (kept).
DEFAULT_MAX_UPSCALE = 2.0
# Below this the table degenerates to a handful of buckets; the tiny test pipelines train at 64.
MIN_RESOLUTION = 64
DOCUMENTED_RESOLUTIONS = (512, 768, 1024)


# typed: 512.0 must not hit the cache entry of 512 and skip validation.
@lru_cache(maxsize=64, typed=True)
def _table(resolution: int, max_aspect: float, step: int) -> tuple[tuple[int, int], ...]:
    if step <= 0 or step % BUCKET_STEP != 0:
        raise ValueError(f"bucket step must be a positive multiple of {BUCKET_STEP}, got {step}")
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, numbers.Integral)
        or resolution < MIN_RESOLUTION
        or resolution % step != 0
    ):
        raise ValueError(
            f"--resolutions: {resolution!r} is not a usable training resolution; each must be a "
            f"multiple of {step} and at least {MIN_RESOLUTION} (e.g. 512, 768, 1024)"
        )
    if not max_aspect >= 1.0:
        raise ValueError(f"max_aspect must be >= 1 (long side / short side), got {max_aspect}")
    area = resolution * resolution
    landscape = []
    for short in range(resolution, 0, -step):
        long = (area // short) // step * step
        if long > max_aspect * short:
            break  # the aspect ratio only grows as the short side shrinks
        landscape.append((long, short))
    buckets = set(landscape) | {(h, w) for w, h in landscape}
    return tuple(sorted(buckets, key=lambda wh: wh[0] / wh[1]))


def bucket_table(
    resolution: int, max_aspect: float = DEFAULT_MAX_ASPECT, step: int = BUCKET_STEP
) -> list[tuple[int, int]]:
    """All (width, height) buckets in pixels for one training resolution.

    See the module docstring for the rule. Both sides are multiples of ``step``; every area is
    in ``(resolution**2 - step * resolution, resolution**2]``; aspect ratios lie in
    ``[1 / max_aspect, max_aspect]``; sorted by width / height, ascending; contains
    ``(resolution, resolution)``. Deterministic.

    Raises:
        ValueError: resolution not a multiple of ``step`` or below 64 (message names
            ``--resolutions``), step not a multiple of 16, or ``max_aspect < 1``.
    """
    return list(_table(resolution, float(max_aspect), step))


def nearest_bucket(
    width: int,
    height: int,
    resolution: int,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    step: int = BUCKET_STEP,
) -> tuple[int, int]:
    """The bucket (width, height) whose aspect ratio is nearest the image's in log space.

    Log space makes 2:1 and 1:2 equally far from square. Images more extreme than
    ``max_aspect`` go to the most extreme bucket (and lose more to the crop). On an exact tie
    the taller bucket wins.

    Args:
        width, height: the image size in pixels (after EXIF rotation), both > 0.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(
        _table(resolution, float(max_aspect), step),
        key=lambda wh: abs(math.log(wh[0] / wh[1]) - target),
    )


def upscale_factor(width: int, height: int, bucket: tuple[int, int]) -> float:
    """How much an image of ``width`` x ``height`` pixels must be enlarged to cover ``bucket``.

    ``max(bucket_w / width, bucket_h / height)``: 1.0 or less means no upscaling (downscale
    or exact fit). Compare with ``--max_upscale`` (default ``DEFAULT_MAX_UPSCALE``).
    """
    bucket_w, bucket_h = bucket
    return max(bucket_w / width, bucket_h / height)


def resize_to_bucket(image: PIL.Image.Image, bucket: tuple[int, int]) -> PIL.Image.Image:
    """Scale ``image`` to cover ``bucket`` (keeping its aspect ratio), centre-crop to it exactly.

    Uses ``ImageOps.fit``: it picks the centred crop box in source pixels (sub-pixel accurate)
    and resamples only that box with LANCZOS, which equals scaling by
    ``upscale_factor(...)`` and then centre-cropping, without resampling the discarded margins.

    Returns:
        A new image of exactly ``bucket`` = (width, height) pixels, same mode as ``image``.
    """
    return ImageOps.fit(image, bucket, method=PIL.Image.Resampling.LANCZOS, centering=(0.5, 0.5))


# The VAE's input value of each uint8 level, as diffusers' VaeImageProcessor computes it: uint8 / 255 in
# float32 (numpy's true division), then 2 * x - 1. Looked up rather than recomputed where the pixels are:
# CUDA divides by a Python scalar as a multiplication by its reciprocal, which differs from the division in
# the last bit for 126 of the 256 levels (and, after rounding to bf16, still for one).
_LEVELS = 2.0 * torch.from_numpy(np.arange(256, dtype=np.float32) / np.float32(255.0)) - 1.0


@lru_cache(maxsize=8)
def _levels_on(device: torch.device) -> torch.Tensor:
    # Copied once per device: a blocking copy per batch would wait for all the device work queued before it.
    return _LEVELS.to(device)


def image_to_pixels(image: PIL.Image.Image) -> torch.Tensor:
    """An RGB image's pixels as a uint8 tensor [3, H, W] (channels first, contiguous)."""
    if image.mode != "RGB":
        raise ValueError(f"the VAE needs an RGB image, got mode {image.mode!r}")
    # np.asarray of a PIL image is read-only (torch warns on it); the channels-first copy is ours.
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


def normalize_pixels(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] as the VAE's input: values in [-1, 1] as ``dtype``, on the pixels' device.

    Before the cast, bit-identical to ``diffusers.VaeImageProcessor(do_resize=False).preprocess``:
    ``uint8 / 255`` in float32, then ``2 * x - 1``; on any device.
    """
    if pixels.dtype != torch.uint8:
        raise ValueError(f"normalize_pixels needs uint8 pixels, got {pixels.dtype}")
    return _levels_on(pixels.device)[pixels.int()].to(dtype)


def pixels_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """An RGB image as the VAE's input: float32 tensor [3, H, W] in [-1, 1].

    Bit-identical to ``diffusers.VaeImageProcessor(do_resize=False).preprocess(image)[0]``:
    ``uint8 / 255`` in float32, then ``2 * x - 1``.
    """
    return normalize_pixels(image_to_pixels(image))


def format_bucket_table(
    resolution: int, max_aspect: float = DEFAULT_MAX_ASPECT, step: int = BUCKET_STEP
) -> str:
    """A Markdown table of ``bucket_table(resolution, max_aspect, step)``.

    Columns: width and height (px), aspect ratio (w / h), area as a percentage of
    ``resolution**2``, and the FLUX.1 image sequence length ``(w / 16) * (h / 16)`` tokens.
    """
    area = resolution * resolution
    lines = [
        "| width | height | aspect (w/h) | area (% of res²) | image tokens |",
        "|---:|---:|---:|---:|---:|",
    ]
    for width, height in bucket_table(resolution, max_aspect, step):
        lines.append(
            f"| {width} | {height} | {width / height:.3f} | {100 * width * height / area:.2f} "
            f"| {(width // 16) * (height // 16)} |"
        )
    return "\n".join(lines) + "\n"


def render_bucket_docs(resolutions: tuple[int, ...] = DOCUMENTED_RESOLUTIONS) -> str:
    """The full text of ``docs/buckets.md`` (a test checks the file matches this)."""
    parts = [
        "# Aspect-ratio buckets\n",
        "<!-- Generated by `python -m fluxlora.buckets > docs/buckets.md`; do not edit. -->\n",
        "Every training image is assigned, at each training resolution, to the bucket whose "
        "aspect ratio is nearest its own (in log space, so 2:1 and 1:2 are equally far from "
        "square), scaled to cover the bucket with LANCZOS and centre-cropped to it. Images that "
        f"would need more than `--max_upscale` (default {DEFAULT_MAX_UPSCALE}) enlargement to "
        "cover their bucket are skipped at that resolution.\n",
        "How the table for a resolution R is built (`fluxlora.buckets.bucket_table`, step 16):\n",
        "- both sides are multiples of 16 (FLUX.1: 8x VAE downsampling, then 2x2 patches);\n"
        "- for every short side s <= R (a multiple of 16) the long side is the largest multiple "
        "of 16 with s * long <= R²: a bucket never has more pixels than R², and at most "
        "16 * s fewer;\n"
        f"- aspect ratios run from 1:{DEFAULT_MAX_ASPECT:g} to {DEFAULT_MAX_ASPECT:g}:1; "
        "landscape buckets are mirrored into portrait ones; sorted by width / height.\n",
        "A coarser step (`step=64`) gives fewer buckets, which fills batches larger than 1 "
        "more easily at the cost of more cropping.\n",
    ]
    for resolution in resolutions:
        count = len(bucket_table(resolution))
        parts.append(f"## {resolution} ({count} buckets)\n")
        parts.append(format_bucket_table(resolution))
    return "\n".join(parts)


if __name__ == "__main__":
    print(render_bucket_docs(), end="")
