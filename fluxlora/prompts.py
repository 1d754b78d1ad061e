"""What sample.py renders: prompts from flags and files, expanded into one job per image."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, SampleConfig, check_resolution


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


# Settings a JSONL line may give besides its prompt; any other key is a mistake worth reporting.
JSONL_SETTINGS: dict[str, type] = {"seed": int, "width": int, "height": int, "num_inference_steps": int,
                                   "guidance_scale": float}


def _check_line(row: Any, where: str) -> None:
    """Raise ConfigError (--prompt_file, file and line) for a JSONL line sample.py cannot render."""
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise ConfigError("prompt_file", f'{where}: needs a "prompt" string')
    unknown = sorted(row.keys() - JSONL_SETTINGS.keys() - {"prompt"})
    if unknown:
        raise ConfigError("prompt_file", f"{where}: unknown keys {unknown}; a line may set prompt, "
                                         f"{', '.join(JSONL_SETTINGS)}")
    for key, kind in JSONL_SETTINGS.items():
        value = row.get(key, 0)
        # JSON true is an int to Python, and a fractional seed or size would be truncated silently.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ConfigError("prompt_file", f"{where}: {key} must be {'an integer' if kind is int else 'a number'}, "
                                             f"not {value!r}")
    if row.get("num_inference_steps", 1) < 1:
        raise ConfigError("prompt_file", f"{where}: num_inference_steps must be at least 1")
    for key in ("width", "height"):
        if key in row:
            try:
                check_resolution(key, int(row[key]))
            except ConfigError as err:  # the flag's own message, placed at the line
                raise ConfigError("prompt_file", f"{where}: {err}") from None


def read_prompt_file(path: str | Path) -> list[dict[str, Any]]:
    """The prompts of a text file (one a line) or of a JSONL file (a prompt and settings a line).

    A file is JSONL when it ends in .jsonl or its first non-blank line starts with `{`; blank lines
    are skipped in both.
    """
    path = Path(path)
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not (path.suffix == ".jsonl" or (lines and lines[0][1].lstrip().startswith("{"))):
        return [{"prompt": line.strip()} for _, line in lines]
    rows = []
    for number, line in lines:
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError("prompt_file", f"{where}: not JSON ({err})") from None
        _check_line(row, where)
        rows.append(row)
    return rows


def read_prompts(cfg: SampleConfig) -> list[PromptJob]:
    """One job per image: each prompt of --prompt then --prompt_file, once per --seed.

    A JSONL line's own seed replaces --seed, and the settings it leaves out come from the flags.
    """
    rows: list[dict[str, Any]] = [{"prompt": p} for p in cfg.prompt]
    if cfg.prompt_file:
        rows += read_prompt_file(cfg.prompt_file)
    if not rows:
        raise ConfigError("prompt_file", f"{cfg.prompt_file} holds no prompts")
    pairs = [(row, seed) for row in rows for seed in ([row["seed"]] if "seed" in row else cfg.seed)]
    return [PromptJob(index=index, prompt=row["prompt"], seed=int(seed),
                      width=int(row.get("width", cfg.width)), height=int(row.get("height", cfg.height)),
                      num_inference_steps=int(row.get("num_inference_steps", cfg.num_inference_steps)),
                      guidance_scale=float(row.get("guidance_scale", cfg.guidance_scale)))
            for index, (row, seed) in enumerate(pairs)]
