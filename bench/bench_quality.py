"""Quality guard: on a fixed seed, the trainer's fast path gives the reference path's losses.

Runs the trainer's own step (train_flux_lora.py's code path: compiled blocks, CUDA graphs, cuDNN attention,
the flat LoRA tensor and the deferred optimizer step; `--precisions fp8` adds the fp8 base) for `--steps`
optimizer steps on the full FLUX.1-dev architecture (random weights, seeded) from a synthetic cache, and
records every batch it trains on (latents, noise, sigmas, text embeddings). Then replays those batches through
the reference path, diffusers' example defaults as ../shared/perf/reference_step.py runs them (eager, gradient
checkpointing, flash or memory-efficient attention, PEFT's LoRA in fp32 tensor by tensor, AdamW8bit tensor by
tensor, clipping at 1.0), from the same base weights and the same LoRA initialisation. What "bf16 noise" is,
is measured rather than assumed: the reference path once more with the memory-efficient attention kernel
instead of flash, the same math rounded differently.

    python bench/bench_quality.py --res 512 --steps 30 --precisions bf16 fp8

Prints one JSON line per path: its losses and, against the reference, the largest and the mean relative
difference of the per-step losses and the relative difference of the LoRA's update (final minus initial
weights, all tensors together).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import types
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_train_step import MODEL_ID, write_synthetic_cache  # noqa: E402
from bench.full_flux import random_transformer  # noqa: E402
from fluxlora import trainer as trainer_mod  # noqa: E402
from fluxlora.config import TrainConfig  # noqa: E402
from fluxlora.optim import build_optimizer  # noqa: E402
from fluxlora.sampler import load_batch, prefetch  # noqa: E402

Batch = tuple[torch.Tensor, ...]  # x0 [B,16,H,W] fp32, noise like x0, sigmas [B], t5 [B,L,4096], clip [B,768]
State = dict[str, torch.Tensor]  # LoRA weights by parameter name, fp32


def lora_state(model: torch.nn.Module) -> State:
    return {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}


def trainer_path(cfg: TrainConfig, steps: int) -> dict:
    """`steps` steps of the trainer (whatever `load_transformer` builds): its per-step losses, the batches
    it drew, and its LoRA weights before and after."""
    from accelerate.state import AcceleratorState, GradientState

    trainer = trainer_mod.Trainer(cfg)
    acc = trainer.accelerator
    model = acc.unwrap_model(trainer.transformer)
    init, batches_seen, losses = lora_state(model), [], []
    flow_loss = trainer.flow_loss

    def recording(model, x0, noise, sigmas, t5, clip, weighting="none"):
        batches_seen.append(tuple(t.detach().clone() for t in (x0, noise, sigmas, t5, clip)))
        loss = flow_loss(model, x0, noise, sigmas, t5, clip, weighting)
        losses.append(loss.detach())
        return loss

    trainer.flow_loss = recording
    cache, pin = trainer.cache, trainer.device.type == "cuda"
    batches = prefetch(trainer.stream.iterate(0, acc.process_index, acc.num_processes),
                       lambda b: load_batch(cache, b, pin=pin))
    window = trainer_mod._Window(trainer.device)
    trainer.bar = tqdm(disable=True)
    for _ in range(steps):
        trainer.train_step(batches, window)
    trainer.settle()
    result = dict(losses=[loss.item() for loss in losses], batches=batches_seen, init=init, final=lora_state(model))
    batches.close()  # stops the prefetch thread, which holds the trainer
    del trainer.flow_loss  # the closure would keep the trainer (and its model) alive past the `del`
    del trainer, batches, model
    gc.collect()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def reference_path(cfg: TrainConfig, build: Callable[[], torch.nn.Module], batches: list[Batch], init: State,
                   device: torch.device, backends: list | None = None) -> dict:
    """diffusers' example step over `batches`: the base from `build` in the training dtype, PEFT's LoRA
    (rank, alpha and layers of `cfg`) set to `init`, gradient checkpointing, autocast, the optimizer of `cfg`
    on each LoRA tensor, clipping; `backends` the SDPA kernels (CUDA). Per-step losses and final weights."""
    from peft import LoraConfig
    from torch.nn.attention import sdpa_kernel

    if cfg.lr_scheduler != "constant" or cfg.lr_warmup_steps or cfg.gradient_accumulation_steps != 1:
        raise ValueError("the reference path steps at a constant learning rate, one batch per step")
    dtype = trainer_mod.DTYPES[cfg.mixed_precision]
    model = build().to(device, dtype)
    model.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                 target_modules=list(cfg.lora_layers)))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if sorted(params) != sorted(init):
        raise ValueError("the reference path's LoRA tensors are not the trainer's")
    for name, p in params.items():
        p.data = init[name].to(device).clone()  # fp32, as diffusers' examples cast them
    model.enable_gradient_checkpointing()
    optimizer = build_optimizer(cfg, list(params.values()))

    def autocast_model(**inputs):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):  # as accelerate's
            return model(**inputs)

    # Trainer.flow_loss builds the transformer's inputs and the loss from a batch: the same for both paths
    shim = types.SimpleNamespace(cfg=cfg, weight_dtype=dtype, guidance_embeds=bool(model.config.guidance_embeds))
    losses = []
    for x0, noise, sigmas, t5, clip in batches:
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            loss = trainer_mod.Trainer.flow_loss(shim, autocast_model, x0, noise, sigmas, t5, clip, cfg.loss_weighting)
            loss.backward()  # inside the kernel choice: checkpointing recomputes attention here
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return dict(losses=[loss.item() for loss in losses], final=lora_state(model))


def compare(run: dict, reference: dict, init: State) -> dict:
    """Relative differences of `run` against `reference`: per-step losses (largest, mean) and the LoRA's
    update from `init` (norm of the difference of the updates over the norm of the reference's update)."""
    rel = [abs(a - b) / abs(b) for a, b in zip(run["losses"], reference["losses"])]
    diff = sum(((run["final"][n] - reference["final"][n]).double() ** 2).sum() for n in init) ** 0.5
    update = sum(((reference["final"][n] - init[n]).double() ** 2).sum() for n in init) ** 0.5
    return dict(max_rel_loss_diff=max(rel), mean_rel_loss_diff=sum(rel) / len(rel),
                lora_update_rel_diff=float(diff / update))


def seeded_transformer(seed: int) -> Callable[..., torch.nn.Module]:
    """The random full-size transformer, the same weights at every call."""
    def build(*_args, **_kwargs) -> torch.nn.Module:
        torch.manual_seed(seed)
        return random_transformer()
    return build


def main() -> None:
    from torch.nn.attention import SDPBackend

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--precisions", nargs="+", choices=["bf16", "fp8"], default=["bf16", "fp8"],
                    help="the trainer's --base_model_precision, one run each")
    args = ap.parse_args()
    device, card = torch.device("cuda"), torch.cuda.get_device_name()
    build = seeded_transformer(0)
    trainer_mod.load_transformer = build  # instead of loading weights
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_synthetic_cache(Path(tmp) / "cache", args.res, images=args.steps)
        runs, first = {}, None
        for precision in args.precisions:
            cfg = TrainConfig(embeddings_dir=str(cache), output_dir=str(Path(tmp) / f"run-{precision}"),
                              pretrained_model_name_or_path=MODEL_ID, max_train_steps=10**6,
                              checkpointing_steps=10**6, logging_steps=10**6, validation_steps=0,
                              base_model_precision=precision)
            cfg.validate()
            runs[precision] = run = trainer_path(cfg, args.steps)
            first = first or run
            if any(not torch.equal(run["init"][n], first["init"][n]) for n in first["init"]) or any(
                    not torch.equal(a, b) for x, y in zip(run["batches"], first["batches"]) for a, b in zip(x, y)):
                raise RuntimeError("the trainer's runs started from different LoRA weights or drew other batches")
        reference = reference_path(cfg, build, first["batches"], first["init"], device,
                                   [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
        noise = reference_path(cfg, build, first["batches"], first["init"], device, [SDPBackend.EFFICIENT_ATTENTION])
        rows = [("reference (flash attention)", None, reference), ("reference (memory-efficient attention)", None,
                                                                    noise)]
        rows += [("fluxlora", precision, run) for precision, run in runs.items()]
        for path, precision, result in rows:
            print(json.dumps(dict(path=path, base=precision, card=card, res=args.res, steps=args.steps,
                                  **compare(result, reference, first["init"]),
                                  losses=[round(x, 5) for x in result["losses"]])), flush=True)


if __name__ == "__main__":
    main()
