"""EmbeddingCache: the trainer's only view of the cache (integrity checks, fingerprints, reads)."""
from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from fluxlora import precompute
from fluxlora.cache import MANIFEST_NAME, CacheError, EmbeddingCache, fingerprint_hash, rebuild_command
from fluxlora.config import PrecomputeConfig, parse_config
from fluxlora.sampler import Batch, load_batch


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_flux_dev, demo_dir) -> Path:
    """3 demo images at 64 px, 16 T5 tokens, 2 samples per shard (2 image shards, 3 text shards)."""
    data = tmp_path_factory.mktemp("data")
    for image in sorted(p for p in (demo_dir / "images").iterdir() if p.suffix != ".txt")[:3]:
        shutil.copy(image, data / image.name)
        shutil.copy(image.with_suffix(".txt"), data / f"{image.stem}.txt")
    out = tmp_path_factory.mktemp("cache")
    cfg = PrecomputeConfig(dataset=str(data), embeddings_dir=str(out), pretrained_model_name_or_path=str(tiny_flux_dev),
                           resolutions=[64], max_sequence_length=16, shard_size=2, trigger_phrase="sks",
                           validation_prompts=["sks a blue star"])
    cfg.validate()
    precompute.run(cfg, Accelerator(cpu=True))
    return out


@pytest.fixture
def cache_copy(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "cache"))


def image_shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("images-*.safetensors"))


def test_reads_every_entry_and_caption(built):
    cache = EmbeddingCache(built)
    assert len(cache.entries) == 3
    assert {e.shard for e in cache.entries} == {p.name for p in image_shards(built)}
    for entry in cache.entries:
        mean, std = cache.latent_dist(entry)
        assert mean.shape == std.shape == (16, entry.height // 8, entry.width // 8)
        assert mean.dtype == torch.bfloat16 and bool((std > 0).all())
        t5, clip = cache.text(entry.caption_id)
        assert t5.shape == (16, 32) and clip.shape == (32,)
        assert cache.caption(entry.caption_id).startswith("sks, ")
    prompt, cid = cache.validation[0]
    assert prompt == "sks a blue star" and cache.text(cid)[0].shape == (16, 32)
    assert cache.text(cache.empty_caption_id)[1].shape == (32,)
    with pytest.raises(CacheError, match="not in the cache"):
        cache.text("0" * 20)


def test_concurrent_and_unpickled_reads_equal_sequential_ones(built):
    cache = EmbeddingCache(built)
    expected = [cache.latent_dist(e) for e in cache.entries]
    fresh = EmbeddingCache(built, verify=False)  # no handle open yet: threads race to open them
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(fresh.latent_dist, cache.entries * 20))
    for got, want in zip(results, expected * 20):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    clone = pickle.loads(pickle.dumps(fresh))  # as a DataLoader worker receives it
    assert all(torch.equal(clone.latent_dist(e)[0], want[0]) for e, want in zip(cache.entries, expected))


def test_a_dropped_caption_loads_the_empty_captions_embeddings(built):
    cache = EmbeddingCache(built)
    entry = cache.entries[0]
    data = load_batch(cache, Batch(position=0, entries=(entry, entry), sample_indices=(0, 1),
                                   drop_caption=(False, True)))
    kept, empty = cache.text(entry.caption_id), cache.text(cache.empty_caption_id)
    assert not torch.equal(kept[0], empty[0])
    for row, (t5, clip) in enumerate((kept, empty)):
        assert torch.equal(data["t5"][row], t5) and torch.equal(data["clip"][row], clip)
        assert torch.equal(data["mean"][row], cache.latent_dist(entry)[0])  # the image stays


def test_missing_manifest_says_how_to_build(tmp_path):
    with pytest.raises(CacheError, match=rf"No {MANIFEST_NAME} in {re.escape(str(tmp_path))}.*precompute_embeddings"):
        EmbeddingCache(tmp_path)


def test_truncated_shard_is_named(cache_copy):
    shard = image_shards(cache_copy)[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    for verify in (True, False):  # the size check needs no hashing
        with pytest.raises(CacheError, match=rf"{re.escape(str(shard))}.*truncated.*python precompute_embeddings.py"):
            EmbeddingCache(cache_copy, verify=verify)


def test_altered_shard_is_named(cache_copy):
    shard = min(cache_copy.glob("text-*.safetensors"))
    blob = bytearray(shard.read_bytes())
    blob[-3] ^= 0x01  # same size, one bit of one tensor
    shard.write_bytes(bytes(blob))
    with pytest.raises(CacheError, match=rf"{re.escape(str(shard))} does not match its sha256"):
        EmbeddingCache(cache_copy)
    EmbeddingCache(cache_copy, verify=False)  # verify=False trusts a file of the right size


def test_missing_shard_is_named(cache_copy):
    shard = image_shards(cache_copy)[0]
    shard.unlink()
    with pytest.raises(CacheError, match=rf"{re.escape(str(shard))} is missing"):
        EmbeddingCache(cache_copy, verify=False)


def test_fingerprint_mismatch_names_the_flag_and_the_rebuild(built, tiny_flux_dev):
    cache = EmbeddingCache(built)
    # Equal settings pass, in any spelling: a relative model path, resolutions as a tuple, repeated.
    relative = os.path.relpath(tiny_flux_dev)
    cache.check_fingerprint(pretrained_model_name_or_path=relative, resolutions=(64, 64), max_sequence_length=16,
                            trigger_phrase="sks", flip_copies=False, max_aspect=4)
    with pytest.raises(CacheError) as info:
        cache.check_fingerprint(max_sequence_length=512, trigger_phrase="sks")
    message = str(info.value)
    assert f"--max_sequence_length is 512 but the cache at {built} was built with 16" in message
    assert "trigger_phrase" not in message.split("; rebuild with:")[0]
    command = message.split("rebuild with: ")[1]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "precompute_embeddings.py"]
    rebuilt = parse_config(PrecomputeConfig, argv[2:])  # the command is valid and asks for the new value
    assert rebuilt.max_sequence_length == 512 and rebuilt.embeddings_dir == str(built)
    assert rebuilt.trigger_phrase == "sks" and rebuilt.resolutions == [64] and rebuilt.shard_size == 2
    assert rebuilt.dataset == cache.manifest["args"]["dataset"]
    with pytest.raises(CacheError, match="--flip_copies is True but the cache .* was built with False"):
        cache.check_fingerprint(flip_copies=True)
    with pytest.raises(CacheError, match="--lora_rank is 4 but the cache .* does not record it"):
        cache.check_fingerprint(lora_rank=4)


def test_shard_names_depend_on_the_settings_not_their_order():
    """The fingerprint's hash names the shards: a resumed build must find the finished ones."""
    settings = {"resolutions": [512, 1024], "max_sequence_length": 512, "trigger_phrase": "sks"}
    assert fingerprint_hash(settings) == fingerprint_hash(dict(reversed(settings.items())))
    assert fingerprint_hash(settings) != fingerprint_hash({**settings, "trigger_phrase": "ohwx"})


def test_rebuild_command_drops_defaults_and_quotes():
    command = rebuild_command({"dataset": "my data", "embeddings_dir": "out", "resolutions": [512, 768, 1024],
                               "flip_copies": False, "revision": None},
                              {"flip_copies": True, "caption_prefix": "a photo of "})
    assert shlex.split(command) == ["python", "precompute_embeddings.py", "--dataset", "my data", "--embeddings_dir",
                                    "out", "--flip_copies", "--caption_prefix", "a photo of "]


def test_foreign_manifest_is_refused(cache_copy):
    manifest = json.loads((cache_copy / MANIFEST_NAME).read_text())
    manifest["version"] = 99
    (cache_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="version 99"):
        EmbeddingCache(cache_copy)
    (cache_copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CacheError, match=rf"{re.escape(str(cache_copy / MANIFEST_NAME))} is unreadable"):
        EmbeddingCache(cache_copy)
