import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from fluxlora.buckets import (
    bucket_table,
    format_bucket_table,
    image_to_pixels,
    nearest_bucket,
    normalize_pixels,
    pixels_to_tensor,
    render_bucket_docs,
    resize_to_bucket,
    upscale_factor,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "buckets.md"


@pytest.mark.parametrize("res", [64, 256, 512, 768, 1024, 1280, 2048])
def test_table_invariants(res):
    table = bucket_table(res)
    assert (res, res) in table
    assert len(set(table)) == len(table)
    aspects = [w / h for w, h in table]
    assert aspects == sorted(aspects) and len(set(aspects)) == len(aspects)
    for w, h in table:
        assert w % 16 == 0 and h % 16 == 0
        # Never above res^2; below it by less than one step along the short side.
        assert res * res - 16 * min(w, h) < w * h <= res * res
        assert 1 / 4 - 1e-9 <= w / h <= 4 + 1e-9
        # Mirrored: every landscape bucket has its portrait twin.
        assert (h, w) in table


def test_table_reaches_the_aspect_limit_and_respects_max_aspect():
    table = bucket_table(1024)
    assert table[0] == (512, 2048) and table[-1] == (2048, 512)
    narrow = bucket_table(1024, max_aspect=2.0)
    assert all(0.5 <= w / h <= 2.0 for w, h in narrow)
    assert set(narrow) < set(table)
    assert bucket_table(1024, max_aspect=1.0) == [(1024, 1024)]


def test_table_rule_is_the_tightest_fit():
    # For each short side, the long side is the largest multiple of 16 not exceeding res^2.
    for w, h in bucket_table(768):
        short, long = min(w, h), max(w, h)
        assert short * (long + 16) > 768 * 768


def test_coarser_step():
    table = bucket_table(1024, step=64)
    assert (1024, 1024) in table
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in table)
    assert len(table) < len(bucket_table(1024))


@pytest.mark.parametrize("bad", [0, 100, 250, 48, 1000, 512.0, "512"])
def test_bad_resolution_names_the_flag(bad):
    with pytest.raises(ValueError, match="--resolutions"):
        bucket_table(bad)


def test_bad_step_and_aspect():
    with pytest.raises(ValueError, match="step"):
        bucket_table(512, step=8)
    with pytest.raises(ValueError, match="max_aspect"):
        bucket_table(512, max_aspect=0.5)


def test_returned_table_is_a_copy():
    table = bucket_table(512)
    table.clear()
    assert bucket_table(512)


@pytest.mark.parametrize("res", [512, 1024])
def test_nearest_bucket(res):
    assert nearest_bucket(3000, 3000, res) == (res, res)
    assert nearest_bucket(res + 5, res - 5, res) == (res, res)
    w, h = nearest_bucket(1920, 1080, res)
    assert w > h and abs(math.log(w / h) - math.log(16 / 9)) < 0.05
    w, h = nearest_bucket(1080, 1920, res)
    assert h > w and abs(math.log(h / w) - math.log(16 / 9)) < 0.05
    # More extreme than 4:1 goes to the most extreme bucket.
    assert nearest_bucket(10000, 100, res) == bucket_table(res)[-1]
    assert nearest_bucket(100, 10000, res) == bucket_table(res)[0]


def test_nearest_bucket_is_nearest_in_log_space():
    table = bucket_table(768)
    for w, h in [(640, 480), (500, 1200), (1234, 567), (3, 2), (9, 21), (863, 2000), (1059, 300)]:
        best = min(abs(math.log(bw / bh) - math.log(w / h)) for bw, bh in table)
        bw, bh = nearest_bucket(w, h, 768)
        assert abs(math.log(bw / bh) - math.log(w / h)) == best
    # the last two lie where the nearest bucket by plain w / h is another one
    assert nearest_bucket(863, 2000, 768) == (512, 1152)  # by w / h: (496, 1184)
    assert nearest_bucket(1059, 300, 768) == (1472, 400)  # by w / h: (1408, 416)


def test_nearest_bucket_rejects_empty_size():
    with pytest.raises(ValueError):
        nearest_bucket(0, 10, 512)


def test_upscale_factor():
    assert upscale_factor(1024, 1024, (1024, 1024)) == 1.0
    assert upscale_factor(2048, 1024, (1024, 1024)) == 1.0  # covers by height exactly
    assert upscale_factor(4000, 3000, (1024, 1024)) < 1.0
    bucket = nearest_bucket(300, 600, 1024)
    assert upscale_factor(300, 600, bucket) == pytest.approx(max(bucket[0] / 300, bucket[1] / 600))
    assert upscale_factor(300, 600, bucket) > 2.0
    assert upscale_factor(300, 600, nearest_bucket(300, 600, 512)) < 2.0


def _stripes(width: int, height: int) -> Image.Image:
    """Three vertical bands: red, green, blue."""
    array = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    array[:, :third, 0] = 255
    array[:, third : 2 * third, 1] = 255
    array[:, 2 * third :, 2] = 255
    return Image.fromarray(array)


def test_resize_to_bucket_covers_and_centre_crops():
    out = resize_to_bucket(_stripes(300, 100), (64, 64))
    assert out.size == (64, 64) and out.mode == "RGB"
    array = np.asarray(out).astype(int)
    # Only the central green band survives (LANCZOS may ring a little at the edges).
    assert (array[:, 4:-4, 1] > 240).all() and (array[:, 4:-4, [0, 2]] < 15).all()


@pytest.mark.parametrize(
    "size,bucket", [((300, 600), (720, 1456)), ((4000, 2250), (1360, 768)), ((97, 131), (64, 80))]
)
def test_resize_to_bucket_exact_size(size, bucket):
    image = Image.new("RGB", size, (10, 200, 30))
    out = resize_to_bucket(image, bucket)
    assert out.size == bucket
    assert np.abs(np.asarray(out).astype(int) - [10, 200, 30]).max() <= 1


def test_pixels_to_tensor_matches_diffusers():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    ours = pixels_to_tensor(image)
    theirs = VaeImageProcessor(do_resize=False).preprocess(image)[0]
    assert ours.shape == (3, 48, 80) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert ours.min() >= -1 and ours.max() <= 1
    # Also with resizing enabled at a matching (16-divisible) size.
    assert torch.equal(ours, VaeImageProcessor(vae_scale_factor=16).preprocess(image, 48, 80)[0])


def test_pixels_to_tensor_extremes_and_mode():
    image = Image.new("RGB", (2, 1))
    image.putpixel((1, 0), (255, 255, 255))
    tensor = pixels_to_tensor(image)
    assert tensor[:, 0, 0].tolist() == [-1.0] * 3 and tensor[:, 0, 1].tolist() == [1.0] * 3
    with pytest.raises(ValueError, match="RGB"):
        pixels_to_tensor(Image.new("L", (2, 2)))


def test_every_uint8_level_normalizes_as_diffusers():
    levels = np.arange(256, dtype=np.uint8)
    image = Image.fromarray(np.stack([levels, levels[::-1], np.roll(levels, 7)], axis=-1)[None])  # 256x1 RGB
    pixels = image_to_pixels(image)
    assert pixels.shape == (3, 1, 256) and pixels.dtype == torch.uint8 and pixels.is_contiguous()
    assert torch.equal(pixels, torch.from_numpy(np.array(image)).permute(2, 0, 1))
    theirs = VaeImageProcessor(do_resize=False).preprocess(image)[0]
    assert torch.equal(normalize_pixels(pixels), theirs)
    # A batch, cast as the VAE on a GPU takes it: the same as casting diffusers' float32 values.
    batch = torch.stack([pixels, pixels.flip(-1)])
    assert torch.equal(normalize_pixels(batch, torch.bfloat16), torch.stack([theirs, theirs.flip(-1)]).bfloat16())
    with pytest.raises(ValueError, match="uint8"):
        normalize_pixels(pixels.float())


def test_format_bucket_table_rows():
    text = format_bucket_table(256)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(bucket_table(256))
    assert "| 256 | 256 | 1.000 | 100.00 | 256 |" in rows


def test_docs_match_code():
    assert DOCS.read_text(encoding="utf-8") == render_bucket_docs(), (
        "docs/buckets.md is stale: run `python -m fluxlora.buckets > docs/buckets.md`"
    )
    for res in (512, 768, 1024):
        assert format_bucket_table(res) in DOCS.read_text(encoding="utf-8")
