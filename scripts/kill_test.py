"""Fault injection: kill -9 a training run at random moments, resume each time, compare the result.

    python scripts/kill_test.py --kills 20 [--workdir /tmp/kill-test]

Builds the tiny model and the demo cache, trains once without interruption, then trains the same run
again, killing it with SIGKILL at a random moment (checkpoint writes included) `--kills` times and
resuming with `--resume_from_checkpoint latest` after each kill. Checks that every checkpoint found
complete is whole (its files load), that each resume starts from the newest complete checkpoint, and
that the final LoRA equals the uninterrupted run's. Prints a summary; exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fluxlora.checkpoint import ADAPTER_FILE, complete_checkpoints  # noqa: E402


def run(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--checkpointing_steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/fluxlora-kill-test")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model, cache = work / "tiny", work / "cache"
    subprocess.run([sys.executable, "-m", "fluxlora.tiny", str(model)], cwd=REPO, check=True, capture_output=True)
    subprocess.run([sys.executable, "precompute_embeddings.py", "--pretrained_model_name_or_path", str(model),
                    "--dataset", "demo/images", "--embeddings_dir", str(cache), "--resolutions", "64",
                    "--max_sequence_length", "32"], cwd=REPO, check=True, capture_output=True)
    train = ["train_flux_lora.py", "--embeddings_dir", str(cache), "--pretrained_model_name_or_path", str(model),
             "--mixed_precision", "no", "--max_train_steps", str(args.steps), "--checkpointing_steps",
             str(args.checkpointing_steps), "--validation_steps", "0", "--seed", "1", "--learning_rate", "1e-3"]

    whole = run([*train, "--output_dir", str(work / "whole")])
    if whole.wait() != 0:
        print(whole.stderr.read()[-3000:])
        return 1
    expected = load_file(work / "whole" / f"checkpoint-{args.steps}" / ADAPTER_FILE)

    out, rng, failures, lost = work / "killed", random.Random(args.seed), [], []
    log = out / "logs.jsonl"

    def logged_step() -> int:
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip().endswith("}")] \
            if log.exists() else []
        return rows[-1]["step"] if rows else 0

    def resume_flag() -> list[str]:
        return ["--resume_from_checkpoint", "latest"] if complete_checkpoints(out) else []

    for kill in range(args.kills):
        start_step = complete_checkpoints(out)[-1][0] if complete_checkpoints(out) else 0
        # kill somewhere in the next two checkpoint intervals, at a random moment inside a step
        # (a checkpoint being written included)
        target = start_step + rng.randint(1, 2 * args.checkpointing_steps)
        proc = run([*train, "--output_dir", str(out), *resume_flag()])
        while proc.poll() is None and logged_step() < min(target, args.steps - 1):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        proc.wait()
        last_step = logged_step()
        after = complete_checkpoints(out)
        newest = after[-1][0] if after else 0
        lost.append(last_step - newest)
        for step, folder in after:
            try:
                load_file(folder / ADAPTER_FILE)
                json.loads((folder / "trainer_state.json").read_text())
            except Exception as err:  # noqa: BLE001 - any failure to read is a corrupt checkpoint
                failures.append(f"kill {kill}: checkpoint-{step} is complete but unreadable: {err}")
        print(f"kill {kill + 1}/{args.kills}: at step {last_step}, newest complete checkpoint {newest}", flush=True)
    final = run([*train, "--output_dir", str(out), *resume_flag()])
    if final.wait() != 0:
        failures.append(f"final resume failed: {final.stderr.read()[-2000:]}")
    else:
        got = load_file(out / f"checkpoint-{args.steps}" / ADAPTER_FILE)
        diff = max((got[k] - expected[k]).abs().max().item() for k in expected)
        if got.keys() != expected.keys() or diff > 1e-6:
            failures.append(f"final LoRA differs from the uninterrupted run's (max abs diff {diff})")
    print(json.dumps({"kills": len(lost), "corrupt_checkpoints": sum("unreadable" in f for f in failures),
                      "max_steps_lost_beyond_last_checkpoint": max(lost, default=0),
                      "checkpointing_steps": args.checkpointing_steps, "final_lora_equal": not failures,
                      "torch": torch.__version__}))
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
