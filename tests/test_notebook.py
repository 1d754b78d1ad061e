"""notebook.py and fluxlora/runs.py: the notebook run headless, the plain functions behind it, and
the app served by `marimo run` driven in a real (headless) Chromium through a short training run."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from fluxlora import runs
from fluxlora.config import PrecomputeConfig, SampleConfig, TrainConfig, build_parser

ROOT = Path(__file__).resolve().parent.parent
DEMO_CAPTIONS = {path.with_suffix("").name: path.read_text().strip() for path in (ROOT / "demo/images").glob("*.txt")}
DEMO_PROMPTS = [line.strip() for line in (ROOT / "demo/validation_prompts.txt").read_text().splitlines()
                if line.strip()]
# Worked out by hand from the 256 px table (docs/buckets.md): the bucket of nearest aspect ratio.
BUCKETS_256 = {
    "01_red_circle": (256, 256),  # 512x512, square
    "02_yellow_star": (288, 224),  # 640x480: 4:3 = 1.333, 288/224 = 1.286 (next: 304/208 = 1.462)
    "03_lighthouse": (224, 288),  # 480x640: the mirror of the above
    "04_sunset": (368, 176),  # 768x384: 2:1, 368/176 = 2.09 (next: 336/192 = 1.75)
    "05_tree": (176, 368),  # 300x600: 1:2
    "06_birds": (336, 192),  # 1024x576: 16:9 = 1.778, 336/192 = 1.75
}
CHROMIUM = "/usr/bin/chromium"
# Flags this sandbox needs: no GPU, no background traffic to hosts the closed network refuses.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def parse_script_args(command: list[str], script: str, config: type):
    """The values a script's own parser reads from the command the notebook built."""
    assert script in command, command
    return build_parser(config, "").parse_args(command[command.index(script) + 1:])


# ---------------------------------------------------------------------------------- the notebook, headless
def run_notebook(monkeypatch, *argv: str):
    """`app.run()` of notebook.py with these command-line arguments: (outputs, defs)."""
    spec = importlib.util.spec_from_file_location("fluxlora_notebook", ROOT / "notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["notebook.py", *argv])  # mo.cli_args() reads these in script mode
    return module.app.run()


@pytest.fixture(scope="module")
def notebook_defaults():
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_notebook(monkeypatch)


def test_notebook_shows_the_demo_dataset_with_captions_and_buckets(notebook_defaults):
    _, defs = notebook_defaults
    assert defs["dataset_error"] is None
    table = defs["dataset_table"].data
    assert len(table) == 12
    by_name = {Path(row["source"]).stem: row for row in table}
    assert set(by_name) == set(DEMO_CAPTIONS)
    for name, row in by_name.items():
        assert row["source"] == f"demo/images/{Path(row['source']).name}"
        assert row["caption"] == DEMO_CAPTIONS[name]
    for name, (width, height) in BUCKETS_256.items():
        assert by_name[name]["bucket @ 256"] == f"{width}x{height}", name
    assert by_name["06_birds"]["size"] == "1024x576"
    # What the table shows is what precompute would do: every image fits its bucket at 256.
    assert all(row.problem is None and row.buckets[256] is not None for row in defs["dataset_rows"])


def test_notebook_builds_the_commands_the_scripts_accept(notebook_defaults):
    _, defs = notebook_defaults
    assert defs["settings_error"] is None
    precompute, train = defs["precompute_cmd"], defs["train_cmd"]
    assert precompute[0] == train[0] == sys.executable
    pre = parse_script_args(precompute, "precompute_embeddings.py", PrecomputeConfig)
    assert (pre.dataset, pre.embeddings_dir, pre.resolutions) == ("demo/images", "runs/notebook/cache", [256])
    assert pre.pretrained_model_name_or_path == "runs/notebook/tiny-flux-dev"
    assert pre.validation_prompts == DEMO_PROMPTS
    args = parse_script_args(train, "train_flux_lora.py", TrainConfig)
    assert (args.embeddings_dir, args.output_dir) == ("runs/notebook/cache", "runs/notebook/lora")
    assert (args.rank, args.max_train_steps, args.learning_rate) == (16, 300, 1e-3)
    assert (args.validation_width, args.validation_height) == (256, 256)
    assert not hasattr(args, "resume_from_checkpoint")
    # Nothing is started without a click: the monitor has no job and shows the empty chart.
    assert defs["watched_job"] is None
    assert "no loss logged yet" in defs["monitor"].text


def test_notebook_takes_a_table_and_a_run_folder_from_the_command_line(monkeypatch, tmp_path):
    _, defs = run_notebook(monkeypatch, "--dataset", "demo/table.parquet", "--run_dir", str(tmp_path))
    table = defs["dataset_table"].data
    assert len(table) == 12
    assert all(row["source"].startswith("demo/table.parquet row ") for row in table)
    assert sorted(row["caption"] for row in table) == sorted(DEMO_CAPTIONS.values())
    assert defs["settings"].model == f"{tmp_path}/tiny-flux-dev"
    args = parse_script_args(defs["train_cmd"], "train_flux_lora.py", TrainConfig)
    assert args.output_dir == str(tmp_path / "lora")


def test_notebook_runs_as_a_plain_script(tmp_path):
    result = subprocess.run([sys.executable, "notebook.py", "--run_dir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []  # viewing starts nothing and writes nothing


# ---------------------------------------------------------------------------------- settings and commands
def test_parse_resolutions():
    assert runs.parse_resolutions("512, 768 1024") == (512, 768, 1024)
    assert runs.parse_resolutions(" 64 ,64") == (64,)
    for bad, words in [("", "at least one"), ("abc", "whole number"), ("100", "multiple of 16"), ("32", "at least 64")]:
        with pytest.raises(ValueError, match=words):
            runs.parse_resolutions(bad)


def test_parse_numbers_and_prompts():
    assert runs.parse_positive_float("1e-4", "learning rate") == 1e-4
    for bad in ("0", "-1", "nan", "fast"):
        with pytest.raises(ValueError, match="learning rate"):
            runs.parse_positive_float(bad, "learning rate")
    assert runs.parse_prompts("  a cat \n\n b dog\n") == ("a cat", "b dog")


def test_settings_refuse_what_the_launch_cannot_do():
    with pytest.raises(ValueError, match="plain python runs one process"):
        runs.RunSettings(num_processes=2)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        runs.RunSettings(steps=0)
    with pytest.raises(ValueError, match="mixed precision"):
        runs.RunSettings(mixed_precision="fp8")


def test_commands_pass_awkward_text_through_to_the_scripts():
    # argparse takes a "-"-led value with a space for a value anyway; without one, only --flag=value passes it
    settings = runs.RunSettings(dataset="my data/imgs", trigger_phrase="-sks-", resolutions=(512, 1024),
                                validation_prompts=("--not a flag", "-dash", "a cat, 'quoted'"), learning_rate=4e-4,
                                steps=5000, resume=True)
    pre = parse_script_args(runs.precompute_command(settings), "precompute_embeddings.py", PrecomputeConfig)
    assert pre.dataset == "my data/imgs"
    assert pre.trigger_phrase == "-sks-"
    assert pre.validation_prompts == ["--not a flag", "-dash", "a cat, 'quoted'"]
    assert pre.resolutions == [512, 1024]
    train = parse_script_args(runs.train_command(settings), "train_flux_lora.py", TrainConfig)
    assert train.learning_rate == 4e-4
    assert train.logging_steps == 10  # 5000 steps logged as 500 points
    assert train.validation_width == 1024  # previews at the largest resolution
    assert train.resume_from_checkpoint == "latest"


def test_accelerate_launch_command_parses_with_accelerates_own_parser():
    from accelerate.commands.launch import launch_command_parser

    settings = runs.RunSettings(launcher="accelerate", num_processes=2, mixed_precision="bf16")
    command = runs.train_command(settings)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    launch = launch_command_parser().parse_args(command[3:])
    assert (launch.num_processes, launch.multi_gpu, launch.num_machines) == (2, True, 1)
    assert launch.mixed_precision == "no"  # the script's own flag decides
    assert launch.training_script == "train_flux_lora.py"
    train = build_parser(TrainConfig, "").parse_args(launch.training_script_args)
    assert train.mixed_precision == "bf16"
    single = launch_command_parser().parse_args(
        runs.train_command(runs.RunSettings(launcher="accelerate"))[3:])
    assert (single.num_processes, single.multi_gpu) == (1, False)


def test_sample_command():
    settings = runs.RunSettings(model="m/flux")
    with_lora = runs.sample_command(settings, "run/lora/pytorch_lora_weights.safetensors", ["-a", "b"], "out/final",
                                    size=512, steps=20)
    args = parse_script_args(with_lora, "sample.py", SampleConfig)
    assert (args.pretrained_model_name_or_path, args.lora, args.prompt) == (
        "m/flux", ["run/lora/pytorch_lora_weights.safetensors"], ["-a", "b"])
    assert (args.output_dir, args.width, args.height, args.num_inference_steps) == ("out/final", 512, 512, 20)
    base = parse_script_args(runs.sample_command(settings, None, ["b"], "out/base", size=64, steps=2),
                             "sample.py", SampleConfig)
    assert not hasattr(base, "lora")
    with pytest.raises(ValueError, match="prompt"):
        runs.sample_command(settings, None, [], "out", size=64, steps=2)


def test_fresh_run_problem(tmp_path):
    settings = runs.RunSettings(run_dir=str(tmp_path))
    assert runs.fresh_run_problem(settings) is None  # no folder yet
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "samples").mkdir()
    assert runs.fresh_run_problem(settings) is None  # nothing a new run would clobber
    (tmp_path / "lora" / "checkpoint-10").mkdir()
    assert "checkpoint-10" in runs.fresh_run_problem(settings)
    assert runs.fresh_run_problem(runs.RunSettings(run_dir=str(tmp_path), resume=True)) is None


def test_shared_names_match_the_modules_they_come_from():
    from fluxlora import checkpoint, precompute, trainer

    assert runs.LORA_FILE == trainer.LORA_FILE
    assert runs.CHECKPOINT_COMPLETE == checkpoint.COMPLETE
    assert runs.OXEN_PREFIX == precompute.OXEN_PREFIX


# ---------------------------------------------------------------------------------- processes
def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


# A parent that starts a child and then waits, as `accelerate launch` does with the training script.
PARENT_WITH_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
child.wait()
"""


def test_stop_process_group_ends_the_children_too():
    process = subprocess.Popen([sys.executable, "-c", PARENT_WITH_CHILD], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    child = int(process.stdout.readline())
    assert _alive(child)
    assert runs.stop_process_group(process, grace=10) == -signal.SIGTERM
    assert _wait_gone(child), "the child outlived its process group's SIGTERM"
    process.stdout.close()


def test_stop_process_group_kills_what_ignores_sigterm():
    ignore = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
              "time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", ignore], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    assert process.stdout.readline().strip() == "ready"  # the handler is in place
    start = time.monotonic()
    assert runs.stop_process_group(process, grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - start < 10
    process.stdout.close()


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_job_runs_steps_in_order_into_one_log(tmp_path):
    job = runs.Job([runs.Step("one", _py("print('first')")), runs.Step("two", _py("print('second')"))],
                   tmp_path / "job.log", cwd=tmp_path).start()
    assert job.wait(60)
    assert job.state == "finished" and job.returncodes == [0, 0]
    log = (tmp_path / "job.log").read_text()
    assert log.index("first") < log.index("second")
    assert log.count("$ ") == 2  # a header line per step


def test_job_stops_at_the_first_failure(tmp_path):
    job = runs.Job([runs.Step("precompute", _py("import sys; print('broken'); sys.exit(3)")),
                    runs.Step("train", _py("print('never')"))], tmp_path / "job.log").start()
    assert job.wait(60)
    assert job.state == "failed" and job.returncodes == [3]
    assert job.describe() == "failed: precompute exited with 3"
    assert "never" not in (tmp_path / "job.log").read_text()


def test_job_reports_a_missing_program(tmp_path):
    job = runs.Job([runs.Step("train", (str(tmp_path / "no-such-python"), "x.py"))], tmp_path / "job.log").start()
    assert job.wait(60)
    assert (job.state, job.returncodes) == ("failed", [127])
    assert "no-such-python" in (tmp_path / "job.log").read_text()


def test_job_stop_ends_the_running_step_and_skips_the_rest(tmp_path):
    job = runs.Job([runs.Step("train", _py("import time; print('up', flush=True); time.sleep(60)")),
                    runs.Step("after", _py("print('never')"))], tmp_path / "job.log").start()
    deadline = time.monotonic() + 30
    while "up" not in runs.tail_text(tmp_path / "job.log") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.state == "running" and job.describe() == "running train (step 1 of 2)"
    job.stop(grace=10)
    assert job.wait(30)
    assert job.state == "stopped" and job.returncodes == [-signal.SIGTERM]
    assert job.describe() == "stopped during train"
    assert "never" not in (tmp_path / "job.log").read_text()


def test_job_stopped_during_its_last_step_is_stopped_not_failed(tmp_path):
    job = runs.Job([runs.Step("train", _py("import time; print('up', flush=True); time.sleep(60)"))],
                   tmp_path / "job.log").start()
    deadline = time.monotonic() + 30
    while "up" not in runs.tail_text(tmp_path / "job.log") and time.monotonic() < deadline:
        time.sleep(0.05)
    job.stop(grace=10)
    assert job.wait(30)
    assert (job.state, job.returncodes, job.describe()) == ("stopped", [-signal.SIGTERM], "stopped during train")


def test_tail_text_shows_progress_bars_as_a_terminal_does(tmp_path):
    log = tmp_path / "console.log"
    assert runs.tail_text(log) == ""
    log.write_text("loading\ntrain: 10%\rtrain: 50%\rtrain: 100%\ndone\n\n")
    assert runs.tail_text(log) == "loading\ntrain: 100%\ndone"
    assert runs.tail_text(log, lines=1) == "done"


# ---------------------------------------------------------------------------------- the training log
def _row(step: int, loss: float = 1.0, **extra) -> str:
    return json.dumps({"step": step, "loss": loss, "lr": 1e-3, "images_per_s": 4.0, "epoch": 0, **extra}) + "\n"


def test_log_tail_holds_back_a_partial_last_line(tmp_path):
    path = tmp_path / "logs.jsonl"
    tail = runs.LogTail(path)
    assert tail.poll() == []  # no file yet
    line = _row(2, 0.5)
    path.write_text(_row(1) + line[:10])
    assert [r["step"] for r in tail.poll()] == [1]
    with open(path, "a") as file:
        file.write(line[10:] + "not json\n" + _row(3))
    assert [r["step"] for r in tail.poll()] == [1, 2, 3]  # the torn line is skipped
    assert tail.poll()[1]["loss"] == 0.5


def test_log_tail_rereads_a_restarted_log(tmp_path):
    path = tmp_path / "logs.jsonl"
    path.write_text(_row(1) + _row(2) + _row(3))
    tail = runs.LogTail(path)
    assert len(tail.poll()) == 3
    path.unlink()  # a fresh run deletes the old log and starts a new file
    path.write_text(_row(1, 9.0))
    assert [(r["step"], r["loss"]) for r in tail.poll()] == [(1, 9.0)]
    path.write_text("")  # truncated in place
    assert tail.poll() == []


def test_progress_throughput_and_eta():
    rows = [json.loads(_row(step, images_per_s=speed)) for step, speed in [(1, 100.0), (2, 2.0), (3, 4.0)]]
    progress = runs.progress(rows, max_steps=13, images_per_step=2, window=2)
    assert (progress.step, progress.loss, progress.images_per_s) == (3, 1.0, 3.0)
    assert progress.eta_s == pytest.approx(10 * 2 / 3.0)  # 10 steps left, 2 images a step, 3 images/s
    assert progress.fraction == pytest.approx(3 / 13)
    empty = runs.progress([], max_steps=10)
    assert (empty.step, empty.loss, empty.eta_s, empty.fraction) == (0, None, None, 0.0)


def test_format_duration():
    assert [runs.format_duration(s) for s in (0, 42.4, 185, 3720)] == ["0 s", "42 s", "3 min 05 s", "1 h 02 min"]


def _polyline(svg: str, cls: str) -> list[tuple[float, float]]:
    start = svg.index(f'class="{cls}"')
    points = svg[svg.index('points="', start) + 8:]
    return [tuple(map(float, p.split(","))) for p in points[:points.index('"')].split()]


def test_loss_chart_svg():
    assert "no loss logged yet" in runs.loss_chart_svg([])
    rows = [{"step": s, "loss": v} for s, v in [(1, 2.0), (2, float("nan")), (3, 1.0), (4, 1.5)]]
    svg = runs.loss_chart_svg(rows, width=640, height=240)
    raw = _polyline(svg, "loss-raw")
    assert len(raw) == 3  # the NaN row is left out
    assert [x for x, _ in raw] == sorted(x for x, _ in raw)
    assert raw[0][1] < raw[2][1] < raw[1][1]  # higher loss is higher up (smaller y)
    assert raw[0] == (56.0, 12.0) and raw[1] == (pytest.approx(56 + 2 / 3 * 572, abs=0.1), 212.0)
    ema = _polyline(svg, "loss-ema")
    assert len(ema) == 3 and ema[0] == raw[0]
    assert raw[1][1] > ema[1][1]  # the average lags behind the drop
    assert ema[1][1] == pytest.approx(12 + 0.1 * 200)  # 0.9 x 2.0 + 0.1 x 1.0 = 1.9, a tenth down the 200 px frame


# ---------------------------------------------------------------------------------- images on disk
def _png(path: Path, size=(8, 8), color="red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_png_complete(tmp_path):
    whole = _png(tmp_path / "a.png")
    assert runs.png_complete(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:-5])
    assert not runs.png_complete(cut)
    assert not runs.png_complete(tmp_path / "missing.png")


def test_find_previews(tmp_path):
    samples = tmp_path / "samples"
    for step in (0, 100):
        for i in (1, 0, 10):
            _png(samples / f"step-{step:06d}" / f"{i:02d}.png")
    being_written = _png(samples / "step-000200" / "00.png")
    being_written.write_bytes(being_written.read_bytes()[:-12])
    _png(samples / "other" / "00.png")
    _png(samples / "step-000100" / "grid.png")
    rounds = runs.find_previews(tmp_path)
    assert [r.step for r in rounds] == [0, 100]
    assert [p.name for p in rounds[1].images] == ["00.png", "01.png", "10.png"]
    assert runs.find_previews(tmp_path / "nothing") == []


def test_find_loras_in_step_order(tmp_path):
    for step, complete in [(10, True), (2, True), (4, False)]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / runs.LORA_FILE).write_bytes(b"x")
        if complete:
            (folder / runs.CHECKPOINT_COMPLETE).write_text("")
    assert [label for label, _ in runs.find_loras(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    (tmp_path / runs.LORA_FILE).write_bytes(b"x")
    loras = runs.find_loras(tmp_path)
    assert loras[-1] == ("final", tmp_path / runs.LORA_FILE)
    assert loras[0][1] == tmp_path / "checkpoint-2" / runs.LORA_FILE


def test_read_sample_index(tmp_path):
    assert runs.read_sample_index(tmp_path) == []
    row = {"prompt": "a cat", "variant": "lora", "file": "0000-lora.png"}
    (tmp_path / "index.jsonl").write_text(json.dumps(row) + "\n")
    assert runs.read_sample_index(tmp_path) == [{**row, "file": tmp_path / "0000-lora.png"}]


def test_image_thumbnail_follows_the_file(tmp_path):
    path = _png(tmp_path / "p.png", size=(400, 200), color="red")
    thumb = Image.open(io.BytesIO(runs.image_thumbnail(path, px=100)))
    assert thumb.size == (100, 50) and thumb.getpixel((5, 5)) == (255, 0, 0)
    _png(path, size=(400, 200), color="blue")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on coarse clocks
    thumb = Image.open(io.BytesIO(runs.image_thumbnail(path, px=100)))
    assert thumb.getpixel((5, 5)) == (0, 0, 255)


# ---------------------------------------------------------------------------------- the dataset view
def test_scan_dataset_shows_skips_and_per_resolution_buckets(tmp_path):
    data = tmp_path / "data"
    _png(data / "a_wide.png", size=(800, 400), color="green")
    (data / "a_wide.txt").write_text("a wide  field\n")
    _png(data / "b_small.png", size=(100, 100))  # fine at 64 px, too small (over 2x upscale) at 256
    (data / "b_small.txt").write_text("a dot")
    _png(data / "c_nocaption.png", size=(100, 100))
    (data / "d_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (data / "d_broken.txt").write_text("broken")
    rows = runs.scan_dataset(str(data), [64, 256], trigger_phrase="sks", root=tmp_path)
    by_name = {Path(row.source).stem: row for row in rows}
    assert [Path(r.source).name for r in rows] == ["a_wide.png", "b_small.png", "c_nocaption.png", "d_broken.png"]
    assert by_name["a_wide"].source == "data/a_wide.png"  # shown relative to the root
    assert by_name["a_wide"].caption == "sks, a wide field"
    assert by_name["a_wide"].size == (800, 400)
    assert by_name["a_wide"].buckets == {64: (80, 48), 256: (368, 176)}
    assert by_name["b_small"].buckets == {64: (64, 64), 256: None}
    assert by_name["c_nocaption"].caption is None and "missing caption" in by_name["c_nocaption"].problem
    assert "not an image" in by_name["d_broken"].problem or "corrupt" in by_name["d_broken"].problem
    assert Image.open(io.BytesIO(by_name["a_wide"].thumbnail)).size == (96, 48)
    counts = runs.bucket_counts(rows)
    assert counts[64] == {(80, 48): 1, (64, 64): 1}
    assert counts[256] == {(368, 176): 1}
    _png(tmp_path / "exact" / "e.png", size=(128, 128))
    (tmp_path / "exact" / "e.txt").write_text("e")  # exactly 2x to 256 px: precompute skips only above --max_upscale
    assert runs.scan_dataset(str(tmp_path / "exact"), [256], max_upscale=2.0, root=tmp_path)[0].buckets == {
        256: (256, 256)}
    with pytest.raises(FileNotFoundError):
        runs.scan_dataset("no/such/folder/here", [64], root=tmp_path)
    with pytest.raises(ValueError, match="fetched by precompute"):
        runs.scan_dataset("oxen:owner/repo", [64], root=tmp_path)


def test_describe_model(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "model_index.json").write_text("{}")
    assert runs.describe_model("tiny", root=tmp_path)[0]
    assert runs.describe_model(str(tmp_path / "tiny"))[0]
    ok, message = runs.describe_model("runs/x/tiny-flux-dev", root=tmp_path)
    assert not ok and "does not exist" in message
    ok, message = runs.describe_model("black-forest-labs/FLUX.1-dev", root=tmp_path)
    assert ok and "hub id" in message
    (tmp_path / "empty").mkdir()
    assert not runs.describe_model("empty", root=tmp_path)[0]


# ---------------------------------------------------------------------------------- in a real browser
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def marimo_server(tmp_path):
    """`marimo run notebook.py` on a free port, its runs going to tmp_path/run: (url, run folder)."""
    port = _free_port()
    run_dir = tmp_path / "run"
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "marimo.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "marimo", "run", "notebook.py", "--headless", "--host", "127.0.0.1",
             "--port", str(port), "--no-token", "--", "--run_dir", str(run_dir)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                        if json.load(response).get("status") == "healthy":
                            break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"marimo run did not come up:\n{(tmp_path / 'marimo.log').read_text()}")
                    time.sleep(0.5)
            yield url, run_dir
        finally:
            server.terminate()
            server.wait(30)


def _number_input(page, label: str):
    # marimo puts the label's HTML into a number field's aria-label, so match on the text in it.
    return page.locator(f'input[aria-label*=">{label}</span>"]')


@pytest.mark.browser
@pytest.mark.slow
def test_browser_trains_the_tiny_model_and_shows_loss_and_previews(marimo_server, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    url, run_dir = marimo_server
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        # marimo scrolls inside its own container, so a full-page screenshot is one viewport: make
        # it tall enough for the whole app.
        page = browser.new_page(viewport={"width": 1280, "height": 4000})
        page.set_default_timeout(60_000)
        start = time.monotonic()

        def reached(what: str) -> None:  # phase times, to tell a slow machine from a hang
            print(f"{time.monotonic() - start:6.1f} s  {what}")

        try:
            page.goto(url)
            # The dataset view has rendered the demo images.
            page.get_by_text("a red circle on a blue background").wait_for()
            reached("page loaded")

            page.get_by_role("button", name="Build a tiny random FLUX.1 here").click()
            page.get_by_text(f"Model: diffusers folder {run_dir}/tiny-flux-dev").wait_for(timeout=120_000)
            assert (run_dir / "tiny-flux-dev" / "model_index.json").is_file()
            reached("tiny model built")

            resolutions = page.get_by_label("Resolutions (px)")
            resolutions.fill("64")
            resolutions.press("Enter")
            for label, value in [("Steps", "6"), ("Preview every (steps, 0: never)", "3"),
                                 ("Checkpoint every (steps)", "3"), ("Preview denoising steps", "2")]:
                field = _number_input(page, label)
                field.fill(value)
                field.press("Tab")
            page.get_by_text("Commands").click()
            commands = page.get_by_role("region", name="Commands")
            commands.get_by_text("--max_train_steps 6").wait_for()
            commands.get_by_text("--resolutions 64").wait_for()

            page.get_by_role("button", name="Start precompute + training").click()
            page.get_by_text("running precompute").wait_for()
            reached("run started")
            # The loss curve draws as rows arrive, then the previews of the last step appear.
            page.locator("svg.loss-chart polyline.loss-ema").wait_for(timeout=180_000)
            reached("loss curve drawn")
            page.get_by_text("Latest previews: step 6").wait_for(timeout=180_000)
            page.get_by_text("Status: finished").wait_for(timeout=60_000)
            reached("run finished")
            page.get_by_text("6 / 6", exact=True).wait_for()  # the step counter
            points = page.locator("svg.loss-chart polyline.loss-raw").get_attribute("points").split()
            assert len(points) == 6  # one point per logged step
            # The compare section heads a column per preview round: before training, step 3, step 6.
            for step in (0, 3):
                page.locator("strong").filter(has_text=re.compile(rf"^step {step}$")).wait_for()
            gallery = page.locator("img").count()
            assert gallery >= 12 + 2 + 3 * 2  # dataset thumbnails, latest previews, compared rounds
            assert [r.step for r in runs.find_previews(run_dir / "lora")] == [0, 3, 6]
            shot = tmp_path / "notebook.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
        finally:
            try:  # a failed test should not leave a run going
                page.get_by_role("button", name="Stop", exact=True).click(timeout=2000)
            except sync_api.Error:
                pass
            browser.close()
