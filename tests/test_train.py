"""The trainer end to end on the tiny model: learning, resuming, outputs that diffusers loads."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

from fluxlora import flow
from fluxlora.cache import CacheError, EmbeddingCache
from fluxlora.config import ConfigError, TrainConfig
from fluxlora.metrics import read_jsonl
from fluxlora.sampler import BucketBatchStream, load_batch
from fluxlora.trainer import LORA_FILE, Trainer, train

from .conftest import reset_accelerate, tiny_lora_transformer, train_config


DEFAULTS = dict(max_train_steps=8, checkpointing_steps=4, seed=7)


def make_cfg(cache: Path, model: Path, out: Path, **overrides) -> TrainConfig:
    return train_config(cache, model, out, **{**DEFAULTS, **overrides})


def tiny_forward(model: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
    """The tiny transformer's prediction on random inputs drawn from `gen`: 16 image and 8 text tokens."""
    return model(hidden_states=torch.randn(1, 16, 64, generator=gen),
                 encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
                 pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.5]),
                 img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0]),
                 return_dict=False)[0]


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def test_loss_falls_on_demo_set(demo_cache, tiny_flux_dev, tmp_path):
    cfg = make_cfg(demo_cache, tiny_flux_dev, tmp_path / "run", max_train_steps=60, checkpointing_steps=60,
                   optimizer="adamw", train_batch_size=2)
    train(cfg)
    losses = [row["loss"] for row in read_jsonl(tmp_path / "run" / "logs.jsonl")]
    assert len(losses) == 60
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.9 * first, (first, last)
    assert (tmp_path / "run" / "loss_curve.png").is_file()


def test_log_rows_and_checkpoints_every_n_steps_and_at_the_last(demo_cache, tiny_flux_dev, tmp_path):
    """Rows every --logging_steps and checkpoints every --checkpointing_steps, both also at the last step
    when it is off the grid; each row holds the LR its step leaves and the epoch of its last batch."""
    out = tmp_path / "run"
    train(make_cfg(demo_cache, tiny_flux_dev, out, max_train_steps=5, logging_steps=2, checkpointing_steps=2,
                   train_batch_size=4, lr_scheduler="linear", lr_warmup_steps=2, optimizer="adamw"))
    rows = read_jsonl(out / "logs.jsonl")
    assert [row["step"] for row in rows] == [2, 4, 5]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    # linear: up to 1e-3 over 2 warmup steps, then down to 0 at step 5
    assert [row["lr"] for row in rows] == pytest.approx([1e-3, 1e-3 / 3, 0.0])
    stream = BucketBatchStream(EmbeddingCache(demo_cache).entries, 4, seed=7)  # 12 images: ~3 batches an epoch
    assert [row["epoch"] for row in rows] == [stream.epoch_of(row["step"] - 1) for row in rows]
    assert rows[-1]["epoch"] >= 1


def test_a_rows_loss_and_sigma_are_means_over_its_steps_batches(demo_cache, tiny_flux_dev, tmp_path, monkeypatch):
    drawn = []
    original = Trainer.loss

    def recording(self, batch, data):
        loss, sigmas = original(self, batch, data)
        drawn.append((loss.item(), sigmas.tolist()))
        return loss, sigmas

    monkeypatch.setattr(Trainer, "loss", recording)
    out = tmp_path / "run"
    train(make_cfg(demo_cache, tiny_flux_dev, out, max_train_steps=3, gradient_accumulation_steps=2,
                   train_batch_size=2, optimizer="adamw"))
    rows = read_jsonl(out / "logs.jsonl")
    assert len(rows) == 3 and len(drawn) == 6
    for row, first, second in zip(rows, drawn[0::2], drawn[1::2]):
        assert row["loss"] == pytest.approx((first[0] + second[0]) / 2)
        assert row["sigma"] == pytest.approx(sum(first[1] + second[1]) / 4)


def test_resume_matches_uninterrupted_run(demo_cache, tiny_flux_dev, tmp_path, monkeypatch):
    """Killed after step 5 (checkpoint at 4), resumed from 'latest': the same LoRA as one run.

    Gradient accumulation, batches of 2, caption dropout, 8-bit AdamW and a cosine schedule with
    warmup all carry state that a resume must restore exactly.
    """
    common = dict(max_train_steps=8, checkpointing_steps=4, gradient_accumulation_steps=2, train_batch_size=2,
                  caption_dropout=0.3, lr_scheduler="cosine", lr_warmup_steps=2)
    train(make_cfg(demo_cache, tiny_flux_dev, tmp_path / "whole", **common))
    reset_accelerate()

    class Killed(Exception):
        pass

    original = Trainer.maybe_checkpoint

    def kill_after_step_5(self):
        original(self)
        if self.step == 5:
            raise Killed

    monkeypatch.setattr(Trainer, "maybe_checkpoint", kill_after_step_5)
    with pytest.raises(Killed):
        train(make_cfg(demo_cache, tiny_flux_dev, tmp_path / "split", **common))
    monkeypatch.setattr(Trainer, "maybe_checkpoint", original)
    reset_accelerate()
    train(make_cfg(demo_cache, tiny_flux_dev, tmp_path / "split", resume_from_checkpoint="latest", **common))

    whole = load_file(tmp_path / "whole" / "checkpoint-8" / "adapter_fp32.safetensors")
    split = load_file(tmp_path / "split" / "checkpoint-8" / "adapter_fp32.safetensors")
    assert whole.keys() == split.keys()
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=0, atol=1e-6, msg=key)
    assert any(v.abs().sum() > 0 for k, v in whole.items() if "lora_B" in k)  # it did train
    # the log reads as one run: steps 1..8 once each, and the same losses
    rows = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "whole" / "logs.jsonl")}
    split_rows = read_jsonl(tmp_path / "split" / "logs.jsonl")
    assert [r["step"] for r in split_rows] == list(range(1, 9))
    for r in split_rows:
        assert r["loss"] == pytest.approx(rows[r["step"]], abs=1e-6)


def test_each_sample_draws_its_own_x0_noise_and_sigma(demo_cache, tiny_flux_dev, tmp_path, monkeypatch):
    """In a batch of two each sample gets what it gets alone: its own posterior, and noise and sigma seeded by
    its index in the stream, not by its place in the batch. flux_shift shifts those draws by the batch's own
    image token count, as FluxPipeline's schedule does."""
    seen = []
    monkeypatch.setattr(Trainer, "flow_loss", lambda self, model, x0, noise, sigmas, *rest: seen.append(
        (x0, noise, sigmas)) or torch.zeros(()))
    trainer = Trainer(make_cfg(demo_cache, tiny_flux_dev, tmp_path / "run", train_batch_size=2))
    batch = next(trainer.stream.iterate(0, 0, 1))
    trainer.loss(batch, load_batch(trainer.cache, batch))
    for i in range(2):
        alone = dataclasses.replace(batch, entries=batch.entries[i:i + 1], sample_indices=batch.sample_indices[i:i + 1],
                                    drop_caption=batch.drop_caption[i:i + 1])
        trainer.loss(alone, load_batch(trainer.cache, alone))
    (x0, noise, sigmas), *alone = seen
    for i, drawn in enumerate(alone):
        for name, together, apart in zip(("x0", "noise", "sigma"), (x0, noise, sigmas), drawn):
            assert torch.equal(together[i:i + 1], apart), name
    assert not torch.equal(x0[0], x0[1]) and sigmas[0] != sigmas[1]

    trainer.cfg = dataclasses.replace(trainer.cfg, timestep_sampling="flux_shift")
    trainer.loss(batch, load_batch(trainer.cache, batch))
    h, w = x0.shape[-2:]
    mu = flow.image_seq_len_shift((h // 2) * (w // 2))  # packed image tokens
    torch.testing.assert_close(seen[-1][2], flow.shift_sigmas(sigmas, mu))


def test_lora_file_loads_in_flux_pipeline_and_changes_output(demo_cache, tiny_flux_dev, tmp_path, caplog):
    cfg = make_cfg(demo_cache, tiny_flux_dev, tmp_path / "run", max_train_steps=6, checkpointing_steps=3,
                   optimizer="adamw", learning_rate=5e-3)
    lora = train(cfg)
    assert lora == tmp_path / "run" / LORA_FILE
    keys = load_file(lora).keys()
    assert all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert not any("base_model" in k or "module." in k or "_orig_mod" in k for k in keys)
    assert (tmp_path / "run" / "checkpoint-3" / LORA_FILE).is_file()

    pipe = FluxPipeline.from_pretrained(tiny_flux_dev, dtype=torch.float32)
    kwargs = dict(prompt="a red circle", height=64, width=64, num_inference_steps=3, output_type="latent")
    base = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    with caplog.at_level("WARNING"):
        pipe.load_lora_weights(lora)
    assert not [r for r in caplog.records if "led to unexpected keys" in r.getMessage()
                or "missing keys" in r.getMessage().lower()]
    # every tensor of the file landed in the adapter, and the adapter has no other LoRA weights
    params = {n.replace(".default_0", ""): p for n, p in pipe.transformer.named_parameters() if "lora_" in n}
    saved = load_file(lora)
    assert set(params) == {k.removeprefix("transformer.") for k in saved}
    for key, value in saved.items():
        torch.testing.assert_close(params[key.removeprefix("transformer.")].detach(), value.float())
    peft_config = pipe.transformer.peft_config["default_0"]
    assert peft_config.r == 16 and peft_config.lora_alpha == 16
    with_lora = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (with_lora - base).abs().max() > 1e-4


@pytest.mark.slow
def test_overfit_one_image_moves_samples_towards_it(tiny_flux_dev, demo_dir, tmp_path):
    """A LoRA overfit on one image pulls FluxPipeline's samples (its caption, fixed seeds) closer to
    that image's latents than the base model's samples are."""
    from accelerate import Accelerator

    from fluxlora import precompute
    from fluxlora.config import PrecomputeConfig

    data = tmp_path / "one"
    data.mkdir()
    for suffix in (".jpg", ".txt"):
        shutil.copy(demo_dir / "images" / f"01_red_circle{suffix}", data / f"01_red_circle{suffix}")
    pcfg = PrecomputeConfig(dataset=str(data), embeddings_dir=str(tmp_path / "cache"),
                            pretrained_model_name_or_path=str(tiny_flux_dev), resolutions=[64],
                            max_sequence_length=32)
    precompute.run(pcfg, Accelerator(cpu=True))
    reset_accelerate()
    cfg = make_cfg(tmp_path / "cache", tiny_flux_dev, tmp_path / "run", max_train_steps=400,
                   checkpointing_steps=400, optimizer="adamw", logging_steps=50)
    lora = train(cfg)

    cache = EmbeddingCache(tmp_path / "cache")
    (entry,) = cache.entries
    mean, _ = cache.latent_dist(entry)
    target = flow.pack_latents(((mean.float() - cache.vae_shift_factor) * cache.vae_scaling_factor)[None])
    caption = (data / "01_red_circle.txt").read_text().strip()

    pipe = FluxPipeline.from_pretrained(tiny_flux_dev, dtype=torch.float32)

    def distance() -> float:
        total = 0.0
        for seed in range(4):
            out = pipe(prompt=caption, height=64, width=64, num_inference_steps=20, max_sequence_length=32,
                       output_type="latent", generator=torch.Generator().manual_seed(seed)).images
            total += torch.mean((out - target) ** 2).item()
        return total / 4

    base = distance()
    pipe.load_lora_weights(lora)
    tuned = distance()
    assert tuned < 0.85 * base, (base, tuned)


def test_trainer_refuses_cache_of_another_model(demo_cache, tiny_flux_schnell, tmp_path, monkeypatch):
    monkeypatch.setattr("fluxlora.trainer.load_transformer", None)  # refused before any model loads
    cfg = make_cfg(demo_cache, tiny_flux_schnell, tmp_path / "run")
    with pytest.raises(CacheError, match="pretrained_model_name_or_path"):
        train(cfg)


def test_resume_latest_without_checkpoint_names_the_flag_before_any_model_loads(demo_cache, tiny_flux_dev,
                                                                                 tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("fluxlora.trainer.load_transformer", no_model)
    cfg = make_cfg(demo_cache, tiny_flux_dev, tmp_path / "run", resume_from_checkpoint="latest")
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint"):
        train(cfg)


def test_init_lora_is_the_starting_point_in_fp32_over_a_bf16_base(demo_cache, tiny_flux_dev, tmp_path):
    first = train(make_cfg(demo_cache, tiny_flux_dev, tmp_path / "first", max_train_steps=2, checkpointing_steps=2,
                           optimizer="adamw"))
    reset_accelerate()
    trainer = Trainer(make_cfg(demo_cache, tiny_flux_dev, tmp_path / "second", init_lora=str(first),
                               mixed_precision="bf16", optimizer="adamw"))
    model = trainer.accelerator.unwrap_model(trainer.transformer)
    lora = {"transformer." + n.replace(".default.", "."): p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in lora.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    saved = load_file(first)
    assert lora.keys() == saved.keys()
    assert all(torch.equal(lora[key].detach(), value.float()) for key, value in saved.items())
    assert any(value.abs().sum() > 0 for key, value in saved.items() if "lora_B" in key)  # not the fresh init


def test_interrupted_checkpoint_is_never_resumed(demo_cache, tiny_flux_dev, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(demo_cache, tiny_flux_dev, out, max_train_steps=4, checkpointing_steps=2,
                   checkpoints_total_limit=1, optimizer="adamw"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    # a save killed mid-way: a temporary folder, and a renamed folder without its marker
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-6.tmp")
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-8")
    (out / "checkpoint-8" / "COMPLETE").unlink()
    reset_accelerate()
    trainer = Trainer(make_cfg(demo_cache, tiny_flux_dev, out, max_train_steps=6, checkpointing_steps=2,
                               resume_from_checkpoint="latest", optimizer="adamw"))
    assert trainer.resumed_from == out / "checkpoint-4"
    assert trainer.step == 4
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["position"] == 4 and state["world_size"] == 1
    (out / "checkpoint-6.tmp" / "stale.bin").write_bytes(b"from the killed save")
    trainer.run()  # saves checkpoint-6 afresh: nothing of the killed save's folder is kept
    assert (out / "checkpoint-6" / "COMPLETE").is_file() and not (out / "checkpoint-6" / "stale.bin").exists()
    assert not list(out.glob("*.tmp"))
    # a stop signal on a checkpoint step saves that step again (maybe_checkpoint, then maybe_stop): it replaces it
    assert trainer.save_checkpoint() == out / "checkpoint-6"
    assert (out / "checkpoint-6" / "COMPLETE").is_file() and not list(out.glob("*.tmp"))
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["step"] == 6


def test_checkpoint_whose_optimizer_state_does_not_fit_names_the_way_out(demo_cache, tiny_flux_dev, tmp_path):
    """A checkpoint from before the flat LoRA tensor (one optimizer entry per LoRA tensor) cannot resume, nor one
    written under FSDP without it."""
    from fluxlora.checkpoint import FSDP_OPTIMIZER_FILE, CheckpointError

    out = tmp_path / "run"
    train(make_cfg(demo_cache, tiny_flux_dev, out, max_train_steps=2, checkpointing_steps=2, optimizer="adamw"))
    optimizer_file = out / "checkpoint-2" / "optimizer.bin"
    state = torch.load(optimizer_file, weights_only=True)
    state["param_groups"][0]["params"] = [0, 1, 2]  # what a per-tensor optimizer saved
    torch.save(state, optimizer_file)
    reset_accelerate()
    with pytest.raises(CheckpointError, match="--init_lora .*checkpoint-2/pytorch_lora_weights.safetensors"):
        Trainer(make_cfg(demo_cache, tiny_flux_dev, out, max_train_steps=4, checkpointing_steps=2,
                         resume_from_checkpoint="latest", optimizer="adamw"))
    # one written under FSDP (its gathered optimizer state in its own file) needs an FSDP config
    (out / "checkpoint-2" / FSDP_OPTIMIZER_FILE).write_bytes(b"")
    reset_accelerate()
    with pytest.raises(CheckpointError, match="written under FSDP; resume it with an FSDP accelerate config"):
        Trainer(make_cfg(demo_cache, tiny_flux_dev, out, max_train_steps=4, checkpointing_steps=2,
                         resume_from_checkpoint="latest", optimizer="adamw"))


def test_previews_and_sample_grid(demo_cache, tiny_flux_dev, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(demo_cache, tiny_flux_dev, out, max_train_steps=2, checkpointing_steps=2, validation_steps=2,
                   validation_width=64, validation_height=48, validation_inference_steps=2,
                   validation_guidance_scale=2.0, validation_seed=5, optimizer="adamw"))
    import numpy as np
    from PIL import Image

    prompts = (Path(__file__).parent.parent / "demo" / "validation_prompts.txt").read_text().splitlines()
    for step in ("step-000000", "step-000002"):
        pngs = sorted((out / "samples" / step).glob("*.png"))
        assert len(pngs) == 2
        for i, png in enumerate(pngs):
            image = Image.open(png)
            assert image.size == (64, 48)
            assert image.text["prompt"] == prompts[i] and image.text["seed"] == str(5 + i)
    assert Image.open(out / "samples_grid.png").size[1] > 2 * 48

    # the "before" round is FluxPipeline's image of each cached prompt at the seed its PNG records
    cache = EmbeddingCache(demo_cache)
    pipe = FluxPipeline.from_pretrained(tiny_flux_dev, dtype=torch.float32)
    for i, (prompt, caption_id) in enumerate(cache.validation):
        t5, clip = cache.text(caption_id)
        image = pipe(prompt_embeds=t5[None].float(), pooled_prompt_embeds=clip[None].float(), width=64, height=48,
                     num_inference_steps=2, guidance_scale=2.0,
                     generator=torch.Generator().manual_seed(5 + i)).images[0]
        preview = np.asarray(Image.open(out / "samples" / "step-000000" / f"{i:02d}.png"), dtype=np.int16)
        assert np.abs(preview - np.asarray(image, dtype=np.int16)).max() <= 1, prompt


def test_held_out_loss_is_logged_and_its_images_never_trained(demo_cache, tiny_flux_dev, tmp_path):
    cfg = make_cfg(demo_cache, tiny_flux_dev, tmp_path / "run", max_train_steps=6, checkpointing_steps=6,
                   optimizer="adamw", holdout_images=2, validation_steps=3, validation_width=64,
                   validation_height=64, validation_inference_steps=2)  # small previews: the loss is the subject
    trainer = Trainer(cfg)
    held = {e.sample_id for e in trainer.holdout}
    assert len(held) == 2 and not held & {e.sample_id for e in trainer.stream.entries}
    before = trainer.validation_loss()
    assert trainer.validation_loss() == before  # fixed sigmas, noise and x0
    trainer.run()
    rows = [r for r in read_jsonl(tmp_path / "run" / "logs.jsonl") if "val_loss" in r]
    assert [r["step"] for r in rows] == [3, 6]
    assert all(r["val_loss"] != before for r in rows)  # the LoRA changed it


def test_schnell_models_without_guidance_train(tiny_flux_schnell, demo_dir, tmp_path):
    from accelerate import Accelerator

    from fluxlora import precompute
    from fluxlora.config import PrecomputeConfig

    pcfg = PrecomputeConfig(dataset=str(demo_dir / "images"), embeddings_dir=str(tmp_path / "cache"),
                            pretrained_model_name_or_path=str(tiny_flux_schnell), resolutions=[64])
    precompute.run(pcfg, Accelerator(cpu=True))
    assert EmbeddingCache(tmp_path / "cache").max_sequence_length == 256
    reset_accelerate()
    cfg = make_cfg(tmp_path / "cache", tiny_flux_schnell, tmp_path / "run", max_train_steps=20,
                   checkpointing_steps=20, optimizer="adamw", train_batch_size=2)
    trainer = Trainer(cfg)
    assert not trainer.guidance_embeds
    trainer.run()
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "logs.jsonl")]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_single_file_transformer_trains_with_base_components(demo_cache, tiny_flux_dev, tmp_path):
    """A transformer shipped as one .safetensors file (the rest of the pipeline from
    --base_components, which the cache was built from)."""
    from safetensors.torch import save_file

    single = tmp_path / "flux-transformer.safetensors"
    save_file(FluxTransformer2DModel.from_pretrained(tiny_flux_dev, subfolder="transformer").state_dict(), single)
    cfg = make_cfg(demo_cache, single, tmp_path / "run", base_components=str(tiny_flux_dev), max_train_steps=2,
                   checkpointing_steps=2, optimizer="adamw", validation_steps=2, validation_width=64,
                   validation_height=64, validation_inference_steps=2)
    lora = train(cfg)
    assert load_file(lora) and (tmp_path / "run" / "samples" / "step-000002" / "00.png").is_file()


def test_garbage_is_collected_on_schedule_and_automatic_collection_restored(demo_cache, tiny_flux_dev, tmp_path,
                                                                              monkeypatch):
    import gc

    from fluxlora import trainer as trainer_mod

    trainer = Trainer(make_cfg(demo_cache, tiny_flux_dev, tmp_path / "run", max_train_steps=7, checkpointing_steps=7,
                               optimizer="adamw", gc_steps=3))
    seen = []  # (step, automatic collection on) at each scheduled collection
    monkeypatch.setattr(trainer_mod.gc, "collect", lambda *a: seen.append((trainer.step, gc.isenabled())))
    assert gc.isenabled()
    trainer.run()
    assert seen == [(0, True), (3, False), (6, False)]  # once before the loop, then every 3 steps
    assert gc.isenabled()


def test_attention_kernels_flash_by_default_and_cudnn_first_when_asked():
    """cuDNN's attention backward crashed inside FLUX (illegal memory access) with the gradient layout
    that contiguous_attention_grads fixes; its forward runs FLUX's attention ~2x faster than flash, so
    sampling and previews put it first. Settings restored after."""
    from torch.nn.attention import SDPBackend

    from fluxlora.models import attention_backends

    cuda = torch.backends.cuda
    before = (cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order())
    with attention_backends(torch.device("cuda")):
        assert not cuda.cudnn_sdp_enabled() and cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled()
    with attention_backends(torch.device("cuda"), cudnn=True):
        assert cuda.cudnn_sdp_enabled() and cuda.flash_sdp_enabled()
        assert torch._C._get_sdp_priority_order()[:2] == [int(SDPBackend.CUDNN_ATTENTION),
                                                          int(SDPBackend.FLASH_ATTENTION)]
    assert (cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order()) == before


def test_attention_output_gradients_arrive_in_the_outputs_layout(tiny_flux_dev, monkeypatch):
    """Without the hooks, the single-stream blocks hand SDPA's backward a gradient whose strides differ
    from its output's (a slice of the concatenation with the MLP); with them every block's matches,
    and the model computes the same values and LoRA gradients."""
    from fluxlora.models import contiguous_attention_grads

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run(hooks: bool) -> tuple[list[bool], torch.Tensor, dict[str, torch.Tensor]]:
        model, _ = tiny_lora_transformer(tiny_flux_dev)
        if hooks:
            contiguous_attention_grads(model)
        matches = []  # per attention call, in backward order: gradient strides == output strides

        def spy(*args, **kwargs):
            out = sdpa(*args, **kwargs)
            out.register_hook(lambda grad, stride=out.stride(): matches.append(grad.stride() == stride))
            return out

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        gen = torch.Generator().manual_seed(1)
        out = tiny_forward(model, gen)
        out.pow(2).mean().backward()
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        return matches, out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, hooked = run(False), run(True)
    single = FluxTransformer2DModel.load_config(tiny_flux_dev, subfolder="transformer")["num_single_layers"]
    assert single > 0 and plain[0] == [False] * single + [True] * (len(plain[0]) - single)
    assert hooked[0] == [True] * len(plain[0])
    torch.testing.assert_close(hooked[1], plain[1], rtol=0, atol=0)
    for name, grad in plain[2].items():
        torch.testing.assert_close(hooked[2][name], grad, rtol=0, atol=0, msg=name)


def test_blocks_to_checkpoint_is_the_fewest_that_fit():
    from fluxlora.models import ACTIVATION_BYTES_PER_TOKEN as KEEP, CHECKPOINT_BYTES_PER_TOKEN as INPUT
    from fluxlora.models import blocks_to_checkpoint

    tokens, blocks = 4608, 57  # 1024 px, batch 1: ~28 GiB of activations without checkpointing
    everything = blocks * tokens * KEEP
    assert blocks_to_checkpoint(everything, tokens, blocks) == 0
    assert blocks_to_checkpoint(0, tokens, blocks) == blocks  # even all may not fit: all
    for free_gib in (8, 16, 24):
        free = free_gib * 2**30
        count = blocks_to_checkpoint(free, tokens, blocks)

        def used(n: int) -> int:
            return (blocks - n) * tokens * KEEP + n * tokens * INPUT

        assert 0 < count < blocks and used(count) <= free < used(count - 1), free_gib
    assert blocks_to_checkpoint(10 * 2**30, tokens, blocks) > blocks_to_checkpoint(20 * 2**30, tokens, blocks)


def test_compile_blocks_keeps_graphs_off_recomputed_blocks_and_marks_each_forward(tiny_flux_dev, monkeypatch):
    """compile_blocks: every block compiled with fullgraph, CUDA graphs (reduce-overhead) on all but
    the recomputed ones, and a new graph step marked at each forward of the transformer (what lets
    previews replay beside training). torch.compile itself is stubbed: the options are what is checked."""
    from fluxlora.models import compile_blocks

    calls, marks = [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append((self, kwargs)))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model, _ = tiny_lora_transformer(tiny_flux_dev)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    compile_blocks(model, cuda_graphs=True, checkpointed=2)
    assert [block for block, _ in calls] == blocks
    graphs = [kwargs["options"]["triton.cudagraphs"] for _, kwargs in calls]
    assert graphs == [False, False] + [True] * (len(blocks) - 2)
    assert all(kwargs["fullgraph"] for _, kwargs in calls)
    # one pass object for all: torch.compile compares options, so one per block would compile each block apart
    passes = {(id(kwargs["options"]["pre_grad_custom_pass"]), id(kwargs["options"]["post_grad_custom_post_pass"]))
              for _, kwargs in calls}
    assert len(passes) == 1
    # multi-kernel reductions crashed a run whose graphs came from Inductor's on-disk cache (torch 2.11)
    assert not any("triton.multi_kernel" in kwargs["options"] for _, kwargs in calls)
    with torch.no_grad():
        for _ in range(2):
            tiny_forward(model, torch.Generator().manual_seed(0))
    assert len(marks) == 2
    calls.clear()
    compile_blocks(tiny_lora_transformer(tiny_flux_dev)[0])
    assert [kwargs["options"]["triton.cudagraphs"] for _, kwargs in calls] == [False] * len(blocks)


def test_compiled_single_blocks_hand_their_outputs_to_the_compiled_backward(tiny_flux_dev):
    """diffusers' single block returns two slices of one tensor, whose backward would run eagerly outside the
    compiled graphs (a zero-filled full-size gradient per slice, then their sum). compile_blocks makes them
    outputs of their own (not views), with the eager model's prediction and LoRA gradients."""
    from fluxlora.models import compile_blocks

    model, lora = tiny_lora_transformer(tiny_flux_dev)
    for param in lora:  # B is zero at init: A's gradients would be zero too
        torch.nn.init.normal_(param, std=0.1)

    def prediction_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = tiny_forward(model, torch.Generator().manual_seed(0))
        (out.float() ** 2).mean().backward()
        return out.detach(), [p.grad.clone() for p in lora]

    ref, ref_grads = prediction_and_grads()
    outputs = []
    model.single_transformer_blocks[0].register_forward_hook(lambda module, args, out: outputs.extend(out))
    torch._dynamo.reset()
    compile_blocks(model)
    out, grads = prediction_and_grads()
    assert len(outputs) == 2 and all(t._base is None for t in outputs)  # diffusers' are views: `_base` is set
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_warm_guards_skip_checks_only_for_shapes_already_run():
    """WarmGuards: a shape that ran before skips Dynamo's guard checks, and gets its own compiled variant's
    result; a new shape runs with full guards, so it compiles (with the checks skipped, Dynamo would refuse to
    recompile and raise, or with another variant cached, could pick one for the wrong shape)."""
    from fluxlora.models import WarmGuards

    compiles = []

    def backend(gm, example_inputs):
        compiles.append([tuple(t.shape) for t in example_inputs])
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda x: x.sum(0) * 2, backend=backend, dynamic=False)
    guards, a, b = WarmGuards(enabled=True), torch.ones(2, 3), torch.ones(4, 5)
    for x, expected_compiles in ((a, 1), (a, 1), (b, 2), (b, 2), (a, 2)):
        with guards(x):
            torch.testing.assert_close(fn(x), x.sum(0) * 2)
        assert len(compiles) == expected_compiles
    assert guards.seen == {((2, 3),), ((4, 5),)}
    off = WarmGuards(enabled=False)  # on the CPU, without compilation, or under FSDP
    off(a)
    assert isinstance(off(a), contextlib.nullcontext)  # a shape seen before still checks every guard
    torch._dynamo.reset()


def test_checkpoint_blocks_recomputes_only_the_chosen_blocks(tiny_flux_dev, monkeypatch):
    """The first `count` blocks (double-stream first) go through torch's checkpoint, the others not;
    values and LoRA gradients as without checkpointing."""
    from fluxlora.models import checkpoint_blocks

    checkpoint = torch.utils.checkpoint.checkpoint

    def run(count: int | None) -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor]]:
        model, _ = tiny_lora_transformer(tiny_flux_dev)
        torch.nn.init.normal_(model.transformer_blocks[0].attn.to_q.lora_B.default.weight)  # LoRA grads of A too
        names = {id(b): f"double{i}" for i, b in enumerate(model.transformer_blocks)}
        names.update({id(b): f"single{i}" for i, b in enumerate(model.single_transformer_blocks)})
        recomputed = []

        def spy(function, *args, **kwargs):
            recomputed.append(names[id(function.__self__)])
            return checkpoint(function, *args, **kwargs)

        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
        if count is not None:
            checkpoint_blocks(model, count)
        model.train()
        gen = torch.Generator().manual_seed(1)
        out = tiny_forward(model, gen)
        out.pow(2).mean().backward()
        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)
        return recomputed, out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain = run(None)
    config = FluxTransformer2DModel.load_config(tiny_flux_dev, subfolder="transformer")
    count = config["num_layers"] + 1  # every double-stream block and the first single-stream one
    some = run(count)
    assert plain[0] == [] and some[0] == [f"double{i}" for i in range(config["num_layers"])] + ["single0"]
    torch.testing.assert_close(some[1], plain[1], rtol=0, atol=0)
    for name, grad in plain[2].items():
        torch.testing.assert_close(some[2][name], grad, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("attention_backend,checkpointed", [("flash", 0), ("cudnn", 0), ("cudnn", 2)])
def test_cuda_graphs_train_with_previews_as_eager_does(demo_cache, tiny_flux_dev, tmp_path, monkeypatch,
                                                       attention_backend, checkpointed, fresh_accelerate):
    """On CUDA, the compiled blocks replayed as CUDA graphs (by default) train, render previews before
    and between steps (no-grad graphs beside the training ones), and log the losses of an eager bf16
    run to bf16 rounding: with flash and with cuDNN attention (whose backward needs
    contiguous_attention_grads), and with blocks recomputed as memory requires (those run without
    graphs)."""
    import fluxlora.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "blocks_to_checkpoint", lambda free, tokens, blocks: checkpointed)
    losses = {}
    for name, options in (("eager", dict(compile=False)), ("graphs", dict(attention_backend=attention_backend))):
        out = tmp_path / name
        reset_accelerate()
        trainer = Trainer(make_cfg(demo_cache, tiny_flux_dev, out, max_train_steps=4, checkpointing_steps=4,
                                   validation_steps=2, validation_width=64, validation_height=48,
                                   validation_inference_steps=2, optimizer="adamw", mixed_precision="bf16", **options))
        assert trainer.cuda_graphs == (name == "graphs") and trainer.checkpointed_blocks == checkpointed
        trainer.run()
        losses[name] = [row["loss"] for row in read_jsonl(out / "logs.jsonl")]
        for step in ("step-000000", "step-000002", "step-000004"):
            assert len(list((out / "samples" / step).glob("*.png"))) == 2, (name, step)
    assert len(losses["graphs"]) == 4
    torch.testing.assert_close(losses["graphs"], losses["eager"], rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("capability, preset, expected", [
    ((9, 0), None, (":0:0", "0")),  # Hopper: no workspace, no memset before each GEMM
    ((9, 0), ":4096:8", (":4096:8", "0")),  # a user's setting (deterministic cuBLAS asks for one) is kept
    ((8, 0), None, (None, None)),  # measured on Hopper only: other GPUs keep cuBLAS's defaults
])
def test_cublas_workspace_off_on_hopper_unless_set(monkeypatch, capability, preset, expected):
    from fluxlora.models import cublas_without_workspace

    for name in ("CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if preset:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", preset)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cublas_without_workspace(torch.device("cpu"))
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == preset and "CUBLASLT_WORKSPACE_SIZE" not in os.environ
    cublas_without_workspace(torch.device("cuda"))
    assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG"), os.environ.get("CUBLASLT_WORKSPACE_SIZE")) == expected


def test_bench_profile_finds_the_gaps_between_kernels_on_any_stream():
    """bench_train_step --profile: the GPU is idle only where no stream runs a kernel, and each gap is named by
    the kernel that ended last (not the last to start) and the next."""
    from bench.bench_train_step import idle_gaps

    spans = [(0.0, 10.0, "gemm"), (2.0, 4.0, "copy on another stream"), (13.0, 20.0, "memset"),
             (23.0, 30.0, "gemm"), (24.0, 35.0, "prefetch"), (35.0, 36.0, "triton"), (40.0, 41.0, "memset"),
             (44.0, 45.0, "gemm"), (45.0, 60.0, "attention"), (52.0, 55.0, "copy"), (62.0, 63.0, "triton")]
    assert idle_gaps(spans) == {("gemm", "memset"): [1, 3.0], ("memset", "gemm"): [2, 6.0],
                                ("triton", "memset"): [1, 4.0], ("attention", "triton"): [1, 2.0]}


def test_cuda_graphs_by_default_where_they_apply(demo_cache, tiny_flux_dev, tmp_path):
    from fluxlora.trainer import use_cuda_graphs

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = make_cfg(demo_cache, tiny_flux_dev, tmp_path)
    assert cfg.cuda_graphs is None and cfg.attention_backend == "cudnn"
    assert use_cuda_graphs(cfg, cuda, fsdp=False)
    assert not use_cuda_graphs(cfg, cpu, fsdp=False) and not use_cuda_graphs(cfg, cuda, fsdp=True)
    assert not use_cuda_graphs(dataclasses.replace(cfg, compile=False), cuda, fsdp=False)
    assert not use_cuda_graphs(dataclasses.replace(cfg, gradient_accumulation_steps=2), cuda, fsdp=False)
    assert not use_cuda_graphs(dataclasses.replace(cfg, cuda_graphs=False), cuda, fsdp=False)
    with pytest.raises(ConfigError, match="--cuda_graphs.*--gradient_accumulation_steps 1"):
        dataclasses.replace(cfg, cuda_graphs=True, gradient_accumulation_steps=2).validate()


def test_optimizer_steps_one_flat_tensor_behind_the_lora_weights(demo_cache, tiny_flux_dev, tmp_path):
    """FlatParameters: the same training as per-tensor parameters, with one tensor for the optimizer
    and the clipping; the trainer's LoRA weights stay views of it through a run and its checkpoints.
    (Under DDP: tests/test_distributed.py, which compares 2 processes with 1.)"""
    from fluxlora.models import FlatParameters

    def train_steps(flat: bool) -> dict[str, torch.Tensor]:
        model, params = tiny_lora_transformer(tiny_flux_dev)
        holder = FlatParameters(params) if flat else None
        stepped = [holder.flat] if flat else params
        optimizer = torch.optim.AdamW(stepped, lr=1e-2, foreach=False)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for _ in range(2):  # accumulation over two backward passes
                out = tiny_forward(model, gen)
                out.pow(2).mean().backward()
            if flat:
                holder.collect_grads()
                assert all(p.grad is None for p in params)
            torch.nn.utils.clip_grad_norm_(stepped, 0.5)
            optimizer.step()
            optimizer.zero_grad()
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    per_tensor, flat = train_steps(False), train_steps(True)
    assert any(v.abs().max() > 1e-3 for k, v in per_tensor.items() if "lora_B" in k)  # lora_B starts at 0
    for key, value in per_tensor.items():
        torch.testing.assert_close(flat[key], value, rtol=0, atol=1e-6, msg=key)

    trainer = Trainer(make_cfg(demo_cache, tiny_flux_dev, tmp_path / "run", max_train_steps=3, checkpointing_steps=2,
                               optimizer="adamw"))
    assert trainer.params == [trainer.flat.flat]
    # Dynamo must not split the compiled blocks at DDP's buckets: on 4 GPUs that hung CUDA-graph recording
    assert torch._dynamo.config.optimize_ddp is False
    lora = [p for p in trainer.transformer.parameters() if p.requires_grad]
    assert trainer.flat.flat.numel() == sum(p.numel() for p in lora) and len(lora) > 50
    before = {id(p): p.detach().clone() for p in lora}
    trainer.run()
    flat = trainer.flat.flat
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    assert all(start <= p.data_ptr() < end for p in lora)  # still views after a run and its checkpoints
    assert any(not torch.equal(p, before[id(p)]) for p in lora if p.shape[1] == 16)  # lora_B [out, rank 16] trained


def test_trainer_step_is_the_reference_step_on_the_same_batches(demo_cache, tiny_flux_dev, tmp_path):
    """bench/bench_quality.py's guard on the CPU: the trainer (flat LoRA tensor, deferred skip decision, its own
    loss) and diffusers' example step (PEFT's LoRA tensor by tensor, gradient checkpointing) give the same
    losses and the same LoRA update over the batches the trainer drew."""
    from bench.bench_quality import compare, reference_path, trainer_path

    # clipping at 0.01 acts on every step (the tiny model's gradient norms are ~0.1-0.2); alpha 8 over rank 16
    cfg = make_cfg(demo_cache, tiny_flux_dev, tmp_path / "run", optimizer="adamw", max_grad_norm=0.01, lora_alpha=8)
    run = trainer_path(cfg, steps=6)
    assert len(run["batches"]) == 6 and len(set(run["losses"])) == 6

    def build() -> torch.nn.Module:
        return FluxTransformer2DModel.from_pretrained(tiny_flux_dev, subfolder="transformer")

    reference = reference_path(cfg, build, run["batches"], run["init"], torch.device("cpu"))
    result = compare(run, reference, run["init"])
    assert result["max_rel_loss_diff"] < 1e-5 and result["lora_update_rel_diff"] < 1e-4, result
    # not vacuous: the weights moved, and a step with another learning rate, or without clipping, is told apart
    assert all(not torch.equal(reference["final"][n], run["init"][n]) for n in run["init"])
    for change in (dict(learning_rate=2 * cfg.learning_rate), dict(max_grad_norm=0.0)):
        other = reference_path(dataclasses.replace(cfg, **change), build, run["batches"], run["init"],
                               torch.device("cpu"))
        assert compare(run, other, run["init"])["lora_update_rel_diff"] > 0.05, change
