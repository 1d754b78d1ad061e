"""The LoRA flow-matching training loop over the embedding cache.

`train(cfg)` builds everything, then the loop reads as a table of contents: step, maybe log,
maybe checkpoint, maybe preview. Accelerate is the only distributed seam (DDP, or FSDP2 sharding
the frozen base); file writes happen on the main process, fenced by barriers.
"""
from __future__ import annotations

import contextlib
import gc
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from . import flow, fp8, tracking
from .cache import EmbeddingCache
from .checkpoint import (load_checkpoint, load_fsdp_state, register_lora_hooks, resolve_checkpoint, save_checkpoint,
                         save_fsdp_state)
from .config import ConfigError, TrainConfig
from .lora_io import full_tensor, load_lora_into_transformer, lora_state_dict, save_lora
from .metrics import HostCopy, JsonlLog, plot_loss_curve, read_jsonl
from .models import (DTYPES, FlatParameters, WarmGuards, add_lora, attention_backends, blocks_to_checkpoint,
                     checkpoint_blocks, compile_blocks, contiguous_attention_grads, cublas_without_workspace,
                     flux_blocks, load_transformer, load_vae_and_scheduler)
from .optim import Outcome, SkippingStep, build_optimizer
from .preemption import StopRequest
from .sampler import Batch, BucketBatchStream, load_batch, prefetch, resume_position
from .sampling import embeddings_pipeline, image_grid, render_from_embeddings, save_png

logger = get_logger(__name__)
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights(folder) finds it
VALIDATION_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # fixed noise levels of the held-out loss


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    trackers = {"none": None, "all": "all"}.get(cfg.report_to, cfg.report_to)
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # CPU processes of `accelerate launch` then join one gloo group
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        # the schedule counts optimizer steps (train_step steps it once per applied update), not steps
        # times processes as accelerate would: a checkpoint then resumes on any number of processes
        step_scheduler_with_optimizer=False,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir, "logs"))),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.process_group_timeout)),
                         # DDP would otherwise send rank 0's buffers to all before every forward: with
                         # --base_model_precision fp8 those are the 12-24 GB of frozen fp8 weights.
                         # Gradients as views of DDP's buckets: no copy back of 838 LoRA gradients per step.
                         DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)],
    )


def sample_generator(seed: int, sample_index: int, device: torch.device) -> torch.Generator:
    """A sample's latent draw, noise and sigma depend only on the seed and its index in the stream:
    a resumed run draws what an uninterrupted one would, and N processes what one process would."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + sample_index)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.accelerator = acc = build_accelerator(cfg)
        self.fsdp = check_distributed(acc, cfg)
        self.device = acc.device
        cublas_without_workspace(self.device)
        self.weight_dtype = DTYPES[cfg.mixed_precision]
        set_seed(cfg.seed)

        # checked before any model loads: a missing checkpoint or a cache for other settings
        self.resumed_from = resolve_checkpoint(self.out, cfg.resume_from_checkpoint) \
            if cfg.resume_from_checkpoint else None
        # one sha256 pass per machine: on a cluster each node may read its own copy of the cache
        self.cache = EmbeddingCache(cfg.embeddings_dir, verify=acc.is_local_main_process)
        self.cache.check_fingerprint(pretrained_model_name_or_path=cfg.components, revision=cfg.revision)
        entries = [e for e in self.cache.entries if not cfg.resolutions or e.resolution in cfg.resolutions]
        held_out = sorted({e.sample_id for e in entries})[:cfg.holdout_images]  # ids are hashes: a random pick
        self.holdout = [e for e in entries if e.sample_id in held_out and not e.flipped]
        entries = [e for e in entries if e.sample_id not in held_out]
        self.global_batch = cfg.train_batch_size * acc.num_processes
        self.stream = BucketBatchStream(entries, self.global_batch, cfg.seed, repeats=cfg.repeats,
                                        caption_dropout=cfg.caption_dropout)

        self.cudnn_attention = cfg.attention_backend == "cudnn"
        self.cuda_graphs = use_cuda_graphs(cfg, self.device, self.fsdp)
        # tokens (text + image) of the largest batch: what activation memory is sized for
        self.max_tokens = cfg.train_batch_size * max(
            (self.cache.max_sequence_length + (e.height // 16) * (e.width // 16) for e in entries), default=0)
        transformer, self.flat = self.build_transformer()
        self.params = [self.flat.flat] if self.flat else [p for p in transformer.parameters() if p.requires_grad]
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        optimizer = build_optimizer(cfg, self.params)
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                  num_training_steps=cfg.max_train_steps)
        self.transformer, self.optimizer, self.lr_scheduler = acc.prepare(transformer, optimizer, scheduler)
        if self.fsdp:  # FSDP replaces the parameters with sharded ones (the optimizer is remapped, our list is not)
            self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        elif self.flat:
            self.flat.bind()  # prepare may have moved, i.e. copied, the LoRA weights out of the flat tensor
        register_lora_hooks(acc, self.transformer)
        # the skip of a non-finite step decided on the GPU, except where the optimizer or accelerate must read
        # the gradients on the host anyway (optim.SkippingStep)
        self.updates = SkippingStep(self.optimizer, self.lr_scheduler, self.params,
                                    defer=not self.fsdp and cfg.optimizer != "prodigy" and acc.scaler is None)

        self.step, self.position = 0, 0
        resumed = self.resumed_from
        if resumed:
            state = load_checkpoint(acc, resumed, self._fsdp_state(load_fsdp_state))
            self.step, self.position = state["step"], resume_position(state, self.global_batch)
        self.log = JsonlLog(self.out / "logs.jsonl", resume_step=self.step if resumed else None) \
            if acc.is_main_process else None
        self.run_info = tracking.load_run_info(self.out) if resumed else {}
        tracking.init_trackers(acc, cfg, self.run_info)
        if acc.is_main_process:
            tracking.save_run_info(self.out, self.run_info)
        self.stop = StopRequest()
        self.nan_streak = 0
        self.pending_log: tuple[int, int, Callable[[], dict[str, Any]]] | None = None  # see maybe_log
        self._preview_models: tuple | None = None
        self.preview_rounds: list[tuple[int, list]] = []

    def build_transformer(self) -> tuple[torch.nn.Module, FlatParameters | None]:
        """The frozen base with its LoRA on the device (fp8 blocks if asked, compiled on CUDA), and the
        LoRA weights as one flat tensor for the optimizer (None under FSDP, which shards each one)."""
        cfg = self.cfg
        transformer = load_transformer(cfg.pretrained_model_name_or_path, base_components=cfg.base_components,
                                       revision=cfg.revision, variant=cfg.variant, dtype=self.weight_dtype)
        if not cfg.fp8_base and not self.fsdp:  # FSDP moves each process's shard to its GPU
            transformer.to(self.device)
        params = add_lora(transformer, rank=cfg.rank, alpha=cfg.alpha, target_modules=cfg.lora_layers,
                          dropout=cfg.lora_dropout, init=cfg.init_lora_weights)
        if cfg.init_lora:
            load_lora_into_transformer(transformer, cfg.init_lora)
        if self.cudnn_attention:
            contiguous_attention_grads(transformer)
        if cfg.fp8_base:  # after the LoRA (see quantize_blocks); block by block, so bf16 never fills the GPU
            fp8.quantize_blocks(transformer, self.device, keep_transpose=not cfg.low_memory)
            transformer.to(self.device)
        self.checkpointed_blocks = self.checkpoint_as_memory_requires(transformer, params)
        flat = None if self.fsdp else FlatParameters(params)
        # Under DDP, Dynamo would split each compiled block's graph at DDP's bucket boundaries (its
        # "DDPOptimizer", made for compiling the whole wrapped model). The blocks are compiled one by one,
        # so DDP's all-reduces already start as each block's backward ends; on 4 H200s the splits made
        # the 512 px step 0.57 s instead of 0.15 s, and with --cuda_graphs it hung while recording them.
        torch._dynamo.config.optimize_ddp = False
        compiled = cfg.compile and self.device.type == "cuda"
        if compiled:
            compile_blocks(transformer, cuda_graphs=self.cuda_graphs, checkpointed=self.checkpointed_blocks)
        # not under FSDP, which swaps the parameters the compiled blocks see between sharded and whole
        self.warm_guards = WarmGuards(compiled and not self.fsdp)
        return transformer, flat

    # ---------------------------------------------------------------- the loop
    def run(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        if cfg.validation_steps and self.resumed_from is None:
            self.maybe_preview(force=True)  # the "before" row of the sample grid
        batches = prefetch(self.stream.iterate(self.position, acc.process_index, acc.num_processes),
                           lambda b: load_batch(self.cache, b, pin=self.device.type == "cuda"))
        window = _Window(self.device)
        self.bar = tqdm(total=cfg.max_train_steps, initial=self.step, disable=not acc.is_main_process, desc="train")
        try:
            with contextlib.closing(batches), scheduled_garbage_collection(cfg.gc_steps > 0):
                while self.step < cfg.max_train_steps:
                    self.train_step(batches, window)
                    self.bar.update(1)
                    self.maybe_log(window)
                    self.maybe_checkpoint()
                    self.maybe_stop()
                    self.maybe_validate()
                    self.maybe_preview()
                    self.maybe_collect_garbage()
                self.settle()  # the last step's outcome and log row, before the bar closes and finish exports
        finally:
            self.bar.close()
            self.stop.restore()
        return self.finish()

    def checkpoint_as_memory_requires(self, transformer: torch.nn.Module, params: list[torch.nn.Parameter]) -> int:
        """Recompute every block's activations with --gradient_checkpointing (or --low_memory); otherwise,
        on one GPU or under DDP, as few blocks as let the largest batch's activations fit the memory left
        once the model is on the GPU. Returns how many blocks recompute."""
        blocks = len(flux_blocks(transformer))
        if self.cfg.checkpointing:
            transformer.enable_gradient_checkpointing()
            return blocks
        if self.device.type != "cuda" or self.fsdp:  # FSDP has not sharded the base yet: memory unknown here
            return 0
        free, _ = torch.cuda.mem_get_info(self.device)
        # kept back: the optimizer's state, gradients and DDP's buckets (<= 16 bytes per LoRA value),
        # allocator slack, workspaces and the previews' VAE decode. Not a share of the card's total: on
        # an H200 acting as a 40 GiB card, 5% of 141 GiB left 13 GiB unused (27 GiB peak, 51 blocks).
        reserve = 2 * 2**30 + free // 20 + 16 * sum(p.numel() for p in params)
        count = blocks_to_checkpoint(free - reserve, self.max_tokens, blocks)
        if count:
            checkpoint_blocks(transformer, count)
            logger.info(f"Recomputing {count} of {blocks} blocks' activations in the backward pass: batches of up "
                        f"to {self.max_tokens} tokens would not fit the {free / 2**30:.1f} GiB left otherwise "
                        f"(--gradient_checkpointing recomputes all)", main_process_only=True)
        return count

    def train_step(self, batches: Iterator[tuple[Batch, dict]], window: "_Window") -> None:
        """One optimizer step over `gradient_accumulation_steps` batches."""
        cfg, acc = self.cfg, self.accelerator
        for _ in range(cfg.gradient_accumulation_steps):
            batch, data = next(batches)
            with acc.accumulate(self.transformer), attention_backends(self.device, self.cudnn_attention), \
                    self.warm_guards(data["mean"], data["t5"]):
                loss, sigmas = self.loss(batch, data)
                acc.backward(loss)
                if acc.sync_gradients:
                    self.settle()  # the last step's outcome: the GPU is past it, busy with this step's backward
                    if self.flat:
                        self.flat.collect_grads()
                    # the norm of the all-reduced gradients: every process takes the same decision
                    grad_norm = full_tensor(acc.clip_grad_norm_(self.params, cfg.max_grad_norm or float("inf")))
                    window.grad_norm = grad_norm
                    self.updates.step(grad_norm, self.step + 1)
                self.optimizer.zero_grad(set_to_none=True)
            window.add(loss.detach(), sigmas, len(batch.entries))
            self.position += 1
        self.step += 1

    def loss(self, batch: Batch, data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow-matching loss of one batch: x_t = (1 - s) x0 + s noise, target noise - x0."""
        cfg, dev = self.cfg, self.device
        mean, std = (data[k].to(dev, non_blocking=True) for k in ("mean", "std"))
        b, _, h, w = mean.shape
        mu = flow.image_seq_len_shift((h // 2) * (w // 2)) if cfg.timestep_sampling == "flux_shift" else None
        x0, noise, sigmas = [], [], []
        for i, index in enumerate(batch.sample_indices):  # per-sample draws: see sample_generator
            gen = sample_generator(cfg.seed, index, dev)
            x0.append(flow.latents_from_posterior(mean[i:i + 1], std[i:i + 1], self.cache.vae_scaling_factor,
                                                  self.cache.vae_shift_factor, generator=gen))
            noise.append(torch.randn(x0[-1].shape, generator=gen, device=dev))
            sigmas.append(flow.sample_sigmas(1, cfg.timestep_sampling, logit_mean=cfg.logit_mean,
                                             logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, mu=mu,
                                             generator=gen, device=dev))
        x0, noise, sigmas = torch.cat(x0), torch.cat(noise), torch.cat(sigmas)  # [B,16,H,W] fp32, [B]
        t5 = data["t5"].to(dev, self.weight_dtype, non_blocking=True)
        clip = data["clip"].to(dev, self.weight_dtype, non_blocking=True)
        return self.flow_loss(self.transformer, x0, noise, sigmas, t5, clip, cfg.loss_weighting), sigmas

    def flow_loss(self, model: torch.nn.Module, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                  t5: torch.Tensor, clip: torch.Tensor, weighting: str = "none") -> torch.Tensor:
        """Velocity-prediction MSE at x_t = (1 - sigma) x0 + sigma noise; x0, noise [B,16,H,W] fp32."""
        b, _, h, w = x0.shape
        dev = x0.device
        pred = model(
            hidden_states=flow.pack_latents(flow.noisy_latents(x0, noise, sigmas)).to(self.weight_dtype),
            timestep=sigmas,  # in [0, 1]: the transformer multiplies by 1000 itself
            guidance=flow.guidance_vector(b, self.cfg.guidance_scale, dev) if self.guidance_embeds else None,
            pooled_projections=clip, encoder_hidden_states=t5,
            txt_ids=flow.text_ids(t5.shape[1], dev, self.weight_dtype),
            img_ids=flow.latent_image_ids(h, w, dev, self.weight_dtype),
            return_dict=False)[0]
        target = flow.pack_latents(flow.velocity_target(x0, noise))
        return flow.flow_matching_loss(pred, target, flow.loss_weights(weighting, sigmas))

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss over the held-out images at fixed sigmas with fixed noise and the posterior
        mean as x0: the same inputs every time, so the curve shows learning without sampling noise."""
        model, dev, total = self.accelerator.unwrap_model(self.transformer), self.device, 0.0
        for i, entry in enumerate(self.holdout):
            mean, _ = self.cache.latent_dist(entry)
            x0 = flow.normalize_latents(mean[None], scaling_factor=self.cache.vae_scaling_factor,
                                        shift_factor=self.cache.vae_shift_factor).to(dev)
            t5, clip = (t[None].to(dev, self.weight_dtype) for t in self.cache.text(entry.caption_id))
            for k, sigma in enumerate(VALIDATION_SIGMAS):
                gen = sample_generator(self.cfg.seed + 1, i * len(VALIDATION_SIGMAS) + k, dev)
                noise = torch.randn(x0.shape, generator=gen, device=dev)
                with self.accelerator.autocast(), attention_backends(dev, cudnn=True):
                    total += self.flow_loss(model, x0, noise, torch.full((1,), sigma, device=dev), t5, clip).item()
        return total / (len(self.holdout) * len(VALIDATION_SIGMAS))

    def settle(self) -> None:
        """Account for the optimizer steps whose outcome the host has not read yet, then write the log row
        waiting for them. A non-finite loss or gradient skips its update with a warning; `--max_nan_steps`
        of them in a row stop the run with a checkpoint of the last good state."""
        for outcome in self.updates.settle():
            self.record(outcome)
        self.write_log()

    def record(self, outcome: Outcome) -> None:
        if outcome.applied:
            self.nan_streak = 0
            return
        self.nan_streak += 1
        logger.warning(f"step {outcome.step}: non-finite loss or gradient (norm {outcome.grad_norm}); update skipped "
                       f"({self.nan_streak} in a row, --max_nan_steps {self.cfg.max_nan_steps})")
        if self.nan_streak >= self.cfg.max_nan_steps:
            self.save_checkpoint()
            raise NonFiniteLoss(f"{self.nan_streak} optimizer steps in a row had a non-finite loss or gradient "
                                f"(last at step {outcome.step}); the last good state is saved in "
                                f"{self.out / f'checkpoint-{self.step}'}. Lower --learning_rate or check the "
                                f"data, then resume with --resume_from_checkpoint latest")

    def maybe_stop(self) -> None:
        """On SIGTERM/SIGINT/SIGUSR1 (any process): checkpoint and leave with EXIT_PREEMPTED."""
        if not self.stop.agreed(self.accelerator):
            return
        path = self.save_checkpoint()
        self.accelerator.end_training()
        raise Preempted(path)

    # ---------------------------------------------------------------- periodic work
    def maybe_collect_garbage(self) -> None:
        """Python's collector, run here instead of when it decides: a pause of tens of ms on one process
        delays every process's next synchronised step (torchtitan schedules it the same way)."""
        if self.cfg.gc_steps and self.step % self.cfg.gc_steps == 0:
            gc.collect()

    def maybe_log(self, window: "_Window") -> None:
        """Start this step's log row. It is written at the next `settle` (in the next step, or before a
        checkpoint, the held-out loss, the previews or the end), with the LR this step leaves: by then the
        GPU is past it, and reading the loss makes the host wait for nothing."""
        if self.step % self.cfg.logging_steps and self.step != self.cfg.max_train_steps:
            return
        self.pending_log = (self.step, self.stream.epoch_of(self.position - 1), window.flush(self.accelerator))

    def write_log(self) -> None:
        if self.pending_log is None:
            return
        step, epoch, read = self.pending_log
        self.pending_log = None
        row = {**read(), "step": step, "epoch": epoch, "lr": self.lr_scheduler.get_last_lr()[0]}
        if self.device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        if self.accelerator.is_main_process:
            self.log.write(row)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}")
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def maybe_checkpoint(self) -> None:
        cfg = self.cfg
        if self.step % cfg.checkpointing_steps and self.step != cfg.max_train_steps:
            return
        path = self.save_checkpoint()
        if cfg.oxen_upload_checkpoints:
            if self.accelerator.is_main_process:
                self.upload({f"checkpoints/{path.name}/{LORA_FILE}": path / LORA_FILE},
                            f"checkpoint at step {self.step}")
            self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> Path:
        self.settle()  # the schedule and the optimizer's step counts as of the last step
        cfg = self.cfg
        state = {"step": self.step, "position": self.position, "global_batch": self.global_batch,
                 "world_size": self.accelerator.num_processes, "seed": cfg.seed}
        return save_checkpoint(self.accelerator, self.out, self.step, state,
                               lambda d: self.export_lora(d / LORA_FILE), cfg.checkpoints_total_limit,
                               self._fsdp_state(save_fsdp_state))

    def _fsdp_state(self, function):
        """Under FSDP, `save_state`/`load_state` of the checkpoint module (None: accelerate's own)."""
        if not self.fsdp:
            return None
        return lambda folder: function(self.accelerator, self.transformer, self.optimizer, self.lr_scheduler, folder)

    def maybe_validate(self) -> None:
        """Held-out loss (`--holdout_images`) every --validation_steps; every process computes it alike."""
        cfg = self.cfg
        if not self.holdout or not cfg.validation_steps:
            return
        if self.step % cfg.validation_steps and self.step != cfg.max_train_steps:
            return
        self.settle()  # the step's own row first
        row = {"step": self.step, "val_loss": self.validation_loss()}
        if self.accelerator.is_main_process:
            self.log.write(row)
        self.accelerator.log({"val_loss": row["val_loss"]}, step=self.step)

    def maybe_preview(self, force: bool = False) -> None:
        cfg, acc = self.cfg, self.accelerator
        if not cfg.validation_steps or not self.cache.validation:
            return
        if not force and self.step % cfg.validation_steps and self.step != cfg.max_train_steps:
            return
        self.settle()  # the step's log row before its previews' (W&B takes steps in order)
        acc.wait_for_everyone()
        # under FSDP each forward needs every process's shards: all render, the main process keeps
        images = self.render_previews() if acc.is_main_process or self.fsdp else None
        if acc.is_main_process:
            folder = self.out / "samples" / f"step-{self.step:06d}"
            for i, ((prompt, _), image) in enumerate(zip(self.cache.validation, images)):
                save_png(image, folder / f"{i:02d}.png", {"prompt": prompt, "seed": cfg.validation_seed + i,
                                                          "step": self.step})
            self.preview_rounds.append((self.step, images))
            tracking.log_images(acc, images, [p for p, _ in self.cache.validation], self.step)
        acc.wait_for_everyone()

    def render_previews(self) -> list:
        cfg = self.cfg
        if self._preview_models is None:
            self._preview_models = load_vae_and_scheduler(cfg.components, revision=cfg.revision,
                                                          dtype=self.weight_dtype)
            self._preview_models[0].to(self.device)
        vae, scheduler = self._preview_models
        pipe = embeddings_pipeline(self.accelerator.unwrap_model(self.transformer), vae, scheduler)
        pipe.set_progress_bar_config(disable=True)
        embeddings = [self.cache.text(cid) for _, cid in self.cache.validation]
        with self.accelerator.autocast(), attention_backends(self.device, cudnn=True):
            return render_from_embeddings(pipe, embeddings, width=cfg.validation_width,
                                          height=cfg.validation_height, steps=cfg.validation_inference_steps,
                                          guidance_scale=cfg.validation_guidance_scale, seed=cfg.validation_seed,
                                          device=self.device)

    # ---------------------------------------------------------------- outputs
    def lora_metadata(self) -> dict[str, str]:
        cfg = self.cfg
        return {"base_model": cfg.pretrained_model_name_or_path, "rank": str(cfg.rank), "alpha": str(cfg.alpha),
                "steps": str(self.step), "trigger_phrase": str(self.cache.fingerprint.get("trigger_phrase", "")),
                "lora_layers": ",".join(cfg.lora_layers)}

    def export_lora(self, path: Path) -> None:
        """The LoRA file (main process); every process calls this, as FSDP's shards are gathered."""
        model = self.accelerator.unwrap_model(self.transformer)
        state = lora_state_dict(model)
        if self.accelerator.is_main_process:
            save_lora(path, model, metadata=self.lora_metadata(), state_dict=state)

    def finish(self) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        lora = self.out / LORA_FILE
        self.export_lora(lora)
        if acc.is_main_process:
            self.log.close()
            plot_loss_curve(read_jsonl(self.out / "logs.jsonl"), self.out / "loss_curve.png")
            if self.preview_rounds:
                grid = image_grid([imgs for _, imgs in self.preview_rounds],
                                  [f"step {s}" for s, _ in self.preview_rounds])
                grid.save(self.out / "samples_grid.png")
            if self.cfg.wandb_log_model:
                tracking.log_lora_artifact(acc, lora, tracking.run_name(self.cfg), self.lora_metadata())
            if self.cfg.oxen_repo:
                self.upload(self.result_files(), f"LoRA after {self.step} steps")
        acc.wait_for_everyone()
        acc.end_training()
        return lora

    def result_files(self) -> dict[str, Path]:
        """What a run publishes: LoRA, log, loss curve, previews and a model card (repository paths)."""
        cfg = self.cfg
        files = {name: self.out / name for name in (LORA_FILE, "logs.jsonl", "loss_curve.png", "samples_grid.png")
                 if (self.out / name).is_file()}
        for png in sorted((self.out / "samples").glob("step-*/*.png")):
            files[png.relative_to(self.out).as_posix()] = png
        card = self.out / "README.md"
        from .oxen import model_card  # oxenai is needed only by runs that publish to Oxen

        card.write_text(model_card(
            base_model=cfg.pretrained_model_name_or_path, rank=cfg.rank, alpha=cfg.alpha, steps=self.step,
            trigger_phrase=str(self.cache.fingerprint.get("trigger_phrase", "")), learning_rate=cfg.learning_rate,
            resolutions=sorted({e.resolution for e in self.stream.entries}),
            sample_files=[p for p in files if p.endswith(".png") and p.startswith("samples/")]))
        files["README.md"] = card
        return files

    def upload(self, files: dict[str, Path], message: str) -> None:
        """Commit to --oxen_repo on this run's branch (main process). Failures warn, never stop training."""
        from .oxen import upload_results

        branch = upload_results(self.cfg.oxen_repo, files, run_name=tracking.run_name(self.cfg), message=message,
                                branch=self.cfg.oxen_branch or self.run_info.get("oxen_branch"),
                                host=self.cfg.oxen_host)
        if branch and branch != self.run_info.get("oxen_branch"):
            self.run_info["oxen_branch"] = branch  # a resumed run commits to the same branch
            tracking.save_run_info(self.out, self.run_info)


class _Window:
    """Loss and throughput since the last log row, kept on the device until read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.grad_norm: torch.Tensor | None = None
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.sigma_sum = torch.zeros((), device=self.device)
        self.batches = 0
        self.images = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, sigmas: torch.Tensor, images: int) -> None:
        self.loss_sum += loss.float()
        self.sigma_sum += sigmas.float().mean()
        self.batches += 1
        self.images += images

    def flush(self, acc: Accelerator) -> Callable[[], dict[str, Any]]:
        """Send the window's statistics to the host and start a new window. Returns the reader of its log
        row (loss, sigma, images/s, grad norm): called once the GPU is past this step (during the next),
        it does not make the host wait."""
        stats = torch.stack([self.loss_sum / self.batches, self.sigma_sum / self.batches])
        stats = acc.reduce(stats, reduction="mean")  # averaged over processes
        # torch.full, not torch.tensor: a copy from the host would wait for the GPU to drain
        images = acc.reduce(torch.full((), float(self.images), device=self.device), reduction="sum")
        elapsed = time.perf_counter() - self.start
        copy = HostCopy(stats, images, *([] if self.grad_norm is None else [self.grad_norm.float()]))
        self._reset()

        def row() -> dict[str, Any]:
            (loss, sigma), images, *grad_norm = copy.get()
            return {"loss": loss.item(), "sigma": sigma.item(), "images_per_s": images.item() / elapsed,
                    **({"grad_norm": grad_norm[0].item()} if grad_norm else {})}
        return row


class Preempted(Exception):
    """Stopped by a signal after saving `checkpoint`; exit with preemption.EXIT_PREEMPTED."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint
        super().__init__(f"stopped by a signal; resume from {checkpoint} with --resume_from_checkpoint latest")


class NonFiniteLoss(RuntimeError):
    """Too many non-finite steps in a row; the last good state is checkpointed."""


@contextlib.contextmanager
def scheduled_garbage_collection(scheduled: bool) -> Iterator[None]:
    """Python's automatic garbage collection off inside the block when `scheduled` (the loop collects
    in Trainer.maybe_collect_garbage, on every process at the same step); as it was after the block."""
    automatic = gc.isenabled()
    if scheduled:
        gc.collect()
        gc.disable()
    try:
        yield
    finally:
        if automatic:
            gc.enable()


def check_distributed(acc: Accelerator, cfg: TrainConfig) -> bool:
    """Whether the run shards the model with FSDP2; refuses what does not work with it."""
    kind = acc.distributed_type.name
    if kind == "DEEPSPEED":
        raise ConfigError("config_file", "DeepSpeed is not supported (docs/cluster.md, 'DeepSpeed'); launch with "
                                         "accelerate_configs/multi_gpu_ddp.yaml, or accelerate_configs/fsdp.yaml to "
                                         "shard the base")
    if kind != "FSDP":
        return False
    if not acc.is_fsdp2:
        raise ConfigError("config_file", "FSDP1 is not supported: set fsdp_version: 2 (accelerate_configs/fsdp.yaml)")
    if cfg.fp8_base:
        raise ConfigError("base_model_precision", "fp8 (also implied by --low_memory) keeps weights that FSDP does "
                                                  "not shard; drop it under FSDP (--gradient_checkpointing saves "
                                                  "memory) or train without FSDP")
    if cfg.cuda_graphs:
        raise ConfigError("cuda_graphs", "FSDP gathers each block's weights between its kernels, which a CUDA graph "
                                         "cannot replay; drop --cuda_graphs under FSDP")
    if cfg.optimizer == "adamw8bit":
        raise ConfigError("optimizer", "adamw8bit cannot step FSDP's sharded parameters; pass --optimizer adamw "
                                       "(under FSDP each GPU keeps only its share of the LoRA's optimizer state)")
    return True


def use_cuda_graphs(cfg: TrainConfig, device: torch.device, fsdp: bool) -> bool:
    """--cuda_graphs as given, or by default wherever graphs apply: compiled blocks on CUDA, one batch per
    optimizer step (a replay reuses the memory of the previous one's gradients) and no FSDP."""
    if not (cfg.compile and device.type == "cuda"):
        return False
    if cfg.cuda_graphs is not None:
        return cfg.cuda_graphs
    return cfg.gradient_accumulation_steps == 1 and not fsdp


def train(cfg: TrainConfig) -> Path:
    return Trainer(cfg).run()
