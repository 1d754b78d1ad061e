"""The JSONL training log (always written, whatever the trackers), the loss-curve PNG, and reading
values off the GPU without waiting for it."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from PIL import Image, ImageDraw


class HostCopy:
    """Device tensors on their way to the host: copied into pinned memory behind the work queued so far,
    so that asking for them does not make the host wait for the GPU to drain. `get` waits only for the copy
    itself (nothing, once the GPU has moved past it): a host that reads the last step's values during the
    next step keeps the GPU busy, where `.item()` would leave it idle while the host launches more work."""

    def __init__(self, *tensors: torch.Tensor):
        cuda = tensors[0].device.type == "cuda"
        self.values = [t.detach().to("cpu", non_blocking=cuda) for t in tensors]
        self.done = torch.cuda.Event() if cuda else None
        if self.done is not None:
            self.done.record()

    def get(self) -> list[torch.Tensor]:
        """The tensors on the host."""
        if self.done is not None:
            self.done.synchronize()
        return self.values


class JsonlLog:
    """One JSON object per line, flushed as written, so a killed run keeps every row it logged.

    On resume, rows past the resumed step (logged after the checkpoint by the killed run) are dropped,
    so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [row for row in read_jsonl(self.path) if row.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run in an old folder starts a fresh log
        self._file = open(self.path, "a", buffering=1)

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn last line (killed mid-write) is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss_curve(rows: Iterable[dict[str, Any]], path: str | Path, *, size: tuple[int, int] = (800, 400)) -> Path:
    """A PNG of training loss per logged step (light) and its exponential moving average (dark),
    smoothed over about a twentieth of the run so that short and long logs both read well."""
    points = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    ema = 1 - 2 / (max(1.0, len(points) / 20) + 1)
    width, height = size
    margin = 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, 10, width - 10, height - margin], outline="black")
    if points:
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1e-6
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)

        def xy(step: float, loss: float) -> tuple[float, float]:
            x = margin + (step - s0) / (s1 - s0) * (width - margin - 10)
            y = 10 + (hi - loss) / (hi - lo) * (height - margin - 10)
            return x, y

        smooth, avg = [], losses[0]
        for value in losses:
            avg = ema * avg + (1 - ema) * value
            smooth.append(avg)
        if len(points) > 1:
            draw.line([xy(s, v) for s, v in points], fill=(160, 190, 230), width=1)
            draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 160), width=2)
        draw.text((margin, height - margin + 8), f"step {s0}", fill="black")
        draw.text((width - 90, height - margin + 8), f"step {s1}", fill="black")
        draw.text((4, 10), f"{hi:.3g}", fill="black")
        draw.text((4, height - margin - 12), f"{lo:.3g}", fill="black")
    draw.text((width // 2 - 40, height - 20), "training loss", fill="black")
    path = Path(path)
    image.save(path)
    return path
