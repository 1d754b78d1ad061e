"""Time the trainer's own training step on the full FLUX.1-dev architecture (random weights).

Runs `fluxlora.trainer.Trainer.train_step`, the code path of train_flux_lora.py, data loading from a
synthetic cache on local disk included, and prints one JSON line per configuration with the same
fields as ../shared/perf/reference_step.py (run that in the same call, on the same card):

    python .perf/reference_step.py --res 512 1024 --batch 1
    python bench/bench_train_step.py --res 512 1024 --batch 1
    python bench/bench_train_step.py --res 1024 --profile 2   # + kernel time by kind, top kernels, idle gaps
    accelerate launch --num_processes 4 bench/bench_train_step.py --res 1024   # DDP: images/s of all GPUs
    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 4 \
        bench/bench_train_step.py --res 1024 --optimizer adamw                   # FSDP: memory per GPU

Speed does not depend on the weights, so the model is built randomly on the GPU instead of loaded.
MFU: 2 x forward FLOPs per step (LoRA needs no weight gradients of the frozen base, so the backward
costs about one forward; counted from the architecture, `forward_flops`) over the bf16 matmul rate
measured in this run (also for fp8 rows, so that they compare).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.full_flux import random_transformer  # noqa: E402
from fluxlora import cache as cache_mod  # noqa: E402
from fluxlora import trainer as trainer_mod  # noqa: E402
from fluxlora.config import TrainConfig  # noqa: E402
from fluxlora.metrics import read_jsonl  # noqa: E402
from fluxlora.models import cublas_without_workspace  # noqa: E402
from fluxlora.sampler import load_batch, prefetch  # noqa: E402

MODEL_ID = "bench/flux1-dev-random"  # stands for the random model; recorded in the synthetic cache
T5_DIM, CLIP_DIM, LATENT_CHANNELS = 4096, 768, 16


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    """The card's bf16 matmul rate on random data (the MFU denominator)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def write_synthetic_cache(folder: Path, res: int, images: int, seq_len: int = 512) -> Path:
    """A cache in the real format: `images` square entries at `res` with distinct captions."""
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = {"format_version": cache_mod.FORMAT_VERSION, "pretrained_model_name_or_path": MODEL_ID,
                   "revision": None, "resolutions": [res], "max_sequence_length": seq_len}
    fp = cache_mod.fingerprint_hash(fingerprint)
    gen = torch.Generator().manual_seed(0)
    text_tensors, image_tensors, texts, entries = {}, {}, {}, []
    image_shard, text_shard = cache_mod.shard_name("images", 0, fp), cache_mod.shard_name("text", 0, fp)
    for i in range(images + 1):  # caption 0 is the empty caption
        cid = f"caption{i:04d}"
        t5_key, clip_key = cache_mod.text_keys(cid)
        text_tensors[t5_key] = torch.randn(seq_len, T5_DIM, generator=gen).bfloat16()
        text_tensors[clip_key] = torch.randn(CLIP_DIM, generator=gen).bfloat16()
        texts[cid] = {"shard": text_shard, "caption": f"caption {i}"}
    for i in range(images):
        sid = f"sample{i:04d}"
        key = cache_mod.image_key(sid, res, False)
        shape = (LATENT_CHANNELS, res // 8, res // 8)
        image_tensors[f"{key}.mean"] = torch.randn(shape, generator=gen).bfloat16()
        image_tensors[f"{key}.std"] = (0.05 * torch.rand(shape, generator=gen)).bfloat16()
        entries.append({"sample_id": sid, "caption_id": f"caption{i + 1:04d}", "resolution": res, "width": res,
                        "height": res, "flipped": False, "shard": image_shard, "source": f"synthetic/{i}"})
    shards = {}
    for name, tensors in ((image_shard, image_tensors), (text_shard, text_tensors)):
        cache_mod.write_atomic(folder / name, save(tensors))
        shards[name] = {"sha256": cache_mod.sha256_file(folder / name), "size": (folder / name).stat().st_size}
    manifest = {"format": cache_mod.FORMAT_NAME, "version": cache_mod.FORMAT_VERSION, "fingerprint": fingerprint,
                "args": {}, "vae_scaling_factor": 0.3611, "vae_shift_factor": 0.1159, "max_sequence_length": seq_len,
                "empty_caption_id": "caption0000", "validation": [], "texts": texts, "images": entries,
                "shards": shards, "skips": [], "resolution_skips": [], "counts": {}}
    cache_mod.write_atomic(folder / cache_mod.MANIFEST_NAME, json.dumps(manifest).encode())
    return folder


def forward_flops(height: int, width: int, batch: int, text_tokens: int = 512) -> float:
    """Model FLOPs of one FLUX.1 forward (matmuls and attention; norms, RoPE and the modulation's
    one-row matmuls are under 0.5%): every token meets 113M weights in each of the 19 double- and
    38 single-stream blocks, and attention costs 4 * S^2 * 3072 per block over S = text + image tokens.
    The same count whatever the precision or compilation, so fp8 and bf16 rows compare directly."""
    tokens = text_tokens + (height // 16) * (width // 16)
    d, mlp = 3072, 12288
    per_token = 4 * d * d + 2 * d * mlp  # q, k, v, out and the MLP: the same in both block types
    return batch * 57 * (2 * per_token * tokens + 4 * tokens**2 * d)


KERNEL_KINDS = (  # first match wins; names as cuDNN, cuBLAS (nvjet, sm90_xmma) and Inductor (triton_) give them
    ("attention", ("sdpa", "flash", "fmha", "attn")),
    ("gemm fp8", ("e4m3", "f8f8", "qqtst", "_fp8")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "splitk")),
    ("triton", ("triton",)),
    ("copy/fill", ("memcpy", "memset", "copy", "fill")),
)


def idle_gaps(spans: list[tuple[float, float, str]]) -> dict[tuple[str, str], list[float]]:
    """Where no kernel runs on any stream (host work, launches): spans (start, end, name) sorted by start ->
    {(the kernel that ended last, the next to start): [gaps, total length]}, in the spans' unit; names cut to
    60 characters."""
    gaps: dict[tuple[str, str], list[float]] = {}
    end, last = spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            entry = gaps.setdefault((last[:60], name[:60]), [0, 0.0])
            entry[0] += 1
            entry[1] += start - end
        if stop > end:
            end, last = stop, name
    return gaps


def kernel_profile(step: Callable[[], None], steps: int, top: int = 25) -> dict:
    """GPU kernel time per step over `steps` calls of `step`, by kind and for the `top` kernels (ms per step),
    and the GPU's idle time between them, by the pair of kernels around each gap."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    per_name: dict[str, list[float]] = {}
    for event in events:
        entry = per_name.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += event.time_range.elapsed_us() / 1e3
    gaps = idle_gaps([(e.time_range.start / 1e3, e.time_range.end / 1e3, e.name) for e in events])  # ms
    kinds: dict[str, float] = {}
    for name, (_, ms) in per_name.items():
        kind = next((k for k, keys in KERNEL_KINDS if any(key in name.lower() for key in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms / steps
    ranked = sorted(per_name.items(), key=lambda item: -item[1][1])[:top]
    return dict(ms_per_step={k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                total_ms_per_step=round(sum(kinds.values()), 2),
                top=[(name[:110], calls // steps, round(ms / steps, 3)) for name, (calls, ms) in ranked],
                idle_ms_per_step=round(sum(ms for _, ms in gaps.values()) / steps, 2),
                idle_top=[(*pair, round(calls / steps, 1), round(ms / steps, 3))
                          for pair, (calls, ms) in sorted(gaps.items(), key=lambda item: -item[1][1])[:12]])


def bench(res: int, batch: int, steps: int, workdir: Path, peak: float, held_bytes: int = 0, log: bool = False,
          profile_steps: int = 0, **options) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    cache = write_synthetic_cache(workdir / f"cache-{res}", res, images=max(8, 2 * batch))
    cfg = TrainConfig(embeddings_dir=str(cache), output_dir=str(workdir / f"run-{res}-{batch}"),
                      pretrained_model_name_or_path=MODEL_ID, train_batch_size=batch, max_train_steps=10**6,
                      checkpointing_steps=10**6, logging_steps=1 if log else 10**6, validation_steps=0, **options)
    cfg.validate()
    trainer_mod.load_transformer = lambda *_args, **_kwargs: random_transformer()  # instead of loading weights
    torch.cuda.reset_peak_memory_stats()  # the peak includes compiling and recording CUDA graphs
    trainer = trainer_mod.Trainer(cfg)
    acc = trainer.accelerator
    cache = trainer.cache
    batches = prefetch(trainer.stream.iterate(0, acc.process_index, acc.num_processes),
                       lambda b: load_batch(cache, b, pin=True))
    window = trainer_mod._Window(trainer.device)
    trainer.bar = tqdm(disable=True)  # what Trainer.run would show
    for _ in range(3 if cfg.compile else 2):
        trainer.train_step(batches, window)
        trainer.maybe_log(window)  # a row each step with `log`, as a default run (--logging_steps 1) writes
    torch.cuda.synchronize()
    whole_run_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    # step boundaries as events on the GPU's stream: per-step times without a host sync between steps
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    with trainer_mod.scheduled_garbage_collection(cfg.gc_steps > 0):  # as Trainer.run does
        start = time.perf_counter()
        marks[0].record()
        for mark in marks[1:]:
            trainer.train_step(batches, window)
            trainer.maybe_log(window)
            trainer.maybe_collect_garbage()
            mark.record()
        torch.cuda.synchronize()
        sec = (time.perf_counter() - start) / steps
    step_s = sorted(a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:]))
    trainer.settle()  # the last row
    if not log:  # the mean loss over all steps, warm-up included
        loss = window.flush(acc)()["loss"]
    elif acc.is_main_process:  # which writes the log, and prints the row
        rows = read_jsonl(trainer.out / "logs.jsonl")
        loss = sum(row["loss"] for row in rows) / len(rows)
    else:
        loss = float("nan")
    # after the loss is read: the profiled steps count in neither the times nor the loss
    profiled = kernel_profile(partial(trainer.train_step, batches, window), profile_steps) if profile_steps else None
    flops = 2 * forward_flops(res, res, batch)  # LoRA: the backward costs about one forward
    row = dict(impl="fluxlora", card=torch.cuda.get_device_name(), processes=acc.num_processes, fsdp=trainer.fsdp,
               res=res, batch=batch, optimizer=cfg.optimizer, checkpointing=cfg.checkpointing, compiled=cfg.compile,
               cuda_graphs=trainer.cuda_graphs, gc_steps=cfg.gc_steps, attention=cfg.attention_backend,
               checkpointed_blocks=trainer.checkpointed_blocks,
               base="fp8" if cfg.fp8_base else "bf16", low_memory=cfg.low_memory, logging_steps=1 if log else None,
               s_per_step=round(sec, 4),
               # per step (under DDP each step waits for the slowest process): the spread between runs of
               # 12 steps was as large as the effects measured (bench/RESULTS.md, session 8)
               step_s_median=round(step_s[len(step_s) // 2], 4), step_s_max=round(step_s[-1], 4),
               img_per_s=round(batch * acc.num_processes / sec, 3),
               # the trainer's own memory: over the whole run (loading, compiling, recording graphs), and
               # over the timed steps
               peak_gib=round((max(whole_run_peak, torch.cuda.max_memory_allocated()) - held_bytes) / 2**30, 2),
               steady_peak_gib=round((torch.cuda.max_memory_allocated() - held_bytes) / 2**30, 2),
               model_tflops=round(flops / sec / 1e12, 1), mfu_bf16=round(flops / sec / 1e12 / peak, 3),
               matmul_peak_tflops=round(peak, 1), loss=round(loss, 4))
    if profiled:
        row["kernels"] = profiled
    batches.close()  # stops the prefetch thread, which holds the trainer
    del trainer, batches
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="the trainer's --compile (regional torch.compile, its default)")
    ap.add_argument("--base_model_precision", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument("--low_memory", action="store_true")
    ap.add_argument("--optimizer", default="adamw8bit", help="the trainer's --optimizer (adamw under FSDP)")
    ap.add_argument("--cuda_graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="the trainer's --cuda_graphs (default: on where it applies)")
    ap.add_argument("--gc_steps", type=int, default=50, help="the trainer's --gc_steps (0: Python's automatic GC)")
    ap.add_argument("--attention_backend", choices=["flash", "cudnn"], default="cudnn",
                    help="the trainer's --attention_backend")
    ap.add_argument("--log", action="store_true", help="write the trainer's log row every step, as a default run "
                                                       "does (--logging_steps 1); off, no row is written")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after the timed steps, profile this many more and report GPU kernel time per step "
                         "by kind, the costliest kernels and the GPU's idle gaps between kernels")
    ap.add_argument("--gpu_gib", type=float, default=None,
                    help="act as a GPU of this many GiB (the rest is taken before the trainer starts): shows "
                         "the trainer's choice of blocks to recompute")
    args = ap.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # under accelerate launch: this process's GPU
    cublas_without_workspace(torch.device("cuda"))  # as the trainer does, before the first matmul of the process
    peak = matmul_tflops()
    held = 0
    if args.gpu_gib:  # taken until the process exits
        held = max(0, torch.cuda.mem_get_info()[1] - int(args.gpu_gib * 2**30))
        filler = torch.empty(held, dtype=torch.uint8, device="cuda")  # noqa: F841
    options = dict(gradient_checkpointing=args.gradient_checkpointing, compile=args.compile,
                   base_model_precision=args.base_model_precision, low_memory=args.low_memory,
                   optimizer=args.optimizer, cuda_graphs=args.cuda_graphs, gc_steps=args.gc_steps,
                   attention_backend=args.attention_backend)
    with tempfile.TemporaryDirectory() as tmp:
        for res in args.res:
            for batch in args.batch:
                row = bench(res, batch, args.steps, Path(tmp), peak, held, log=args.log,
                            profile_steps=args.profile, **options)
                if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch: images/s of all processes
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
