"""The embedding cache: VAE posteriors and T5/CLIP prompt embeddings on disk, read by the trainer.

`precompute_embeddings.py` (fluxlora.precompute) writes it; the trainer reads it through
`EmbeddingCache` and never loads T5, CLIP or the VAE encoder. Layout of the cache folder:

    manifest.json                        what is cached and where (written last: its presence
                                         means the cache is complete)
    text-00000-<fp>.safetensors          per caption_id: "<cid>.t5" [L, d_model], "<cid>.clip" [hidden]
    text-00000-<fp>.json                 the shard's index; its presence marks the shard finished
    images-00000-<fp>.safetensors        per entry: "<sample_id>.<res>.<0|1>.mean" / ".std"
    images-00000-<fp>.json               [16, h/8, w/8] each, h and w the bucket's pixel size

All tensors are bf16. `<fp>` is a hash of the fingerprint (everything that changes the tensors), so
shards built with other settings never pass for these. Entries are keyed by content-derived ids
(sample_id from image bytes and caption, caption_id from the caption), never by position.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

FORMAT_NAME = "fluxlora-embeddings"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".json"
TMP_SUFFIX = ".tmp"
STORED_DTYPE = torch.bfloat16
PRECOMPUTE_SCRIPT = "precompute_embeddings.py"


class CacheError(RuntimeError):
    """The cache is missing, incomplete, altered or was built for other settings.

    The message names the file or flag and gives the precompute command that rebuilds it.
    """


@dataclass(frozen=True)
class ImageEntry:
    """One cached (image, resolution, flip): the key to its VAE posterior.

    width and height are the bucket's pixel size (multiples of 16); the latents are
    [16, height / 8, width / 8].
    """

    sample_id: str
    caption_id: str
    resolution: int
    width: int
    height: int
    flipped: bool
    shard: str
    source: str


def image_key(sample_id: str, resolution: int, flipped: bool) -> str:
    """Tensor-name prefix of one entry in an image shard ("<key>.mean", "<key>.std")."""
    return f"{sample_id}.{resolution}.{int(flipped)}"


def text_keys(caption_id: str) -> tuple[str, str]:
    """Tensor names of a caption's T5 states and CLIP pooled output in a text shard."""
    return f"{caption_id}.t5", f"{caption_id}.clip"


def normalize_model(name_or_path: str) -> str:
    """A local model folder as its absolute path (so ./m and /abs/m compare equal); a hub id as is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def normalize_fingerprint_value(key: str, value: Any) -> Any:
    """The canonical form of a fingerprint value, as stored in the manifest and compared against."""
    if key == "pretrained_model_name_or_path":
        return normalize_model(str(value))
    if key == "resolutions":
        return sorted({int(v) for v in value})
    if key in ("max_aspect", "max_upscale"):
        return float(value)
    if key == "max_sequence_length":
        return int(value)
    if key == "flip_copies":
        return bool(value)
    return value


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    """12 hex digits identifying a fingerprint; part of every shard's file name."""
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def shard_name(kind: str, index: int, fp_hash: str) -> str:
    """File name of shard `index` of `kind` ("text" or "images"): depends only on these."""
    return f"{kind}-{index:05d}-{fp_hash}{SHARD_SUFFIX}"


def index_name(shard: str) -> str:
    """File name of a shard's JSON index (its completion marker)."""
    return shard[: -len(SHARD_SUFFIX)] + INDEX_SUFFIX


def sha256_file(path: Path, chunk_bytes: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent, the old file, or complete.

    Written to a hidden temporary name in the same folder, fsynced, renamed over `path`, and the
    folder fsynced so the rename survives a crash. Temporary names never look like shard names,
    so a leftover one is never read as a finished shard.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rebuild_command(args: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> str:
    """The precompute command line for `args` (PrecomputeConfig fields), with `overrides` applied.

    Flags equal to their defaults are left out; --dataset and --embeddings_dir are always given.
    """
    from fluxlora.config import PrecomputeConfig  # config pulls in yaml; only needed for messages

    values = {**args, **(overrides or {})}
    parts = ["python", PRECOMPUTE_SCRIPT]
    for f in dataclasses.fields(PrecomputeConfig):
        if f.name not in values:
            continue
        value = values[f.name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        if f.name not in ("dataset", "embeddings_dir") and (value == default or value is None):
            continue
        if isinstance(value, bool):
            parts.append(f"--{f.name}" if value else f"--no-{f.name}")
        elif isinstance(value, (list, tuple)):
            parts += [f"--{f.name}", *(str(v) for v in value)]
        else:
            parts += [f"--{f.name}", str(value)]
    return shlex.join(parts)


class EmbeddingCache:
    """Read access to a finished cache folder; cheap, thread-safe reads of one entry at a time.

    Shards are opened lazily with safetensors' `safe_open` (memory-mapped) and the handles kept
    open; pickling (DataLoader workers) drops the handles and they reopen in the worker.

    Attributes:
        manifest: the parsed manifest.json.
        fingerprint: the settings the tensors depend on (see `check_fingerprint`).
        entries: every cached (image, resolution[, flip]), ordered by listing position of the
            image, then resolution, then flip.
        empty_caption_id: caption_id of "" (the embedding used for caption dropout).
        validation: (prompt, caption_id) of each validation prompt, in the order given.
        vae_scaling_factor, vae_shift_factor: from the VAE config; latents for the transformer are
            (z - shift) * scale, as FluxPipeline does.
        max_sequence_length: T5 tokens per caption (L).
    """

    def __init__(self, path: str | Path, *, verify: bool = True):
        """Read `path`/manifest.json and check the shards exist with their recorded size.

        Args:
            path: the cache folder (precompute's --embeddings_dir).
            verify: also check every shard's sha256 against the manifest (reads every byte once).

        Raises:
            CacheError: no manifest, an unreadable one, or a missing, truncated or altered shard.
        """
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise CacheError(
                f"No {MANIFEST_NAME} in {self.path}: the cache was never built there or its build did not "
                f"finish. Build it (or finish it; finished shards are kept) with: python {PRECOMPUTE_SCRIPT} "
                f"--dataset DATA --embeddings_dir {shlex.quote(str(self.path))}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise CacheError(f"{manifest_path} is unreadable ({err}); rebuild the cache with "
                             f"python {PRECOMPUTE_SCRIPT} --dataset DATA --embeddings_dir "
                             f"{shlex.quote(str(self.path))}") from err
        if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
            raise CacheError(f"{manifest_path} is not a {FORMAT_NAME} v{FORMAT_VERSION} manifest (format "
                             f"{manifest.get('format')!r}, version {manifest.get('version')!r}); rebuild with: "
                             f"{self._rebuild(manifest)}")
        self.manifest: dict[str, Any] = manifest
        self.fingerprint: dict[str, Any] = manifest["fingerprint"]
        self._check_shards(verify)
        self.entries: list[ImageEntry] = [
            ImageEntry(**{f.name: e[f.name] for f in dataclasses.fields(ImageEntry)}) for e in manifest["images"]]
        self._texts: dict[str, dict[str, str]] = manifest["texts"]
        self.empty_caption_id: str = manifest["empty_caption_id"]
        self.validation: list[tuple[str, str]] = [(p, c) for p, c in manifest["validation"]]
        self.vae_scaling_factor: float = float(manifest["vae_scaling_factor"])
        self.vae_shift_factor: float = float(manifest["vae_shift_factor"])
        self.max_sequence_length: int = int(manifest["max_sequence_length"])
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _rebuild(self, manifest: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None) -> str:
        args = dict((manifest if manifest is not None else self.manifest).get("args") or {})
        args.setdefault("dataset", "DATA")
        args["embeddings_dir"] = str(self.path)
        return rebuild_command(args, overrides)

    def _check_shards(self, verify: bool) -> None:
        for name, info in self.manifest["shards"].items():
            file = self.path / name
            if not file.is_file():
                raise CacheError(f"{file} is missing from the cache; rebuild it (finished shards are kept) "
                                 f"with: {self._rebuild()}")
            size = file.stat().st_size
            if size != info["size"]:
                raise CacheError(f"{file} is {size} bytes but the manifest records {info['size']} (truncated or "
                                 f"altered); delete it and rebuild with: {self._rebuild()}")
            if verify and sha256_file(file) != info["sha256"]:
                raise CacheError(f"{file} does not match its sha256 in the manifest (altered or corrupt); "
                                 f"delete it and rebuild with: {self._rebuild()}")

    def check_fingerprint(self, **expected: Any) -> None:
        """Check that the cache was built with the given settings (fingerprint keys = precompute flags).

        Raises:
            CacheError: for every key that differs (or that the cache does not record), saying
                "--<key> is X but the cache at P was built with Y" and the command that rebuilds it
                with the expected values.
        """
        problems, overrides = [], {}
        for key, value in expected.items():
            want = normalize_fingerprint_value(key, value)
            if key not in self.fingerprint:
                problems.append(f"--{key} is {value!r} but the cache at {self.path} does not record it")
            elif want != self.fingerprint[key]:
                problems.append(f"--{key} is {want!r} but the cache at {self.path} was built with "
                                f"{self.fingerprint[key]!r}")
            else:
                continue
            overrides[key] = want
        if problems:
            raise CacheError("; ".join(problems) + f"; rebuild with: {self._rebuild(overrides=overrides)}")

    def _handle(self, shard: str) -> Any:
        handle = self._handles.get(shard)
        if handle is None:
            with self._lock:
                handle = self._handles.get(shard)
                if handle is None:
                    if shard not in self.manifest["shards"]:
                        raise CacheError(f"{shard} is not a shard of the cache at {self.path}; rebuild with: "
                                         f"{self._rebuild()}")
                    handle = safe_open(str(self.path / shard), framework="pt", device="cpu")
                    self._handles[shard] = handle
        return handle

    def _get(self, shard: str, key: str) -> torch.Tensor:
        try:
            return self._handle(shard).get_tensor(key)
        except Exception as err:  # safetensors raises its own error types for missing keys / bad files
            raise CacheError(f"{self.path / shard} has no readable tensor {key!r} ({err}); the file was altered "
                             f"after the build: delete it and rebuild with: {self._rebuild()}") from err

    def latent_dist(self, entry: ImageEntry) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior of one entry, before FLUX's shift/scale.

        Returns:
            (mean, std), each [16, entry.height / 8, entry.width / 8] bf16 on the CPU.
        """
        key = image_key(entry.sample_id, entry.resolution, entry.flipped)
        return self._get(entry.shard, f"{key}.mean"), self._get(entry.shard, f"{key}.std")

    def text(self, caption_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt embeddings of a caption, as FluxPipeline.encode_prompt computes them.

        Returns:
            (T5 last_hidden_state [max_sequence_length, d_model], CLIP pooler_output [hidden]),
            bf16 on the CPU.
        """
        info = self._texts.get(caption_id)
        if info is None:
            raise CacheError(f"caption {caption_id} is not in the cache at {self.path} (a validation prompt "
                             f"must be given to the precompute run with --validation_prompts); rebuild with: "
                             f"{self._rebuild()}")
        t5_key, clip_key = text_keys(caption_id)
        return self._get(info["shard"], t5_key), self._get(info["shard"], clip_key)

    def caption(self, caption_id: str) -> str:
        """The caption text of a caption_id (after trigger phrase, prefix and suffix)."""
        return self._texts[caption_id]["caption"]

    def __getstate__(self) -> dict[str, Any]:
        # safe_open handles and locks do not pickle; a DataLoader worker reopens shards lazily.
        state = self.__dict__.copy()
        state["_handles"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
