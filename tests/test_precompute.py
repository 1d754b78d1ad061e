"""precompute_embeddings.py / fluxlora.precompute against diffusers' own encoders on the tiny pipeline."""
from __future__ import annotations

import gc
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
import types
import weakref
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image, ImageOps

import precompute_embeddings
from fluxlora import buckets, precompute
from fluxlora.cache import MANIFEST_NAME, EmbeddingCache, index_name
from fluxlora.config import PrecomputeConfig
from fluxlora.data import build_caption, caption_id, load_image, sample_id

from .conftest import repo_env

REPO = Path(__file__).resolve().parent.parent
RESOLUTIONS = [64, 128]  # the smallest bucket resolutions; demo images are 256-1024 px, so none is upscaled
SHORT_L = 16  # T5 length for tests that are not about T5 itself: 32x fewer tokens than dev's 512


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def make_cfg(dataset: Path | str, out: Path, model: Path, **overrides) -> PrecomputeConfig:
    values = {"dataset": str(dataset), "embeddings_dir": str(out), "pretrained_model_name_or_path": str(model),
              "resolutions": RESOLUTIONS, "shard_size": 2, "vae_batch_size": 3, "text_batch_size": 4}
    cfg = PrecomputeConfig(**{**values, **overrides})
    cfg.validate()
    return cfg


def copy_images(demo_dir: Path, dst: Path, count: int) -> Path:
    """The first `count` demo images with their captions, in a fresh folder."""
    dst.mkdir(parents=True)
    for image in sorted(p for p in (demo_dir / "images").iterdir() if p.suffix != ".txt")[:count]:
        shutil.copy(image, dst / image.name)
        shutil.copy(image.with_suffix(".txt"), dst / f"{image.stem}.txt")
    return dst


def caption_of(source: str) -> str:
    return build_caption(Path(source).with_suffix(".txt").read_text(), source)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_flux_dev, demo_dir, accelerator):
    """The whole demo folder at 64 and 128 px with flipped copies, dev's default T5 length (512)."""
    out = tmp_path_factory.mktemp("cache-demo")
    cfg = make_cfg(demo_dir / "images", out, tiny_flux_dev, flip_copies=True, shard_size=5,
                   validation_prompts=["sks a red circle"],
                   validation_prompts_file=str(demo_dir / "validation_prompts.txt"))
    result = precompute.run(cfg, accelerator)
    return cfg, result, EmbeddingCache(out)


@pytest.fixture(scope="module")
def text_pipe(tiny_flux_dev):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux_dev, transformer=None, vae=None, dtype=torch.float32)


@pytest.fixture(scope="module")
def vae(tiny_flux_dev):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_flux_dev, subfolder="vae", dtype=torch.float32).eval()


def test_text_equals_flux_encode_prompt(built, text_pipe, demo_dir):
    _, _, cache = built
    prompts = [p for p in (demo_dir / "validation_prompts.txt").read_text().splitlines() if p.strip()]
    assert [p for p, _ in cache.validation] == ["sks a red circle", *prompts]
    captions = {e.caption_id: caption_of(e.source) for e in cache.entries}
    captions.update({cid: p for p, cid in cache.validation})
    captions[cache.empty_caption_id] = ""
    assert len(cache.manifest["texts"]) == len(captions) == 12 + 3 + 1
    for cid, caption in captions.items():
        # One prompt at a time: the cache batched them (4 per batch), which must not matter.
        with torch.inference_mode():
            t5_ref, clip_ref, _ = text_pipe.encode_prompt(prompt=caption, prompt_2=None, max_sequence_length=512)
        t5, clip = cache.text(cid)
        assert t5.dtype == clip.dtype == torch.bfloat16
        assert t5.shape == (512, 32) and clip.shape == (32,)
        torch.testing.assert_close(t5, t5_ref[0].bfloat16())
        torch.testing.assert_close(clip, clip_ref[0].bfloat16())
        assert cache.caption(cid) == caption
    # Padding positions carry real T5 states (no attention mask), so captions differ everywhere.
    first, second = list(captions)[:2]
    assert not torch.equal(cache.text(first)[0][-1], torch.zeros(32, dtype=torch.bfloat16))
    assert not torch.equal(cache.text(first)[0], cache.text(second)[0])


@pytest.mark.gpu
def test_t5_as_a_cuda_graph_encodes_what_eager_t5_does(tmp_path, tiny_flux_dev):
    """On CUDA, T5 replays one captured graph of --text_batch_size x tokens: the same states as
    eager T5 for full batches and for the padded last one, each batch's own (a replay overwrites
    the graph's output, which encode_prompt must not hand out)."""
    pipe = precompute._load_text_pipeline(make_cfg(tmp_path, tmp_path / "cache", tiny_flux_dev),
                                          torch.device("cuda"), SHORT_L)
    graph = pipe.text_encoder_2.forward
    assert isinstance(graph, precompute._T5Graph)
    captions = [f"caption {i}: " + "red circle " * i for i in range(7)]  # batches of 4 and 3

    def encode() -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [row for rows in precompute.encode_captions(pipe, captions, SHORT_L, 4) for row in rows]

    replayed = encode()
    pipe.text_encoder_2.forward = graph.eager
    for (t5, clip), (t5_eager, clip_eager) in zip(replayed, encode(), strict=True):
        torch.testing.assert_close(t5, t5_eager)
        torch.testing.assert_close(clip, clip_eager)
    assert not torch.equal(replayed[0][0], replayed[4][0])


@pytest.mark.gpu
def test_t5_on_cuda_as_precompute_runs_it_equals_transformers_eager_t5(tmp_path, tiny_flux_dev):
    """cuDNN's attention with T5's position bias, replayed as a CUDA graph: the states of transformers'
    own eager T5 in bf16 (as FluxPipeline loads it), to bf16 rounding."""
    from transformers import T5EncoderModel

    pipe = precompute._load_text_pipeline(make_cfg(tmp_path, tmp_path / "cache", tiny_flux_dev),
                                          torch.device("cuda"), SHORT_L)
    reference = T5EncoderModel.from_pretrained(tiny_flux_dev, subfolder="text_encoder_2", dtype=torch.bfloat16,
                                               attn_implementation="eager").cuda()
    captions = [f"caption {i}: " + "red circle " * i for i in range(7)]
    ours = [t5 for rows in precompute.encode_captions(pipe, captions, SHORT_L, 4) for t5, _ in rows]
    ids = pipe.tokenizer_2(captions, padding="max_length", max_length=SHORT_L, truncation=True,
                           return_tensors="pt").input_ids.cuda()
    with torch.inference_mode():
        expected = reference(ids).last_hidden_state.cpu()
    for i, row in enumerate(ours):
        # bf16 states after every layer, rounded differently by two attention kernels: a few elements
        # of magnitude ~0.1 differ by up to ~0.02 over the tiny T5's layers
        torch.testing.assert_close(row, expected[i], rtol=1.6e-2, atol=4e-2)
        assert (row.float() - expected[i].float()).abs().mean() < 0.01 * expected[i].float().abs().mean()


def test_t5_runs_the_registered_sdpa_attention_which_equals_eager(tmp_path, tiny_flux_dev):
    cfg = make_cfg(tmp_path, tmp_path / "cache", tiny_flux_dev)
    t5 = precompute._load_text_pipeline(cfg, torch.device("cpu"), SHORT_L).text_encoder_2
    assert t5.config._attn_implementation == precompute.T5_ATTENTION  # what precompute encodes with
    ids = torch.randint(1, t5.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    padding = torch.ones_like(ids)
    padding[1, 15:] = 0

    def states() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [t5(ids).last_hidden_state, t5(ids, attention_mask=padding).last_hidden_state]

    ours = states()
    t5.set_attn_implementation("eager")
    assert t5.config._attn_implementation == "eager"
    eager = states()
    for mine, theirs in zip(ours, eager):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(eager[0][1], eager[1][1], atol=1e-3)  # the padding mask mattered, and was kept


def test_latents_equal_vae_posterior_of_the_bucketed_image(built, vae):
    _, _, cache = built
    assert len(cache.entries) == 12 * len(RESOLUTIONS) * 2  # every image, resolution and flip
    for entry in cache.entries:
        image = load_image(Path(entry.source).read_bytes(), entry.source)
        if entry.flipped:
            image = ImageOps.mirror(image)
        pixels = buckets.pixels_to_tensor(buckets.resize_to_bucket(image, (entry.width, entry.height)))
        with torch.inference_mode():
            dist = vae.encode(pixels[None]).latent_dist
        mean, std = cache.latent_dist(entry)
        assert mean.dtype == std.dtype == torch.bfloat16
        torch.testing.assert_close(mean, dist.mean[0].bfloat16())
        torch.testing.assert_close(std, dist.std[0].bfloat16())
    by_key = {(e.sample_id, e.resolution, e.flipped): e for e in cache.entries}
    some = cache.entries[0]
    flipped = by_key[(some.sample_id, some.resolution, True)]
    assert not torch.equal(cache.latent_dist(some)[0], cache.latent_dist(flipped)[0])


def test_each_vae_batch_is_stored_after_the_next_is_submitted(tmp_path, tiny_flux_dev, demo_dir, accelerator,
                                                              monkeypatch):
    data = copy_images(demo_dir, tmp_path / "data", 4)
    encode, rows = precompute.encode_images, precompute._HostCopy.rows
    events = []

    def spy_encode(vae, pixels):
        assert pixels.dtype == torch.uint8 and pixels.shape[:2] == (1, 3)  # [B, 3, H, W]: normalised on the device
        events.append("submit")
        return encode(vae, pixels)

    def spy_rows(batch):
        if batch.tensors[0].ndim == 4:  # latents [B, 16, h, w]; text batches are pipelined alike
            events.append("store")
        return rows(batch)

    monkeypatch.setattr(precompute, "encode_images", spy_encode)
    monkeypatch.setattr(precompute._HostCopy, "rows", spy_rows)
    cfg = make_cfg(data, tmp_path / "cache", tiny_flux_dev, resolutions=[64], max_sequence_length=SHORT_L,
                   shard_size=4, vae_batch_size=1)
    precompute.run(cfg, accelerator)
    # One image per batch, one shard: each batch waits in the queue until the next one is submitted.
    assert events == ["submit"] + ["submit", "store"] * 3 + ["store"]
    assert len(EmbeddingCache(tmp_path / "cache").entries) == 4


def test_fp32_score_attention_equals_diffusers_vae_attention(tmp_path, tiny_flux_dev):
    """The VAE encoder as precompute runs it on CUDA (mid-block attention as two GEMMs per image) computes
    what diffusers' AttnProcessor2_0 does: in fp32 on the CPU, to fp32 rounding."""
    from diffusers import AutoencoderKL

    from fluxlora.vae import FP32ScoresAttnProcessor, use_fp32_score_attention

    stock = AutoencoderKL.from_pretrained(tiny_flux_dev, subfolder="vae").eval()
    ours = AutoencoderKL.from_pretrained(tiny_flux_dev, subfolder="vae").eval()
    use_fp32_score_attention(ours)
    assert [type(a.processor) for a in ours.encoder.mid_block.attentions] == [FP32ScoresAttnProcessor]
    assert type(ours.decoder.mid_block.attentions[0].processor) is type(stock.decoder.mid_block.attentions[0].processor)
    pixels = torch.rand(2, 3, 96, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1  # 2 images, 96 tokens
    with torch.inference_mode():
        expected, got = stock.encode(pixels).latent_dist, ours.encode(pixels).latent_dist
    torch.testing.assert_close(got.mean, expected.mean)
    torch.testing.assert_close(got.std, expected.std)
    on_cpu = precompute._load_vae(make_cfg(tmp_path, tmp_path / "cache", tiny_flux_dev), torch.device("cpu"))
    assert not isinstance(on_cpu.encoder.mid_block.attentions[0].processor, FP32ScoresAttnProcessor)  # CUDA only


@pytest.mark.gpu
def test_vae_as_precompute_loads_it_on_cuda_is_as_close_to_fp32_as_diffusers_bf16_vae(tmp_path, tiny_flux_dev):
    from diffusers import AutoencoderKL

    ours = precompute._load_vae(make_cfg(tmp_path, tmp_path / "cache", tiny_flux_dev), torch.device("cuda"))
    stock = AutoencoderKL.from_pretrained(tiny_flux_dev, subfolder="vae", dtype=torch.bfloat16).cuda().eval()
    exact = AutoencoderKL.from_pretrained(tiny_flux_dev, subfolder="vae").cuda().eval()
    pixels = torch.randint(0, 256, (3, 3, 128, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = [t.float() for t in precompute.encode_images(ours, pixels).rows()[0]]  # the first image's mean, std
    with torch.inference_mode():
        ref = exact.encode(buckets.normalize_pixels(pixels.cuda())).latent_dist
        base = stock.encode(buckets.normalize_pixels(pixels.cuda(), torch.bfloat16)).latent_dist
    for ours_t, stock_t, ref_t in ((got[0], base.mean[0], ref.mean[0]), (got[1], base.std[0], ref.std[0])):
        ours_err = (ours_t - ref_t.cpu()).abs()
        stock_err = (stock_t.float().cpu() - ref_t.cpu()).abs()
        assert ours_err.mean() <= 1.5 * stock_err.mean() + 1e-4
        assert ours_err.max() <= 1.5 * stock_err.max() + 1e-3


def test_shards_are_written_off_the_encoding_threads_and_a_failed_write_fails_the_run(
        tmp_path, tiny_flux_dev, demo_dir, accelerator, monkeypatch):
    data = copy_images(demo_dir, tmp_path / "data", 4)
    write = precompute._write_shard
    threads = []

    def spy_write(out_dir, shard, tensors, index):
        threads.append(threading.current_thread().name)
        return write(out_dir, shard, tensors, index)

    monkeypatch.setattr(precompute, "_write_shard", spy_write)
    cfg = make_cfg(data, tmp_path / "cache", tiny_flux_dev, resolutions=[64], max_sequence_length=SHORT_L,
                   shard_size=2)
    written = precompute.run(cfg, accelerator).written
    assert len(threads) == len(written) == 2 + 3 and all(name.startswith("shard-writer") for name in threads)

    def failing_write(out_dir, shard, tensors, index):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(precompute, "_write_shard", failing_write)
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(OSError, match="No space left"):
        precompute.run(cfg, accelerator)
    assert not (tmp_path / "cache" / MANIFEST_NAME).exists()


def test_truncated_captions_are_counted_once_not_quoted_per_batch(tmp_path, tiny_flux_dev, demo_dir, accelerator,
                                                                  caplog):
    """FluxPipeline warns once per batch, quoting every caption's cut-off text (padding included); precompute
    drops those warnings and says how many captions CLIP and T5 cut, naming the flag for T5."""
    data = copy_images(demo_dir, tmp_path / "data", 3)
    long_caption = "a red circle on a blue square " * 20  # 140 words: past CLIP's 77 tokens and T5's 64
    next(data.glob("*.txt")).write_text(long_caption)
    cfg = make_cfg(data, tmp_path / "cache", tiny_flux_dev, resolutions=[64], max_sequence_length=64,
                   text_batch_size=2)
    flux_logger = logging.getLogger(precompute.FLUX_PIPELINE_LOGGER)
    passed = []  # what gets past the logger's filters (diffusers' handlers do not propagate to caplog)
    handler = logging.Handler()
    handler.emit = passed.append
    flux_logger.addHandler(handler)
    try:
        precompute.run(cfg, accelerator)
    finally:
        flux_logger.removeHandler(handler)
    assert not [r for r in passed if "was truncated because" in r.getMessage()]
    total = 3 + 1  # the captions and "" (no validation prompts)
    ours = [r.getMessage() for r in caplog.records if r.name == precompute.__name__]
    assert [m.split(":")[0] for m in ours] == [f"1 of {total} captions are longer than CLIP's 77 tokens",
                                               f"1 of {total} captions are longer than --max_sequence_length 64 "
                                               f"T5 tokens and were cut there, as FluxPipeline cuts them"]
    assert not [f for f in flux_logger.filters if isinstance(f, precompute._QuietTruncation)]  # text phase only


def test_the_next_shard_is_queued_for_decoding_before_this_one_is_encoded(tmp_path, tiny_flux_dev, demo_dir,
                                                                           accelerator, monkeypatch):
    data = copy_images(demo_dir, tmp_path / "data", 4)
    plan, encode = precompute._plan_image_shard, precompute.encode_images
    events = []

    def spy_plan(shard):
        events.append(f"plan {shard.index}")
        return plan(shard)

    def spy_encode(vae, pixels):
        events.append("submit")
        return encode(vae, pixels)

    monkeypatch.setattr(precompute, "_plan_image_shard", spy_plan)
    monkeypatch.setattr(precompute, "encode_images", spy_encode)
    cfg = make_cfg(data, tmp_path / "cache", tiny_flux_dev, resolutions=[64], max_sequence_length=SHORT_L,
                   shard_size=2, vae_batch_size=1)
    precompute.run(cfg, accelerator)
    # run() plans every shard first; the image phase then reads shard 1's bytes and queues its images
    # for decoding before it submits shard 0's first image to the VAE
    assert events == ["plan 0", "plan 1", "plan 0", "plan 1"] + ["submit"] * 4


def test_every_entry_has_its_own_images_caption(built):
    _, _, cache = built
    entries = list(cache.entries)
    random.Random(0).shuffle(entries)
    for entry in entries:
        caption = caption_of(entry.source)
        assert entry.caption_id == caption_id(caption), entry.source
        assert entry.sample_id == sample_id(Path(entry.source).read_bytes(), caption), entry.source
    assert len({caption_id(caption_of(e.source)) for e in entries}) == 12  # the demo captions are unique


def test_bucket_shapes(built):
    _, _, cache = built
    seen = set()
    for entry in cache.entries:
        width, height = Image.open(entry.source).size
        assert (entry.width, entry.height) == buckets.nearest_bucket(width, height, entry.resolution)
        mean, std = cache.latent_dist(entry)
        assert mean.shape == std.shape == (16, entry.height // 8, entry.width // 8)
        seen.add((entry.source, entry.resolution, entry.flipped))
    assert len(seen) == len(cache.entries)
    assert len({(e.width, e.height) for e in cache.entries}) > 3  # the demo really has several aspect ratios
    # Deterministic order: listing position, then resolution, then flip.
    sources = list(dict.fromkeys(e.source for e in cache.entries))
    assert sources == sorted(sources)
    first_image = [(e.resolution, e.flipped) for e in cache.entries[:4]]
    assert first_image == [(64, False), (64, True), (128, False), (128, True)]


def test_manifest_records_vae_factors_counts_and_dev_length(built, tiny_flux_dev):
    _, result, cache = built
    assert cache.vae_scaling_factor == pytest.approx(0.3611)
    assert cache.vae_shift_factor == pytest.approx(0.1159)
    assert cache.max_sequence_length == 512 == cache.fingerprint["max_sequence_length"]
    assert cache.fingerprint["pretrained_model_name_or_path"] == str(Path(tiny_flux_dev).resolve())
    assert cache.fingerprint["flip_copies"] is True and cache.fingerprint["resolutions"] == RESOLUTIONS
    counts = cache.manifest["counts"]
    assert counts["samples"] == counts["images"] == 12 and counts["skipped"] == 0
    assert counts["per_resolution"] == {"64": 24, "128": 24}
    assert sum(counts["per_bucket"]["128"].values()) == 24
    assert cache.empty_caption_id == caption_id("")
    assert sorted(result.written) == sorted(cache.manifest["shards"])  # one process did everything
    assert "Cached 12 of 12 images (48 entries)" in result.summary


def test_schnell_gets_256_tokens_and_the_flag_overrides(tmp_path, tiny_flux_schnell, demo_dir, accelerator):
    data = copy_images(demo_dir, tmp_path / "data", 1)
    precompute.run(make_cfg(data, tmp_path / "schnell", tiny_flux_schnell, resolutions=[64]), accelerator)
    cache = EmbeddingCache(tmp_path / "schnell")
    assert cache.max_sequence_length == 256
    assert cache.text(cache.empty_caption_id)[0].shape == (256, 32)
    cfg = make_cfg(data, tmp_path / "x", tiny_flux_schnell, max_sequence_length=SHORT_L)
    assert precompute.resolve_max_sequence_length(cfg, {"guidance_embeds": False}) == SHORT_L
    # Without a transformer config, the model name decides.
    cfg = make_cfg(data, tmp_path / "x", tiny_flux_schnell)
    cfg.pretrained_model_name_or_path = "black-forest-labs/FLUX.1-schnell"
    assert precompute.resolve_max_sequence_length(cfg, None) == 256
    cfg.pretrained_model_name_or_path = "black-forest-labs/FLUX.1-dev"
    assert precompute.resolve_max_sequence_length(cfg, None) == 512


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_rerun_skips_finished_shards_and_redoes_interrupted_ones(tmp_path, tiny_flux_dev, demo_dir, accelerator,
                                                                 monkeypatch):
    data = copy_images(demo_dir, tmp_path / "data", 4)
    out = tmp_path / "cache"
    cfg = make_cfg(data, out, tiny_flux_dev, resolutions=[64], max_sequence_length=SHORT_L)
    first = precompute.run(cfg, accelerator)
    images = sorted(n for n in first.written if n.startswith("images-"))
    assert len(images) == 2 and len(first.written) == 2 + 3  # 4 images; 4 captions + "" in 3 text shards
    manifest_bytes = (out / MANIFEST_NAME).read_bytes()

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded although every shard was finished")

    monkeypatch.setattr(precompute, "_load_text_pipeline", no_model)
    monkeypatch.setattr(precompute, "_load_vae", no_model)
    before = _mtimes(out)
    second = precompute.run(cfg, accelerator)
    assert second.written == [] and sorted(second.reused) == sorted(first.written)
    assert (out / MANIFEST_NAME).read_bytes() == manifest_bytes
    assert {k: v for k, v in _mtimes(out).items() if k != MANIFEST_NAME} == {
        k: v for k, v in before.items() if k != MANIFEST_NAME}
    monkeypatch.undo()

    def rerun_writes() -> list[str]:
        before = _mtimes(out)
        written = precompute.run(cfg, accelerator).written
        after = _mtimes(out)
        changed = {name for name in after if before.get(name) != after[name]} - {MANIFEST_NAME}
        assert changed == set(written) | {index_name(n) for n in written}  # nothing else was touched
        assert (out / MANIFEST_NAME).read_bytes() == manifest_bytes  # same content as the first build
        return written

    (out / images[0]).unlink()  # a deleted shard
    assert rerun_writes() == [images[0]]
    (out / index_name(images[1])).unlink()  # a shard whose index was never written: not finished
    assert rerun_writes() == [images[1]]
    # Killed mid-write: only a temporary file, the shard itself not yet renamed into place.
    tmp = out / f".{images[0]}.12345.tmp"
    os.replace(out / images[0], tmp)
    assert rerun_writes() == [images[0]]
    assert not tmp.exists()  # leftovers are cleaned up after the merge
    # A shard altered after its index was written (same size): the sha256 no longer matches.
    blob = bytearray((out / images[1]).read_bytes())
    blob[-1] ^= 0xFF
    (out / images[1]).write_bytes(bytes(blob))
    assert rerun_writes() == [images[1]]


def test_changed_caption_redoes_its_shards_and_drops_the_old_text(tmp_path, tiny_flux_dev, demo_dir, accelerator):
    data = copy_images(demo_dir, tmp_path / "data", 4)
    out = tmp_path / "cache"
    cfg = make_cfg(data, out, tiny_flux_dev, resolutions=[64], max_sequence_length=SHORT_L)
    precompute.run(cfg, accelerator)
    txt = sorted(data.glob("*.txt"))[3]
    txt.write_text("a tiny green tree")
    result = precompute.run(cfg, accelerator)
    assert any(n.startswith("images-00001") for n in result.written)
    assert not any(n.startswith("images-00000") for n in result.written)  # the other image shard is reused
    cache = EmbeddingCache(out)
    entry = next(e for e in cache.entries if Path(e.source).stem == txt.stem)
    assert cache.caption(entry.caption_id) == "a tiny green tree"
    assert len(cache.manifest["texts"]) == 5  # the old caption is gone
    assert all(Path(out, name).exists() for name in cache.manifest["shards"])
    assert {p.name for p in out.iterdir()} == {MANIFEST_NAME} | set(cache.manifest["shards"]) | {
        index_name(n) for n in cache.manifest["shards"]}


def test_text_runs_beside_the_images_and_sequential_models_frees_t5_first(tmp_path, tiny_flux_dev, demo_dir,
                                                                           accelerator, monkeypatch):
    """By default both models load up front and the captions are encoded on a thread of their own
    beside the images; with --sequential_models T5 is gone when the VAE loads. Same cache both ways."""
    data = copy_images(demo_dir, tmp_path / "data", 3)
    load_text, load_vae = precompute._load_text_pipeline, precompute._load_vae
    encode_text = precompute._encode_text_shard
    pipes, text_alive_at_vae_load, text_threads = [], [], []

    def spy_text(*args):
        pipe = load_text(*args)
        pipes.append(weakref.ref(pipe.text_encoder_2))
        return pipe

    def spy_vae(*args):
        gc.collect()
        text_alive_at_vae_load.append(pipes[-1]() is not None)
        return load_vae(*args)

    def spy_encode_text(*args):
        text_threads.append(threading.current_thread() is threading.main_thread())
        return encode_text(*args)

    monkeypatch.setattr(precompute, "_load_text_pipeline", spy_text)
    monkeypatch.setattr(precompute, "_load_vae", spy_vae)
    monkeypatch.setattr(precompute, "_encode_text_shard", spy_encode_text)
    caches = {}
    for sequential in (True, False):
        caches[sequential] = tmp_path / f"cache-{sequential}"
        cfg = make_cfg(data, caches[sequential], tiny_flux_dev, resolutions=[64], max_sequence_length=SHORT_L,
                       sequential_models=sequential, shard_size=2)
        precompute.run(cfg, accelerator)
    assert text_alive_at_vae_load == [False, True]
    assert text_threads == [True, True, False, False]  # 3 captions + the empty one in 2 shards, each run
    manifests = [json.loads((caches[k] / MANIFEST_NAME).read_text()) for k in (True, False)]
    for manifest in manifests:
        manifest.pop("args")
    assert manifests[0] == manifests[1] and len(manifests[0]["images"]) == 3
    for name in manifests[0]["shards"]:
        assert (caches[True] / name).read_bytes() == (caches[False] / name).read_bytes(), name


@pytest.fixture
def dirty_data(tmp_path, demo_dir) -> Path:
    data = copy_images(demo_dir, tmp_path / "data", 2)
    Image.new("RGB", (10, 10), "red").save(data / "98_tiny.png")
    (data / "98_tiny.txt").write_text("a tiny red square")
    Image.new("RGB", (96, 96), "blue").save(data / "97_blank.png")
    (data / "97_blank.txt").write_text("   \n")
    # Bucket 64x64 needs 0.89x (kept); 128x128 needs 1.78x, more than --max_upscale 1.5 below.
    Image.new("RGB", (80, 72), "green").save(data / "96_small.png")
    (data / "96_small.txt").write_text("a small green field")
    return data


def test_skips_are_reported_and_strict_fails(dirty_data, tmp_path, tiny_flux_dev, accelerator, capsys):
    out = tmp_path / "cache"
    cfg = make_cfg(dirty_data, out, tiny_flux_dev, max_sequence_length=SHORT_L, max_upscale=1.5)
    precompute.run(cfg, accelerator)
    cache = EmbeddingCache(out)
    skips = {Path(s["source"]).name: s["reason"] for s in cache.manifest["skips"]}
    assert set(skips) == {"98_tiny.png", "97_blank.png"}
    assert "too small" in skips["98_tiny.png"] and "empty caption" in skips["97_blank.png"]
    assert not any(Path(e.source).name in skips for e in cache.entries)
    small = [(e.resolution, e.width, e.height) for e in cache.entries if e.source.endswith("96_small.png")]
    assert small == [(64, 64, 64)]
    assert [(Path(s["source"]).name, s["resolution"]) for s in cache.manifest["resolution_skips"]] == [
        ("96_small.png", 128)]
    assert "1.78x upscaling to 128x128 (> --max_upscale 1.5)" in cache.manifest["resolution_skips"][0]["reason"]
    summary = capsys.readouterr().out
    assert "Skipped 2 images" in summary and "98_tiny.png" in summary

    argv = [f"--{k}={v}" for k, v in [("dataset", dirty_data), ("embeddings_dir", out),
                                       ("pretrained_model_name_or_path", tiny_flux_dev),
                                       ("max_sequence_length", SHORT_L), ("shard_size", 2), ("max_upscale", 1.5)]]
    argv += ["--resolutions", "64", "128", "--strict"]
    assert precompute_embeddings.main(argv) == 1
    err = capsys.readouterr().err
    assert "--strict" in err and "98_tiny.png" in err and "97_blank.png" in err and "too small" in err
    assert not (out / MANIFEST_NAME).exists()
    (dirty_data / "98_tiny.png").unlink()
    (dirty_data / "97_blank.png").unlink()
    assert precompute_embeddings.main(argv) == 0
    assert EmbeddingCache(out).manifest["counts"]["images"] == 3


def test_missing_dataset_and_model_name_the_flag(tmp_path, tiny_flux_dev, demo_dir, capsys):
    argv = ["--embeddings_dir", str(tmp_path / "c"), "--resolutions", "64"]
    assert precompute_embeddings.main(argv + ["--dataset", str(tmp_path / "nope"),
                                              "--pretrained_model_name_or_path", str(tiny_flux_dev)]) != 0
    err = capsys.readouterr().err
    assert "--dataset" in err and "nope" in err
    assert precompute_embeddings.main(argv + ["--dataset", str(demo_dir / "images"),
                                              "--pretrained_model_name_or_path", "nobody/no-such-flux"]) != 0
    err = capsys.readouterr().err
    assert "--pretrained_model_name_or_path" in err and "nobody/no-such-flux" in err
    assert not (tmp_path / "c" / MANIFEST_NAME).exists()


def test_oxen_dataset_is_fetched_then_read(tmp_path, tiny_flux_dev, demo_dir, accelerator, monkeypatch):
    local = copy_images(demo_dir, tmp_path / "fetched", 1)
    calls = []

    class OxenError(RuntimeError):
        pass

    def fetch_dataset(repo, revision=None, host=None):
        calls.append((repo, revision, host))
        if repo == "me/offline":
            raise OxenError("Could not read oxen:me/offline: connection refused")
        return local

    fake = types.SimpleNamespace(fetch_dataset=fetch_dataset, OxenError=OxenError)
    monkeypatch.setitem(sys.modules, "fluxlora.oxen", fake)  # no Oxen server offline; the seam is what counts
    cfg = make_cfg("oxen:me/shapes", tmp_path / "cache", tiny_flux_dev, resolutions=[64],
                   max_sequence_length=SHORT_L, oxen_revision="v2", oxen_host="localhost:3000")
    precompute.run(cfg, accelerator)
    assert calls == [("me/shapes", "v2", "localhost:3000")]
    cache = EmbeddingCache(tmp_path / "cache")
    assert [Path(e.source).parent for e in cache.entries] == [local]
    assert cache.manifest["args"]["dataset"] == "oxen:me/shapes"
    cfg.dataset = "oxen:me/offline"
    with pytest.raises(precompute.PrecomputeError, match="connection refused"):
        precompute.run(cfg, accelerator)


@pytest.mark.slow
def test_two_processes_build_the_same_cache_as_one(tmp_path, tiny_flux_dev, demo_dir):
    data = copy_images(demo_dir, tmp_path / "data", 7)
    args = ["--dataset", str(data), "--pretrained_model_name_or_path", str(tiny_flux_dev),
            "--resolutions", "64", "128", "--flip_copies", "--shard_size", "2", "--vae_batch_size", "3",
            "--max_sequence_length", "64", "--validation_prompts", "sks a red circle"]
    one, two = tmp_path / "one", tmp_path / "two"
    env = repo_env()
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(REPO / "precompute_embeddings.py"), *args, "--embeddings_dir", str(two)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("Cached 7 of 7 images") == 1  # one process group, one merge
    assert precompute_embeddings.main([*args, "--embeddings_dir", str(one)]) == 0

    manifests = [json.loads((d / MANIFEST_NAME).read_text()) for d in (one, two)]
    for m in manifests:
        m.pop("args")  # holds --embeddings_dir, which differs
    assert manifests[0] == manifests[1]  # the same entries, shards and sha256s
    assert len(manifests[0]["shards"]) == 4 + 5  # 7 images in 4 shards, 7 captions + 2 in 5
    for name in manifests[0]["shards"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
