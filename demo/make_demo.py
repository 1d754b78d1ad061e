"""Regenerate the demo dataset: 12 captioned drawings of varied sizes, in the two layouts users bring.

    python demo/make_demo.py [OUT_DIR]     (default: the folder this script is in)

Writes
    images/NAME.jpg|png + images/NAME.txt   caption files beside the images (kohya/diffusers style)
    table.parquet                           columns image (path relative to OUT_DIR) and action
                                            (the caption column of Oxen's FLUX LoRA example)
    validation_prompts.txt                  two prompts, one a line

Each picture is drawn with PIL at twice its size and downsampled (smooth edges, small files); the
only randomness (star and bird positions) comes from a fixed seed, so reruns write identical files
with the same Pillow and pyarrow.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SEED = 0
SUPERSAMPLE = 2
JPEG_QUALITY = 80

Color = tuple[int, int, int]
RED: Color = (200, 40, 40)
ORANGE: Color = (240, 140, 30)
YELLOW: Color = (250, 215, 50)
GREEN: Color = (60, 150, 60)
BLUE: Color = (40, 80, 190)
LIGHT_BLUE: Color = (140, 190, 240)
DARK_BLUE: Color = (20, 40, 100)
PURPLE: Color = (110, 50, 150)
PINK: Color = (240, 150, 190)
BROWN: Color = (110, 70, 35)
GRAY: Color = (128, 128, 128)
WHITE: Color = (245, 245, 245)
BLACK: Color = (15, 15, 20)

VALIDATION_PROMPTS = (
    "a yellow circle on a purple background",
    "a red star above blue hills",
)


@dataclass(frozen=True)
class Scene:
    """One demo image: file stem, size in pixels (width, height), file format, caption, painter."""

    name: str
    size: tuple[int, int]
    fmt: str  # "jpg" or "png"
    caption: str
    paint: Callable[[Image.Image, random.Random], None]


def vertical_gradient(size: tuple[int, int], top: Color, bottom: Color) -> Image.Image:
    """An RGB image of `size` (width, height) fading from `top` to `bottom`."""
    mask = Image.linear_gradient("L").resize(size)  # 0 at the top, 255 at the bottom
    return Image.composite(Image.new("RGB", size, bottom), Image.new("RGB", size, top), mask)


def star_points(cx: float, cy: float, outer: float, inner: float, n: int = 5) -> list[tuple[float, float]]:
    """Vertices of an n-pointed star centred on (cx, cy), first point straight up."""
    points = []
    for i in range(2 * n):
        radius = outer if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / n
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def paint_red_circle(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    img.paste(BLUE, (0, 0, w, h))
    r = 0.3 * min(w, h)
    ImageDraw.Draw(img).ellipse((w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r), fill=RED)


def paint_yellow_star(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    img.paste(vertical_gradient((w, h), LIGHT_BLUE, WHITE))
    draw = ImageDraw.Draw(img)
    draw.ellipse((-0.3 * w, 0.6 * h, 0.7 * w, 1.5 * h), fill=GREEN)
    draw.ellipse((0.35 * w, 0.65 * h, 1.3 * w, 1.5 * h), fill=(40, 120, 45))
    draw.polygon(star_points(0.5 * w, 0.3 * h, 0.18 * h, 0.07 * h), fill=YELLOW)


def paint_lighthouse(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    img.paste(vertical_gradient((w, h), LIGHT_BLUE, WHITE))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0.75 * h, w, h), fill=DARK_BLUE)
    draw.polygon(
        [(0.42 * w, 0.3 * h), (0.58 * w, 0.3 * h), (0.62 * w, 0.78 * h), (0.38 * w, 0.78 * h)], fill=WHITE
    )
    draw.polygon([(0.38 * w, 0.3 * h), (0.62 * w, 0.3 * h), (0.5 * w, 0.2 * h)], fill=RED)


def paint_sunset(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    img.paste(vertical_gradient((w, h), (250, 190, 120), (240, 110, 80)))
    draw = ImageDraw.Draw(img)
    r = 0.22 * h
    draw.ellipse((0.5 * w - r, 0.62 * h - r, 0.5 * w + r, 0.62 * h + r), fill=ORANGE)
    draw.rectangle((0, 0.62 * h, w, h), fill=PURPLE)


def paint_tree(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    img.paste(vertical_gradient((w, h), LIGHT_BLUE, (225, 235, 245)))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0.85 * h, w, h), fill=WHITE)
    draw.rectangle((0.44 * w, 0.6 * h, 0.56 * w, 0.87 * h), fill=BROWN)
    for top, bottom, half in ((0.1, 0.4, 0.25), (0.25, 0.55, 0.33), (0.4, 0.7, 0.42)):
        draw.polygon(
            [(0.5 * w, top * h), ((0.5 - half) * w, bottom * h), ((0.5 + half) * w, bottom * h)], fill=GREEN
        )


def paint_birds(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    img.paste(vertical_gradient((w, h), PINK, (250, 210, 220)))
    draw = ImageDraw.Draw(img)
    for i in range(3):
        cx = (0.25 + 0.25 * i + rng.uniform(-0.05, 0.05)) * w
        cy = rng.uniform(0.25, 0.65) * h
        span = rng.uniform(0.05, 0.08) * w
        draw.line(
            [(cx - span, cy - 0.4 * span), (cx, cy), (cx + span, cy - 0.4 * span)],
            fill=BLACK,
            width=max(2, w // 150),
            joint="curve",
        )


def paint_nested_squares(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    img.paste(WHITE, (0, 0, w, h))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0.15 * w, 0.15 * h, 0.85 * w, 0.85 * h), fill=YELLOW)
    draw.rectangle((0.35 * w, 0.35 * h, 0.65 * w, 0.65 * h), fill=BLUE)


def paint_house(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    img.paste(vertical_gradient((w, h), BLUE, LIGHT_BLUE))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0.8 * h, w, h), fill=GREEN)
    draw.rectangle((0.38 * w, 0.5 * h, 0.62 * w, 0.82 * h), fill=RED)
    draw.polygon([(0.34 * w, 0.5 * h), (0.66 * w, 0.5 * h), (0.5 * w, 0.32 * h)], fill=GRAY)
    draw.rectangle((0.47 * w, 0.66 * h, 0.53 * w, 0.82 * h), fill=BROWN)


def paint_night(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    img.paste(BLACK, (0, 0, w, h))
    draw = ImageDraw.Draw(img)
    for _ in range(25):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        draw.polygon(star_points(x, y, 0.012 * w, 0.005 * w), fill=WHITE)
    r = 0.15 * w
    draw.ellipse((0.6 * w - r, 0.25 * h - r, 0.6 * w + r, 0.25 * h + r), fill=WHITE)


def paint_stripes(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    draw = ImageDraw.Draw(img)
    colors = (RED, ORANGE, YELLOW, GREEN, BLUE)
    for i, color in enumerate(colors):
        draw.rectangle((0, i * h / len(colors), w, (i + 1) * h / len(colors)), fill=color)


def paint_triangle(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    img.paste(ORANGE, (0, 0, w, h))
    ImageDraw.Draw(img).polygon([(0.5 * w, 0.25 * h), (0.1 * w, 0.75 * h), (0.9 * w, 0.75 * h)], fill=PURPLE)


def paint_pink_circles(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    img.paste(GRAY, (0, 0, w, h))
    draw = ImageDraw.Draw(img)
    r = 0.18 * h
    for cx in (0.22 * w, 0.5 * w):
        draw.ellipse((cx - r, 0.5 * h - r, cx + r, 0.5 * h + r), fill=PINK)
    draw.rectangle((0.68 * w, 0.5 * h - r, 0.68 * w + 2 * r, 0.5 * h + r), fill=GREEN)


SCENES: tuple[Scene, ...] = (
    Scene("01_red_circle", (512, 512), "jpg", "a red circle on a blue background", paint_red_circle),
    Scene("02_yellow_star", (640, 480), "jpg", "a yellow star above green hills", paint_yellow_star),
    Scene(
        "03_lighthouse",
        (480, 640),
        "jpg",
        "a white lighthouse with a red roof by a dark blue sea",
        paint_lighthouse,
    ),
    Scene("04_sunset", (768, 384), "jpg", "an orange sun setting over a purple ocean", paint_sunset),
    Scene("05_tree", (300, 600), "png", "a tall green tree with a brown trunk on white snow", paint_tree),
    Scene("06_birds", (1024, 576), "jpg", "three black birds flying in a pink sky", paint_birds),
    Scene("07_squares", (384, 384), "png", "a blue square inside a yellow square", paint_nested_squares),
    Scene("08_house", (600, 400), "jpg", "a small red house with a gray roof under a blue sky", paint_house),
    Scene("09_night", (400, 600), "jpg", "a white moon and small stars in a black night sky", paint_night),
    Scene(
        "10_stripes",
        (512, 256),
        "png",
        "horizontal stripes of red orange yellow green and blue",
        paint_stripes,
    ),
    Scene("11_triangle", (256, 384), "png", "a purple triangle on an orange background", paint_triangle),
    Scene(
        "12_pink_circles",
        (448, 320),
        "png",
        "two pink circles and a green square on a gray background",
        paint_pink_circles,
    ),
)


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """Paint `scene` at SUPERSAMPLE x its size and downsample to it (anti-aliased edges)."""
    big = Image.new("RGB", (scene.size[0] * SUPERSAMPLE, scene.size[1] * SUPERSAMPLE))
    scene.paint(big, rng)
    return big.resize(scene.size, Image.Resampling.LANCZOS)


def save(img: Image.Image, path: Path) -> None:
    if path.suffix == ".png":
        # A 64-colour palette keeps flat drawings a few kilobytes; edges stay smooth enough.
        img.quantize(colors=64, dither=Image.Dither.NONE).save(path, optimize=True)
    else:
        img.save(path, quality=JPEG_QUALITY, optimize=True)


def make_demo(out_dir: Path) -> None:
    """Write images with caption files, table.parquet and validation_prompts.txt under `out_dir`."""
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    rows: dict[str, list[str]] = {"image": [], "action": []}
    for scene in SCENES:
        image_path = images_dir / f"{scene.name}.{scene.fmt}"
        save(render(scene, rng), image_path)
        image_path.with_suffix(".txt").write_text(scene.caption + "\n", encoding="utf-8")
        rows["image"].append(image_path.relative_to(out_dir).as_posix())
        rows["action"].append(scene.caption)
    pq.write_table(pa.table(rows), out_dir / "table.parquet")
    (out_dir / "validation_prompts.txt").write_text("\n".join(VALIDATION_PROMPTS) + "\n", encoding="utf-8")


if __name__ == "__main__":
    make_demo(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
