"""The all-reduce DDP does every training step, alone: the LoRA's gradients across the processes of
`accelerate launch`, to set beside bench_train_step.py's step times on 1 and N GPUs of one machine.

    accelerate launch --multi_gpu --num_processes 4 bench/bench_allreduce.py

FLUX.1's default LoRA layers at rank 16 have 65.4M values (262 MB in fp32), which DDP all-reduces in
25 MB buckets. Prints one JSON line (process 0) per case: milliseconds per all-reduce of the whole
gradient in fp32 as DDP sends it, in bf16, and as one tensor, with the bus bandwidth NCCL reached
(2 (N-1)/N x bytes / time, NCCL's own measure).
"""
from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist
from accelerate import PartialState

LORA_VALUES = 65_422_336  # FLUX.1-dev, DEFAULT_LORA_LAYERS, rank 16 (tests/test_lora_io.py counts it)
BUCKET_MB = 25  # DDP's bucket_cap_mb


def time_allreduce(tensors: list[torch.Tensor], reps: int = 20) -> float:
    """Seconds per all-reduce of all `tensors` (one call each, as DDP's buckets)."""
    for _ in range(3):
        for t in tensors:
            dist.all_reduce(t)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        for t in tensors:
            dist.all_reduce(t)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main() -> None:
    state = PartialState()
    world = state.num_processes
    cases = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        per_bucket = BUCKET_MB * 2**20 * 8 // torch.finfo(dtype).bits  # values per bucket
        sizes = [min(per_bucket, LORA_VALUES - start) for start in range(0, LORA_VALUES, per_bucket)]
        cases[f"{name} buckets"] = [torch.ones(n, device=state.device, dtype=dtype) for n in sizes]
        cases[f"{name} one tensor"] = [torch.ones(LORA_VALUES, device=state.device, dtype=dtype)]
    for name, tensors in cases.items():
        sec = time_allreduce(tensors)
        size = sum(t.numel() * t.element_size() for t in tensors)
        if state.is_main_process:
            print(json.dumps({"case": name, "processes": world, "card": torch.cuda.get_device_name(),
                              "mb": round(size / 1e6, 1), "ms": round(sec * 1e3, 2),
                              "bus_gb_s": round(2 * (world - 1) / world * size / sec / 1e9, 1)}), flush=True)


if __name__ == "__main__":
    main()
