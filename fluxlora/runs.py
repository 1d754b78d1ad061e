"""What notebook.py does that is not UI: commands, background runs, and reading a run's files.

The notebook never trains in its own process. It builds the same command lines a user would type
(``precompute_embeddings.py``, ``train_flux_lora.py``, ``sample.py``, plain or under
``accelerate launch``), runs them one after another as subprocesses (``Job``), and watches the
files they write:

* ``<output_dir>/logs.jsonl``: one JSON object per logged step (``LogTail`` reads what is new,
  holding back a line still being written);
* ``<output_dir>/samples/step-XXXXXX/NN.png``: the trainer's previews (``find_previews``);
* ``<output_dir>/pytorch_lora_weights.safetensors`` and ``checkpoint-N/...``: LoRAs
  (``find_loras``) that ``sample.py`` renders into ``<run_dir>/samples/<label>/`` with an
  ``index.jsonl`` (``read_sample_index``).

Everything here is plain Python (no marimo, no torch beyond what ``fluxlora.data`` and
``fluxlora.buckets`` import), so it is tested without a notebook.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from .buckets import DEFAULT_MAX_ASPECT, DEFAULT_MAX_UPSCALE, bucket_table, nearest_bucket, upscale_factor
from .data import SkipSample, build_caption, iter_samples, load_image

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The folder holding the three scripts; every command runs with it as the working directory."""

# Must match fluxlora.trainer.LORA_FILE and fluxlora.checkpoint.COMPLETE (a test checks). Not
# imported from there: those modules pull in diffusers, accelerate and peft, which would add
# seconds to every notebook start for a few strings.
LORA_FILE = "pytorch_lora_weights.safetensors"
CHECKPOINT_COMPLETE = "COMPLETE"
OXEN_PREFIX = "oxen:"  # likewise fluxlora.precompute.OXEN_PREFIX (that module loads the model libraries)

Launcher = Literal["python", "accelerate"]
LAUNCHERS: tuple[str, ...] = ("python", "accelerate")
MIXED_PRECISIONS: tuple[str, ...] = ("no", "bf16", "fp16")

_PREVIEW_FOLDER = re.compile(r"step-(\d+)$")
_PREVIEW_FILE = re.compile(r"(\d+)\.png$")
_CHECKPOINT_FOLDER = re.compile(r"checkpoint-(\d+)$")
# Every PNG ends with an empty IEND chunk: length 0, type, CRC.
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# A log of at most about this many points keeps the live chart light; `logging_steps` follows.
_LOG_POINTS = 500


# ---------------------------------------------------------------------------------- settings
def parse_resolutions(text: str) -> tuple[int, ...]:
    """``"512, 768 1024"`` -> ``(512, 768, 1024)``: each a usable bucket resolution, no repeats.

    Raises:
        ValueError: no number, a non-integer, or a resolution the bucket table rejects
            (not a multiple of 16, under 64).
    """
    parts = [part for part in re.split(r"[,\s]+", text.strip()) if part]
    if not parts:
        raise ValueError("give at least one resolution, e.g. 512 or 512, 768, 1024")
    resolutions = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"resolution {part!r} is not a whole number of pixels") from None
        bucket_table(value)  # raises with the rule when unusable
        if value not in resolutions:
            resolutions.append(value)
    return tuple(resolutions)


def parse_prompts(text: str) -> tuple[str, ...]:
    """One prompt per non-blank line, stripped."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def parse_positive_float(text: str, name: str) -> float:
    """``"1e-4"`` -> ``0.0001``; raises ValueError naming ``name`` unless a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: must be a positive number, got {text!r}")
    return value


@dataclass(frozen=True)
class RunSettings:
    """The settings the notebook exposes; everything else keeps the scripts' defaults.

    Paths are as the user wrote them, relative to ``REPO_ROOT`` (the commands' working
    directory) unless absolute. A run folder ``run_dir`` holds the cache (``cache/``), the
    trainer's output (``lora/``) and ``sample.py``'s renders (``samples/``), as in
    ``scripts/demo.sh``.
    """

    dataset: str = "demo/images"
    model: str = "runs/notebook/tiny-flux-dev"
    run_dir: str = "runs/notebook"
    resolutions: tuple[int, ...] = (256,)
    rank: int = 16
    steps: int = 300
    learning_rate: float = 1e-3
    trigger_phrase: str = ""
    validation_prompts: tuple[str, ...] = ()
    validation_steps: int = 100
    checkpointing_steps: int = 100
    preview_inference_steps: int = 8
    max_upscale: float = DEFAULT_MAX_UPSCALE
    mixed_precision: str = "no"
    resume: bool = False
    launcher: Launcher = "python"
    num_processes: int = 1
    python: str = sys.executable

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if self.launcher == "python" and self.num_processes != 1:
            raise ValueError("plain python runs one process; choose accelerate to run several")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed precision must be one of {', '.join(MIXED_PRECISIONS)}")
        for name in ("rank", "steps", "checkpointing_steps", "preview_inference_steps", "num_processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1")
        if self.validation_steps < 0:
            raise ValueError("validation steps must be 0 (no previews) or more")
        if not self.resolutions:
            raise ValueError("give at least one resolution")

    @property
    def cache_dir(self) -> str:
        return str(Path(self.run_dir, "cache"))

    @property
    def output_dir(self) -> str:
        return str(Path(self.run_dir, "lora"))

    @property
    def samples_dir(self) -> str:
        return str(Path(self.run_dir, "samples"))

    @property
    def preview_size(self) -> int:
        """Previews are drawn square at the largest training resolution."""
        return max(self.resolutions)


def resolve(path: str, root: Path = REPO_ROOT) -> Path:
    """``path`` as the commands see it: relative paths are taken from ``root``."""
    return root / Path(path).expanduser()


def launcher_prefix(settings: RunSettings) -> list[str]:
    """The start of every command: ``python`` or ``python -m accelerate.commands.launch ...``.

    accelerate's own launcher is given every choice it would otherwise guess and warn about.
    Its ``--mixed_precision`` stays ``no``: each script takes its own ``--mixed_precision``
    flag, and the launcher's would only reach precompute and sample.py as a default.
    ``--multi_gpu`` with several processes also gives a real gloo process group on CPUs.
    """
    if settings.launcher == "python":
        return [settings.python]
    prefix = [settings.python, "-m", "accelerate.commands.launch", "--num_machines", "1",
              "--num_processes", str(settings.num_processes), "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    if settings.num_processes > 1:
        prefix.append("--multi_gpu")
    return prefix


def _text_flag(name: str, value: str) -> str:
    # The --flag=value form: argparse would read a value starting with "-" as another flag.
    return f"--{name}={value}"


def precompute_command(settings: RunSettings) -> list[str]:
    """``precompute_embeddings.py`` for the dataset, resolutions, trigger and validation prompts."""
    command = launcher_prefix(settings) + [
        "precompute_embeddings.py",
        "--pretrained_model_name_or_path", settings.model,
        "--dataset", settings.dataset,
        "--embeddings_dir", settings.cache_dir,
        "--resolutions", *map(str, settings.resolutions),
        "--max_upscale", f"{settings.max_upscale:g}",
    ]
    if settings.trigger_phrase.strip():
        command.append(_text_flag("trigger_phrase", settings.trigger_phrase.strip()))
    command += [_text_flag("validation_prompts", prompt) for prompt in settings.validation_prompts]
    return command


def train_command(settings: RunSettings) -> list[str]:
    """``train_flux_lora.py`` on the cache, writing into ``settings.output_dir``.

    Logs every step up to ~500 steps (a smooth live curve), then every ``steps // 500``.
    Previews are square at the largest training resolution.
    """
    size = str(settings.preview_size)
    command = launcher_prefix(settings) + [
        "train_flux_lora.py",
        "--pretrained_model_name_or_path", settings.model,
        "--embeddings_dir", settings.cache_dir,
        "--output_dir", settings.output_dir,
        "--rank", str(settings.rank),
        "--max_train_steps", str(settings.steps),
        "--learning_rate", f"{settings.learning_rate:g}",
        "--checkpointing_steps", str(settings.checkpointing_steps),
        "--logging_steps", str(max(1, settings.steps // _LOG_POINTS)),
        "--validation_steps", str(settings.validation_steps),
        "--validation_width", size,
        "--validation_height", size,
        "--validation_inference_steps", str(settings.preview_inference_steps),
        "--mixed_precision", settings.mixed_precision,
    ]
    if settings.resume:
        command += ["--resume_from_checkpoint", "latest"]
    return command


def sample_command(settings: RunSettings, lora: str | None, prompts: Sequence[str], output_dir: str,
                   *, size: int, steps: int) -> list[str]:
    """``sample.py`` with one LoRA (or none: the base model), seeds 0, 1, ... per prompt.

    Raises:
        ValueError: no prompt.
    """
    if not prompts:
        raise ValueError("give at least one prompt to render")
    command = launcher_prefix(settings) + ["sample.py", "--pretrained_model_name_or_path", settings.model]
    if lora is not None:
        command += ["--lora", lora]
    command += [_text_flag("prompt", prompt) for prompt in prompts]
    command += ["--output_dir", output_dir, "--width", str(size), "--height", str(size),
                "--num_inference_steps", str(steps), "--mixed_precision", settings.mixed_precision]
    return command


def fresh_run_problem(settings: RunSettings, root: Path = REPO_ROOT) -> str | None:
    """Why a fresh (non-resumed) run should not start in ``settings.output_dir``, or None.

    The trainer would restart the log and overwrite checkpoints of an earlier run there, and
    its old previews would mix with the new ones; nothing is deleted for the user.
    """
    out = resolve(settings.output_dir, root)
    if settings.resume or not out.is_dir():
        return None
    leftovers = [p.name for p in out.iterdir() if p.name == "logs.jsonl" or _CHECKPOINT_FOLDER.match(p.name)]
    if not leftovers:
        return None
    return (f"{settings.output_dir} already holds a run ({', '.join(sorted(leftovers)[:3])}); "
            "choose another run folder, or resume from its latest checkpoint")


def shell_line(command: Sequence[str]) -> str:
    """A command as one copy-pasteable shell line."""
    return shlex.join(command)


# ---------------------------------------------------------------------------------- processes
def stop_process_group(process: subprocess.Popen, grace: float = 30.0,
                       sig: signal.Signals = signal.SIGTERM) -> int:
    """Send ``sig`` to the process group led by ``process``; SIGKILL it after ``grace`` seconds.

    The whole group is signalled because ``accelerate launch`` and DDP workers are children of
    the process started; signalling only the leader would orphan them. ``process`` must have
    been started with ``start_new_session=True`` (its pid is then its group id).

    Returns:
        The exit status of ``process`` (negative: killed by that signal).
    """
    if process.poll() is not None:
        return process.returncode
    try:
        os.killpg(process.pid, sig)
        return process.wait(grace)
    except ProcessLookupError:  # the group ended between poll and kill
        return process.wait()
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return process.wait()


@dataclass(frozen=True)
class Step:
    """One command of a job, with a short name for the status line ("precompute", "train")."""

    name: str
    command: tuple[str, ...]


JobState = Literal["running", "finished", "failed", "stopped"]


class Job:
    """Steps run one after another in the background, each in its own process group.

    The first step that exits non-zero ends the job ("failed"); ``stop`` ends the running step's
    whole process group and runs no further step ("stopped"). Output of every step, stdout and
    stderr together, is appended to ``log_path`` with a header line per step.
    """

    def __init__(self, steps: Sequence[Step], log_path: str | Path, *, cwd: str | Path = REPO_ROOT,
                 env: Mapping[str, str] | None = None) -> None:
        if not steps:
            raise ValueError("a job needs at least one step")
        self.steps = tuple(steps)
        self.log_path = Path(log_path)
        self.cwd = Path(cwd)
        # Unbuffered output, so the console tail is live rather than flushed at exit.
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.returncodes: list[int] = []
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fluxlora-job", daemon=True)

    def start(self) -> Job:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        with open(self.log_path, "ab") as log:
            for step in self.steps:
                with self._lock:
                    if self._stopping:
                        return
                    log.write(f"$ {shell_line(step.command)}\n".encode())
                    log.flush()
                    try:
                        self._process = subprocess.Popen(step.command, cwd=self.cwd, env=self.env, stdout=log,
                                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                         start_new_session=True)
                    except OSError as error:  # no such interpreter or script: fail as a shell would
                        log.write(f"{error}\n".encode())
                        self.returncodes.append(127)
                        return
                code = self._process.wait()
                self.returncodes.append(code)
                if code != 0:
                    return

    def stop(self, grace: float = 120.0) -> None:
        """Stop the job without blocking: SIGTERM the running step's group, SIGKILL after ``grace``.

        The trainer answers SIGTERM by saving a checkpoint; the grace period leaves it time to.
        """
        with self._lock:
            self._stopping = True
            process = self._process
        if process is not None and process.poll() is None:
            threading.Thread(target=stop_process_group, args=(process, grace), daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the job to end; True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def state(self) -> JobState:
        if self._thread.is_alive():
            return "running"
        if self._stopping and (len(self.returncodes) < len(self.steps) or self.returncodes[-1] != 0):
            return "stopped"
        if len(self.returncodes) == len(self.steps) and all(code == 0 for code in self.returncodes):
            return "finished"
        return "failed"

    @property
    def current(self) -> Step | None:
        """The step running now, or once the job has ended the last one that ran (None if none ran)."""
        return self.steps[self._index()] if self._index() >= 0 else None

    def _index(self) -> int:
        done = len(self.returncodes)
        # While alive, the step after those finished (the last one, in the moment before the thread ends).
        return min(done, len(self.steps) - 1) if self._thread.is_alive() else done - 1

    def describe(self) -> str:
        """A status line: "running train (step 2 of 2)", "failed: precompute exited with 1", ..."""
        state, step = self.state, self.current
        if state == "running" and step is not None:
            return f"running {step.name} (step {self._index() + 1} of {len(self.steps)})"
        if state == "failed" and step is not None:
            return f"failed: {step.name} exited with {self.returncodes[-1]}"
        if state == "stopped" and step is not None:
            return f"stopped during {step.name}"
        return state


def tail_text(path: str | Path, lines: int = 20, max_bytes: int = 65536) -> str:
    """The last ``lines`` lines of a console log, as a terminal would show them.

    Progress bars redraw a line with carriage returns; only the text after the last ``\\r`` of
    each line is kept. Reads at most the last ``max_bytes`` bytes; "" if there is no file.
    """
    path = Path(path)
    if not path.is_file():
        return ""
    with open(path, "rb") as file:
        file.seek(max(0, path.stat().st_size - max_bytes))
        text = file.read().decode("utf-8", errors="replace")
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    while shown and not shown[-1]:
        shown.pop()
    return "\n".join(shown[-lines:])


# ---------------------------------------------------------------------------------- the training log
class LogTail:
    """The rows of a growing JSONL log, reading only what was appended since the last ``poll``.

    A last line without its newline is still being written: it is held back until complete. A
    line that does not parse (a torn write from a killed process, later followed by more rows)
    is skipped. A file that shrank or was replaced (a fresh run restarts its log) is read again
    from the start.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self._offset = 0
        self._partial = b""
        self._inode: int | None = None

    def poll(self) -> list[dict[str, Any]]:
        """All rows so far (the same list, grown)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._reset(None)
            return self.rows
        if stat.st_ino != self._inode or stat.st_size < self._offset:
            self._reset(stat.st_ino)
        with open(self.path, "rb") as file:
            file.seek(self._offset)
            data = file.read()
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        for line in complete:
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(row, dict):
                self.rows.append(row)
        return self.rows

    def _reset(self, inode: int | None) -> None:
        self.rows.clear()
        self._offset = 0
        self._partial = b""
        self._inode = inode


@dataclass(frozen=True)
class Progress:
    """Where a training run stands, from its log rows."""

    step: int
    max_steps: int
    loss: float | None
    images_per_s: float | None
    eta_s: float | None

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0


def progress(rows: Sequence[Mapping[str, Any]], max_steps: int, images_per_step: int = 1,
             window: int = 5) -> Progress:
    """Step, last loss, throughput (mean ``images_per_s`` of the last ``window`` rows) and ETA.

    ETA = remaining steps x images per optimizer step / throughput; ``images_per_step`` is batch
    size x gradient accumulation x processes (the trainer's ``images_per_s`` counts all
    processes).
    """
    rows = [r for r in rows if "loss" in r]  # held-out rows (val_loss) carry no training figures
    if not rows:
        return Progress(0, max_steps, None, None, None)
    last = rows[-1]
    speeds = [float(r["images_per_s"]) for r in rows[-window:] if r.get("images_per_s")]
    speed = sum(speeds) / len(speeds) if speeds else None
    step = int(last.get("step", 0))
    eta = max(0, max_steps - step) * images_per_step / speed if speed else None
    loss = last.get("loss")
    return Progress(step, max_steps, float(loss) if loss is not None else None, speed, eta)


def format_duration(seconds: float) -> str:
    """``42`` -> ``"42 s"``, ``185`` -> ``"3 min 05 s"``, ``3720`` -> ``"1 h 02 min"``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def loss_chart_svg(rows: Sequence[Mapping[str, Any]], *, width: int = 640, height: int = 240,
                   ema: float = 0.9) -> str:
    """An inline SVG of the loss per step (light) and its exponential moving average (dark).

    The average weighs the previous value by ``ema`` (``fluxlora.metrics.plot_loss_curve``'s PNG picks its
    weight from the log's length; a live log grows, so this one is fixed). The lines carry the classes
    ``loss-raw`` and ``loss-ema`` and the SVG ``loss-chart``; with no finite loss yet it holds
    only the frame and a note.
    """
    points = [(float(r["step"]), float(r["loss"])) for r in rows
              if "step" in r and isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    left, right, top, bottom = 56, 12, 12, 28
    parts = [(f'<svg class="loss-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
              f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">'),
             (f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
              'fill="white" stroke="#888"/>')]
    if not points:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#666">'
                     "no loss logged yet</text></svg>")
        return "".join(parts)
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1e-6
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)

    def xy(step: float, loss: float) -> str:
        x = left + (step - s0) / (s1 - s0) * (width - left - right)
        y = top + (hi - loss) / (hi - lo) * (height - top - bottom)
        return f"{x:.1f},{y:.1f}"

    smooth, average = [], losses[0]
    for value in losses:
        average = ema * average + (1 - ema) * value
        smooth.append(average)
    parts += [
        (f'<polyline class="loss-raw" fill="none" stroke="#a0bee6" stroke-width="1" '
         f'points="{" ".join(xy(s, v) for s, v in points)}"/>'),
        (f'<polyline class="loss-ema" fill="none" stroke="#143ca0" stroke-width="2" '
         f'points="{" ".join(xy(s, v) for s, v in zip(steps, smooth))}"/>'),
        f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{hi:.3g}</text>',
        f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">{lo:.3g}</text>',
        f'<text x="{left}" y="{height - 10}">step {s0:g}</text>',
        f'<text x="{width - right}" y="{height - 10}" text-anchor="end">step {s1:g}</text>',
        "</svg>",
    ]
    return "".join(parts)


# ---------------------------------------------------------------------------------- images on disk
def png_complete(path: str | Path) -> bool:
    """Whether a PNG file has been written to its end (its IEND chunk is there)."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            if file.tell() < len(_PNG_END):
                return False
            file.seek(-len(_PNG_END), os.SEEK_END)
            return file.read() == _PNG_END
    except OSError:
        return False


@dataclass(frozen=True)
class PreviewRound:
    """The previews drawn at one training step: ``images[i]`` is validation prompt ``i``."""

    step: int
    images: tuple[Path, ...]


def find_previews(output_dir: str | Path) -> list[PreviewRound]:
    """The trainer's preview rounds (``samples/step-XXXXXX/NN.png``), by step.

    Only fully written PNGs count, so a round being saved shows its finished images; folders
    with none yet are left out.
    """
    root = Path(output_dir, "samples")
    if not root.is_dir():
        return []
    rounds = []
    for folder in root.iterdir():
        match = _PREVIEW_FOLDER.match(folder.name)
        if not match or not folder.is_dir():
            continue
        images = sorted((p for p in folder.iterdir() if _PREVIEW_FILE.match(p.name) and png_complete(p)),
                        key=lambda p: int(_PREVIEW_FILE.match(p.name).group(1)))
        if images:
            rounds.append(PreviewRound(int(match.group(1)), tuple(images)))
    return sorted(rounds, key=lambda r: r.step)


def find_loras(output_dir: str | Path) -> list[tuple[str, Path]]:
    """(label, file) of every LoRA a run has written: complete checkpoints by step, then the final one.

    Labels are ``checkpoint-N`` and ``final``.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    checkpoints = []
    for folder in root.iterdir():
        match = _CHECKPOINT_FOLDER.match(folder.name)
        if match and (folder / CHECKPOINT_COMPLETE).is_file() and (folder / LORA_FILE).is_file():
            checkpoints.append((int(match.group(1)), folder.name, folder / LORA_FILE))
    found = [(label, path) for _, label, path in sorted(checkpoints)]
    if (root / LORA_FILE).is_file():
        found.append(("final", root / LORA_FILE))
    return found


def read_sample_index(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of ``sample.py``'s ``index.jsonl`` in ``folder`` (prompt, seed, variant, file...).

    ``file`` is made a full path. [] until sample.py has finished (it writes the index last).
    """
    index = Path(folder, "index.jsonl")
    if not index.is_file():
        return []
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    return [{**row, "file": Path(folder, row["file"])} for row in rows]


# ---------------------------------------------------------------------------------- the dataset
@dataclass(frozen=True)
class DatasetRow:
    """One sample as precompute would see it.

    Attributes:
        source: where it comes from ("demo/images/01_red_circle.jpg", "table.parquet row 3").
        caption: the training caption (trigger phrase applied), or None when skipped.
        size: (width, height) after EXIF rotation, or None when the image cannot be used.
        buckets: per resolution, the (width, height) bucket, or None where the image would
            need more than ``max_upscale`` enlargement and is skipped at that resolution.
        problem: why the sample is skipped altogether (precompute's reason), or None.
        thumbnail: a small PNG of the image, or None.
    """

    source: str
    caption: str | None
    size: tuple[int, int] | None
    buckets: dict[int, tuple[int, int] | None]
    problem: str | None
    thumbnail: bytes | None


def scan_dataset(source: str, resolutions: Sequence[int], *, trigger_phrase: str = "",
                 max_upscale: float = DEFAULT_MAX_UPSCALE, max_aspect: float = DEFAULT_MAX_ASPECT,
                 limit: int = 200, thumbnail_px: int = 96, root: Path = REPO_ROOT) -> list[DatasetRow]:
    """The first ``limit`` samples of ``--dataset source`` with captions and bucket assignments.

    Uses the same functions as precompute (``iter_samples``, ``load_image``, ``build_caption``,
    ``nearest_bucket``), so a sample skipped there shows here with the same reason. A relative
    ``source`` is read from ``root`` when it exists there (else it may be a hub dataset), and
    sources are shown relative to ``root``.

    Raises:
        FileNotFoundError, ValueError: as ``iter_samples`` (no such dataset, missing column...);
            ValueError for an ``oxen:`` dataset, which only precompute fetches.
    """
    if source.startswith(OXEN_PREFIX):
        raise ValueError(f"{source}: an Oxen dataset is fetched by precompute_embeddings.py when the run "
                         "starts; there is no preview of it here")
    local = resolve(source, root)
    prefix = f"{root}{os.sep}"
    rows = []
    for raw in islice(iter_samples(str(local) if local.exists() else source), limit):
        shown = raw.source.removeprefix(prefix)
        try:
            caption = build_caption(raw.caption, shown, trigger_phrase=trigger_phrase)
            image = load_image(raw.read_bytes(), shown)
        except SkipSample as skip:
            rows.append(DatasetRow(shown, None, None, {}, skip.reason, None))
            continue
        buckets: dict[int, tuple[int, int] | None] = {}
        for resolution in resolutions:
            bucket = nearest_bucket(image.width, image.height, resolution, max_aspect)
            fits = upscale_factor(image.width, image.height, bucket) <= max_upscale
            buckets[resolution] = bucket if fits else None
        rows.append(DatasetRow(shown, caption, image.size, buckets, None, _thumbnail(image, thumbnail_px)))
    return rows


def image_thumbnail(path: str | Path, px: int = 256) -> bytes:
    """A PNG of the image at ``path`` fitted into ``px`` x ``px``, cached while the file is unchanged.

    The live gallery redraws every few seconds; sending 1024 px previews each time would move
    megabytes per update for pictures shown a few hundred pixels wide.
    """
    path = Path(path)
    return _cached_thumbnail(str(path), path.stat().st_mtime_ns, px)


@lru_cache(maxsize=256)
def _cached_thumbnail(path: str, mtime_ns: int, px: int) -> bytes:
    with Image.open(path) as image:
        return _thumbnail(image.convert("RGB"), px)


def _thumbnail(image: Image.Image, px: int) -> bytes:
    small = image.copy()
    small.thumbnail((px, px))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return buffer.getvalue()


def bucket_counts(rows: Iterable[DatasetRow]) -> dict[int, Counter[tuple[int, int]]]:
    """Per resolution, how many usable images go to each bucket (skipped ones not counted)."""
    counts: dict[int, Counter[tuple[int, int]]] = {}
    for row in rows:
        for resolution, bucket in row.buckets.items():
            counter = counts.setdefault(resolution, Counter())
            if bucket is not None:
                counter[bucket] += 1
    return counts


def describe_model(model: str, root: Path = REPO_ROOT) -> tuple[bool, str]:
    """(usable, message) for ``--pretrained_model_name_or_path``: a local folder, file or hub id."""
    path = resolve(model, root)
    if (path / "model_index.json").is_file():
        return True, f"diffusers folder {model}"
    if path.is_file() and path.suffix == ".safetensors":
        return True, f"single-file checkpoint {model}"
    if path.exists():
        return False, f"{model} is neither a diffusers folder (model_index.json) nor a .safetensors file"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith((".", "/", "~")):
        return True, f"hub id {model} (downloaded on first use, or read from the local cache)"
    return False, f"{model} does not exist yet"
