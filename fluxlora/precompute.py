"""Build the embedding cache (fluxlora.cache): VAE posteriors of every image, T5/CLIP of every caption.

The work is split into shards by listing position, independent of the number of processes:
image shard k holds samples [k * shard_size, (k + 1) * shard_size) of the dataset listing, text
shard k holds captions [k * shard_size, ...) of the caption set sorted by caption_id, and shard k
of either kind is done by rank k % world_size. Shard names depend only on k and the fingerprint,
and a shard's contents only on its samples, so any number of processes writes the same files.

Each shard is written to a temporary name, fsynced and renamed, then its JSON index likewise: the
index marks it finished. A rerun redoes only shards without a matching index (same planned
samples, same sha256), so an interrupted run resumes where it stopped. When every rank is done,
the main process merges the indexes into manifest.json.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from PIL import ImageOps
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from fluxlora import buckets
from fluxlora.cache import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    STORED_DTYPE,
    TMP_SUFFIX,
    fingerprint_hash,
    image_key,
    index_name,
    normalize_fingerprint_value,
    sha256_file,
    shard_name,
    text_keys,
    write_atomic,
)
from fluxlora.config import MAX_SEQUENCE_LENGTH, ConfigError, PrecomputeConfig
from fluxlora.data import RawSample, SkipSample, build_caption, caption_id, iter_samples, load_image, sample_id
from fluxlora.vae import use_fp32_score_attention

logger = logging.getLogger(__name__)

OXEN_PREFIX = "oxen:"
FLUX_PIPELINE_LOGGER = "diffusers.pipelines.flux.pipeline_flux"  # where encode_prompt warns of truncation
T5_ATTENTION = "fluxlora_t5"  # the attn_implementation name of _t5_attention in transformers' registry
PREPARE_THREADS = min(8, os.cpu_count() or 1)  # image decoding and resizing beside the VAE
_SHARD_FILE = re.compile(r"^(text|images)-\d{5}-[0-9a-f]{12}(\.safetensors|\.json)$")


class PrecomputeError(RuntimeError):
    """A failure the user fixes in the data: an unreadable or unreachable --dataset, or --strict with
    skipped samples.

    The message names the flag or lists the samples.
    """


@dataclass
class _Sample:
    """One listed sample: the raw record, and its final caption or why it has none."""

    raw: RawSample
    caption: str | None
    skip_reason: str | None


@dataclass
class _ImageShard:
    index: int
    name: str
    samples: list[_Sample]
    plan: str = ""


@dataclass
class _TextShard:
    index: int
    name: str
    captions: dict[str, str]  # caption_id -> caption, sorted by caption_id
    plan: str = ""


@dataclass
class PrecomputeResult:
    """What one process did: which of its shards it wrote and which it found finished."""

    written: list[str]
    reused: list[str]
    manifest: dict[str, Any] | None  # on the main process; None elsewhere
    summary: str | None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def resolve_dataset(cfg: PrecomputeConfig, accelerator: Accelerator) -> str:
    """What to list samples from: --dataset itself, or the local copy of an oxen: dataset.

    Raises:
        PrecomputeError: the Oxen download failed (the message says what to check).
    """
    if not cfg.dataset.startswith(OXEN_PREFIX):
        return cfg.dataset
    from fluxlora.oxen import OxenError, fetch_dataset  # imported here: only oxen: datasets need oxenai

    repo = cfg.dataset[len(OXEN_PREFIX):]
    # One download into the shared location; the other ranks then find it in place.
    with accelerator.main_process_first():
        try:
            return str(fetch_dataset(repo, revision=cfg.oxen_revision, host=cfg.oxen_host))
        except OxenError as err:
            raise PrecomputeError(str(err)) from err


def list_samples(dataset: str, cfg: PrecomputeConfig) -> list[_Sample]:
    """Every sample of the dataset in listing order, with its final caption (no image decoding).

    Raises:
        PrecomputeError: the dataset cannot be read as a whole (no such path, a missing column,
            no images); the message names the flag, as fluxlora.data words it.
    """
    samples = []
    try:
        for raw in iter_samples(dataset, image_column=cfg.image_column, caption_column=cfg.caption_column,
                                split=cfg.split):
            try:
                caption = build_caption(raw.caption, raw.source, trigger_phrase=cfg.trigger_phrase,
                                        prefix=cfg.caption_prefix, suffix=cfg.caption_suffix)
                samples.append(_Sample(raw, caption, None))
            except SkipSample as skip:
                samples.append(_Sample(raw, None, skip.reason))
    except (FileNotFoundError, ValueError) as err:
        raise PrecomputeError(str(err)) from err
    if not samples:
        raise PrecomputeError(f"--dataset {cfg.dataset}: holds no samples")
    return samples


def _read_model_config(cfg: PrecomputeConfig, subfolder: str) -> dict[str, Any]:
    """<model>/<subfolder>/config.json of a local folder or hub repo (no diffusers import: it takes
    seconds, and a rerun with every shard finished loads no model)."""
    from huggingface_hub import hf_hub_download

    model = Path(cfg.pretrained_model_name_or_path).expanduser()
    if model.is_dir():
        path = model / subfolder / "config.json"
    else:
        path = Path(hf_hub_download(cfg.pretrained_model_name_or_path, "config.json", subfolder=subfolder,
                                    revision=cfg.revision))
    return json.loads(path.read_text())


def model_configs(cfg: PrecomputeConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(VAE config, transformer config or None if the model has none) without loading weights.

    Raises:
        ConfigError: the model (or its VAE config) cannot be found.
    """
    model = cfg.pretrained_model_name_or_path
    if Path(model).expanduser().is_file():
        raise ConfigError("pretrained_model_name_or_path", f"{model} is a single file; precomputing needs the "
                                                           f"text encoders and the VAE: give a diffusers folder "
                                                           f"or hub id of FLUX.1")
    from huggingface_hub.errors import EntryNotFoundError

    try:
        vae_config = _read_model_config(cfg, "vae")
    except (OSError, ValueError, EntryNotFoundError) as err:
        raise ConfigError("pretrained_model_name_or_path",
                          f"cannot load the VAE config of {model} ({err}); give a diffusers folder or a hub id "
                          f"that is downloaded or reachable") from err
    missing = [key for key in ("scaling_factor", "shift_factor") if vae_config.get(key) is None]
    if missing:
        raise ConfigError("pretrained_model_name_or_path", f"{model}: the VAE config has no {' or '.join(missing)}; "
                                                           f"is this a FLUX.1 model?")
    try:
        transformer_config = _read_model_config(cfg, "transformer")
    except (OSError, ValueError, EntryNotFoundError):
        transformer_config = None  # text encoders + VAE only: fall back to the model name
    return vae_config, transformer_config


def resolve_max_sequence_length(cfg: PrecomputeConfig, transformer_config: dict[str, Any] | None) -> int:
    """--max_sequence_length, else 256 for schnell (no guidance embedding / "schnell" in the name), else 512."""
    if cfg.max_sequence_length is not None:
        return cfg.max_sequence_length
    if transformer_config is not None and "guidance_embeds" in transformer_config:
        schnell = not transformer_config["guidance_embeds"]
    else:
        schnell = "schnell" in cfg.pretrained_model_name_or_path.lower()
    return MAX_SEQUENCE_LENGTH["schnell" if schnell else "dev"]


def read_validation_prompts(cfg: PrecomputeConfig) -> list[str]:
    """--validation_prompts then the non-blank lines of --validation_prompts_file, first occurrence kept."""
    prompts = list(cfg.validation_prompts)
    if cfg.validation_prompts_file:
        prompts += [line.strip() for line in Path(cfg.validation_prompts_file).read_text().splitlines()]
    return list(dict.fromkeys(p for p in prompts if p.strip()))


def make_fingerprint(cfg: PrecomputeConfig, max_sequence_length: int) -> dict[str, Any]:
    """Everything the cached tensors depend on (keys are precompute flags, except the fixed ones)."""
    flags = {
        "pretrained_model_name_or_path": cfg.pretrained_model_name_or_path,
        "revision": cfg.revision,
        "variant": cfg.variant,
        "resolutions": cfg.resolutions,
        "max_aspect": cfg.max_aspect,
        "max_upscale": cfg.max_upscale,
        "max_sequence_length": max_sequence_length,
        "trigger_phrase": cfg.trigger_phrase,
        "caption_prefix": cfg.caption_prefix,
        "caption_suffix": cfg.caption_suffix,
        "flip_copies": cfg.flip_copies,
    }
    fingerprint = {key: normalize_fingerprint_value(key, value) for key, value in flags.items()}
    return {"format_version": FORMAT_VERSION, "dtype": "bf16", "crop": "center", **fingerprint}


def _chunks(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for index, start in enumerate(range(0, len(items), size)):
        yield index, items[start:start + size]


def _read_index(out_dir: Path, shard: str, plan: str) -> dict[str, Any] | None:
    """The shard's JSON index if the shard is finished: index present, same plan, file with its sha256."""
    try:
        index = json.loads((out_dir / index_name(shard)).read_text())
    except (OSError, ValueError):
        return None
    file = out_dir / shard
    if index.get("plan") != plan or not file.is_file() or file.stat().st_size != index.get("size"):
        return None
    return index if sha256_file(file) == index.get("sha256") else None


def _write_shard(out_dir: Path, shard: str, tensors: dict[str, torch.Tensor], index: dict[str, Any]) -> None:
    """Write the safetensors shard, then its index (the completion marker), each atomically."""
    # One metadata key: safetensors writes a metadata map in hash order, which would make equal
    # shards differ in bytes (and sha256) from run to run.
    data = save_safetensors(tensors, metadata={"format": f"{FORMAT_NAME}/{FORMAT_VERSION}"})
    index = {**index, "shard": shard, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    write_atomic(out_dir / shard, data)
    write_atomic(out_dir / index_name(shard), json.dumps(index, indent=1, sort_keys=True).encode())


class _ShardWriter:
    """Writes a phase's shards on a thread of its own (serialising, hashing and fsyncing 256 MB of T5
    states takes about a second), so that the phase encodes its next shard meanwhile. One write at a time:
    `write` first waits for the one before, so at most two shards are in memory, and a failed write
    raises at the next `write` or where the `with` block ends."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self.pending: Future[None] | None = None

    def write(self, shard: str, tensors: dict[str, torch.Tensor], index: dict[str, Any]) -> None:
        self.wait()
        self.pending = self.pool.submit(_write_shard, self.out_dir, shard, tensors, index)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


def _compute_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves memory and is what FLUX runs in; the CPU keeps fp32 (bf16 matmuls there are slow).
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def _t5_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, *, scaling: float, position_bias: torch.Tensor,
                  dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """T5 attention as one fused SDPA call, registered with transformers' AttentionInterface.

    Computes what transformers' eager T5 attention does, softmax(q k^T * scaling + position_bias +
    attention_mask) v, in a fused kernel that never holds the [B, heads, Lq, Lk] scores. T5 does not
    scale by 1 / sqrt(head_dim): `scaling` is 1.0 and must be passed on, SDPA's default would apply it.

    Args:
        query: [B, heads, Lq, head_dim]; key, value: [B, heads, Lk, head_dim].
        attention_mask: additive float mask [B, 1, 1 or Lq, Lk] (eager's format: 0 or the dtype's minimum), or None.
        position_bias: [1 or B, heads, Lq, Lk], T5's relative position bias.

    Returns:
        ([B, Lq, heads, head_dim], None): no attention weights, as transformers' sdpa returns.
    """
    mask = position_bias if attention_mask is None else position_bias + attention_mask
    # Contiguous: the bias is a permuted embedding lookup whose last dimension has stride `heads`, and
    # SDPA's fused kernels need stride 1 there; otherwise it silently takes its math kernel, which makes
    # fp32 copies of the [B, heads, Lq, Lk] scores (as transformers 5.17's own sdpa path for T5 does).
    mask = mask.to(query.dtype).contiguous()
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _t5_mask(batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None,
             dtype: torch.dtype = torch.float32, **kwargs: Any) -> torch.Tensor | None:
    """T5's encoder mask for _t5_attention, registered with transformers' AttentionMaskInterface.

    What transformers' eager_mask gives a bidirectional encoder, 0 where a key may be attended and the
    dtype's minimum at padding, as [B, 1, 1, Lk] (it broadcasts over queries), without eager_mask's
    host-to-device copy of its 0.0 (older transformers), which CUDA-graph capture refuses.

    Args:
        attention_mask: [B, Lk] padding mask (1 keeps a token), or None (no padding: no mask).
    """
    if attention_mask is None:
        return None
    keep = attention_mask[:, None, None, :kv_length].bool()
    return torch.where(keep, torch.zeros((), device=keep.device, dtype=dtype), torch.finfo(dtype).min)


def _use_t5_attention(t5: Any) -> None:
    """Run `t5` (a transformers T5 model) with _t5_attention, under the name T5_ATTENTION."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(T5_ATTENTION, _t5_attention)
    # A padding mask in eager's additive format; unregistered names would get no mask at all.
    AttentionMaskInterface.register(T5_ATTENTION, _t5_mask)
    t5.set_attn_implementation(T5_ATTENTION)


class _T5Graph:
    """T5's forward at a fixed [batch, tokens] as one CUDA graph: a replay launches the ~1,000 kernels
    of T5-XXL's 24 layers at once, so encoding takes almost no host time and the image phase's thread
    gets the interpreter. The same kernels as eager (captured inside the contexts that pick them), so
    the same values; smaller batches run padded, other shapes eagerly. Installed as `t5.forward`, so
    FluxPipeline.encode_prompt calls it; it returns what T5EncoderModel does at index 0."""

    def __init__(self, t5: torch.nn.Module, batch: int, tokens: int):
        self.eager = t5.forward
        self.ids = torch.zeros(batch, tokens, dtype=torch.long, device=t5.device)
        side = torch.cuda.Stream(t5.device)  # warm-up (cuBLAS workspaces, allocations) off the capture
        side.wait_stream(torch.cuda.current_stream(t5.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.eager(self.ids, output_hidden_states=False)
        torch.cuda.current_stream(t5.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.eager(self.ids, output_hidden_states=False)[0]  # [batch, tokens, d_model]

    def __call__(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> tuple[torch.Tensor]:
        n = input_ids.shape[0]
        if output_hidden_states or n > self.ids.shape[0] or input_ids.shape[1] != self.ids.shape[1]:
            return self.eager(input_ids, output_hidden_states=output_hidden_states)
        self.ids[:n].copy_(input_ids)
        self.ids[n:].zero_()  # padding rows: T5 runs without a mask, so rows do not mix
        self.graph.replay()
        return (self.out[:n],)  # valid until the next replay, which the stream orders after its readers


def _graph_t5(pipe: Any, batch: int, tokens: int) -> None:
    """Run pipe's T5 as a _T5Graph on CUDA; eagerly (with a warning) where capture fails."""
    t5 = pipe.text_encoder_2
    if t5.device.type != "cuda":
        return
    from fluxlora.models import attention_backends

    try:
        with torch.inference_mode(), attention_backends(t5.device, cudnn=True):
            t5.forward = _T5Graph(t5, batch, tokens)
    except RuntimeError as err:
        logger.warning("T5 runs eagerly: capturing it as a CUDA graph failed (%s)", err)


def _load_text_pipeline(cfg: PrecomputeConfig, device: torch.device, max_sequence_length: int) -> Any:
    """FluxPipeline with only the tokenizers and text encoders (no transformer, no VAE); T5 runs
    _t5_attention, on CUDA as a graph of --text_batch_size x max_sequence_length tokens."""
    from diffusers import FluxPipeline

    try:
        pipe = FluxPipeline.from_pretrained(cfg.pretrained_model_name_or_path, transformer=None, vae=None,
                                            revision=cfg.revision, variant=cfg.variant,
                                            dtype=_compute_dtype(device))
    except (OSError, ValueError) as err:
        raise ConfigError("pretrained_model_name_or_path", f"cannot load the text encoders of "
                                                           f"{cfg.pretrained_model_name_or_path}: {err}") from err
    _use_t5_attention(pipe.text_encoder_2)
    pipe.to(device)
    _graph_t5(pipe, cfg.text_batch_size, max_sequence_length)
    return pipe


def _load_vae(cfg: PrecomputeConfig, device: torch.device) -> Any:
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="vae",
                                            revision=cfg.revision, variant=cfg.variant,
                                            dtype=_compute_dtype(device))
    except (OSError, ValueError) as err:
        raise ConfigError("pretrained_model_name_or_path", f"cannot load the VAE of "
                                                           f"{cfg.pretrained_model_name_or_path}: {err}") from err
    if device.type == "cuda":  # CUDA only: the CPU has no bf16 x bf16 -> fp32 bmm
        use_fp32_score_attention(vae)
    return vae.to(device).eval()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that shares no storage (mean/std are strided views of one moments tensor)."""
    return tensor.clone(memory_format=torch.contiguous_format)


@dataclass
class _HostCopy:
    """Device results on their way to the CPU: on CUDA, `tensors` are pinned buffers that a queued copy
    fills, and `done` is an event recorded after that copy (None where the copy finished on return)."""

    tensors: tuple[torch.Tensor, ...]  # each [B, ...] bf16
    done: torch.cuda.Event | None

    def rows(self) -> list[tuple[torch.Tensor, ...]]:
        """Per batch row, one owned tensor of each; waits for the copy."""
        if self.done is not None:
            self.done.synchronize()
        # Own contiguous copies: rows of one batch share storage, which safetensors refuses to save.
        return [tuple(_own(t[i]) for t in self.tensors) for i in range(len(self.tensors[0]))]


def _to_host(*tensors: torch.Tensor) -> _HostCopy:
    """Queue copies of device tensors to the CPU as bf16. A non-blocking copy lands in pinned memory in
    stream order right after the work that made them, so waiting for it later does not wait for work
    submitted after it: the host can submit the next batch first."""
    cuda = tensors[0].device.type == "cuda"
    copies = tuple(t.to("cpu", STORED_DTYPE, non_blocking=cuda) for t in tensors)
    done = None
    if cuda:
        done = torch.cuda.Event()
        done.record()
    return _HostCopy(copies, done)


@torch.inference_mode()
def encode_captions(pipe: Any, captions: Sequence[str], max_sequence_length: int,
                    batch_size: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """FluxPipeline.encode_prompt on `captions` in batches, moved to the CPU as bf16.

    Yields per batch, in order, per caption: (T5 last_hidden_state [max_sequence_length, d_model], CLIP
    pooler_output [hidden]). One batch behind the device: a batch is yielded once the next one is
    submitted, so tokenizing and storing overlap with the encoders.
    """
    # Imported here, like diffusers: a rerun that finds every shard finished loads neither.
    from fluxlora.models import attention_backends

    device = pipe.text_encoder.device
    pending: _HostCopy | None = None
    for start in range(0, len(captions), batch_size):
        batch = list(captions[start:start + batch_size])
        # cuDNN's kernel runs T5's biased attention ~10% faster than the memory-efficient one
        with attention_backends(device, cudnn=True):
            t5, pooled, _ = pipe.encode_prompt(prompt=batch, prompt_2=None, device=device,
                                               max_sequence_length=max_sequence_length)
        submitted = _to_host(t5, pooled)
        if pending is not None:
            yield pending.rows()
        pending = submitted
    if pending is not None:
        yield pending.rows()


@torch.inference_mode()
def encode_images(vae: Any, pixels: torch.Tensor) -> _HostCopy:
    """VAE posterior of a batch of same-size images, before FLUX's shift/scale, moved to the CPU as bf16.

    On CUDA this only queues the work (copy in, normalisation, VAE, copy out) and returns: the host
    can prepare and submit the next batch while the device runs this one.

    Args:
        pixels: uint8 [B, 3, H, W] on the CPU (buckets.image_to_pixels of RGB images).
    """
    cuda = vae.device.type == "cuda"
    # From pinned memory the copy to the device is queued on the stream instead of blocking the host.
    pixels = (pixels.pin_memory() if cuda else pixels).to(vae.device, non_blocking=cuda)
    dist = vae.encode(buckets.normalize_pixels(pixels, vae.dtype)).latent_dist
    return _to_host(dist.mean, dist.std)


@dataclass
class _ImageData:
    """A sample's image bytes and sample_id, or why there are none."""

    blob: bytes | None
    sample_id: str | None
    error: str | None


def _plan_image_shard(shard: _ImageShard) -> list[_ImageData]:
    """Read the shard's image bytes and set its plan digest (sources, sample ids, skips).

    The plan says what a finished shard must hold; an index with another plan (images or
    captions changed since) is not reused.
    """
    data = []
    for sample in shard.samples:
        item = _ImageData(None, None, None)
        if sample.caption is not None:
            try:
                item.blob = sample.raw.read_bytes()
                item.sample_id = sample_id(item.blob, sample.caption)
            except SkipSample as skip:
                item.error = skip.reason
        data.append(item)
    shard.plan = _digest([[s.raw.source, d.sample_id, s.skip_reason or d.error] for s, d in zip(shard.samples, data)])
    return data


@dataclass
class _Prepared:
    """One sample decoded and bucketed: per (resolution, flip), its entry, tensor key, bucket and pixels
    (buckets.image_to_pixels of the resized image: uint8 [3, height, width])."""

    crops: list[tuple[dict[str, Any], str, tuple[int, int], torch.Tensor]]
    skip: str | None = None
    resolution_skips: list[dict[str, Any]] | None = None


def _prepare(sample: _Sample, item: _ImageData, shard_name_: str, cfg: PrecomputeConfig,
             resolutions: list[int]) -> _Prepared:
    """Decode, bucket, (flip,) resize one image and take its pixels: host work, run on a thread pool (PIL
    releases the GIL while decoding and resampling) so that it overlaps with the VAE on the device."""
    source, sid = sample.raw.source, item.sample_id
    if item.blob is None or sid is None:  # no caption, or the bytes could not be read
        return _Prepared([], sample.skip_reason or item.error)
    try:
        image = load_image(item.blob, source)
    except SkipSample as skip:
        return _Prepared([], skip.reason)
    width, height = image.size
    crops, needed = [], []
    for resolution in resolutions:
        bucket = buckets.nearest_bucket(width, height, resolution, cfg.max_aspect)
        factor = buckets.upscale_factor(width, height, bucket)
        if factor > cfg.max_upscale:
            needed.append((resolution, bucket, factor))
            continue
        for flipped in ((False, True) if cfg.flip_copies else (False,)):
            # Flip the decoded image, then bucket it: the copy is exactly a mirrored image's encoding.
            pixels = buckets.image_to_pixels(
                buckets.resize_to_bucket(ImageOps.mirror(image) if flipped else image, bucket))
            entry = {"sample_id": sid, "caption_id": caption_id(sample.caption), "resolution": resolution,
                     "width": bucket[0], "height": bucket[1], "flipped": flipped, "shard": shard_name_,
                     "source": source}
            crops.append((entry, image_key(sid, resolution, flipped), bucket, pixels))
    if not crops:
        smallest = min(factor for _, _, factor in needed)
        return _Prepared([], f"{width}x{height} pixels would need {smallest:.2f}x upscaling even at the smallest "
                             f"resolution (> --max_upscale {cfg.max_upscale:g})")
    return _Prepared(crops, resolution_skips=[
        {"source": source, "resolution": res, "reason": f"{width}x{height} pixels would need {factor:.2f}x "
         f"upscaling to {b[0]}x{b[1]} (> --max_upscale {cfg.max_upscale:g})"} for res, b, factor in needed])


def _encode_image_shard(vae: Any, shard: _ImageShard, data: list[_ImageData], prepared: Iterable[_Prepared],
                        batch_size: int, progress: tqdm) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """VAE-encode one image shard from its samples' `data` and `prepared` images (both in the shard's
    order); returns its tensors and index."""
    tensors: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    skips: list[dict[str, str]] = []
    resolution_skips: list[dict[str, Any]] = []
    first_source: dict[str, str] = {}
    queues: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = defaultdict(list)
    submitted: tuple[list[str], _HostCopy] | None = None  # the last batch given to the VAE

    def store(keys: list[str], batch: _HostCopy) -> None:
        for key, (mean, std) in zip(keys, batch.rows()):
            tensors[f"{key}.mean"], tensors[f"{key}.std"] = mean, std

    def flush(size: tuple[int, int]) -> None:
        nonlocal submitted
        items = queues.pop(size)
        batch = encode_images(vae, torch.stack([pixels for _, pixels in items]))
        # The previous batch is stored only now, with this one queued behind it: the device runs this
        # batch while the host stores the last one and prepares the next. Batches are stored in
        # submission order, so timing cannot change the shard.
        if submitted is not None:
            store(*submitted)
        submitted = ([key for key, _ in items], batch)

    for sample, item, ready in zip(shard.samples, data, prepared):
        progress.update(1)
        source, sid = sample.raw.source, item.sample_id
        if ready.skip is not None:
            skips.append({"source": source, "reason": ready.skip})
            continue
        if sid in first_source:
            skips.append({"source": source, "reason": f"duplicate of {first_source[sid]} (same image and "
                                                      f"caption)"})
            continue
        first_source[sid] = source
        resolution_skips += ready.resolution_skips or []
        for entry, key, bucket, pixels in ready.crops:
            entries.append(entry)
            queues[bucket].append((key, pixels))
            if len(queues[bucket]) >= batch_size:
                flush(bucket)
    for size in sorted(queues):
        flush(size)
    if submitted is not None:
        store(*submitted)
    index = {"kind": "images", "index": shard.index, "plan": shard.plan, "samples": len(shard.samples),
             "entries": entries, "skips": skips, "resolution_skips": resolution_skips}
    return tensors, index


def _encode_text_shard(pipe: Any, shard: _TextShard, cfg: PrecomputeConfig, max_sequence_length: int,
                       progress: tqdm) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    ids = list(shard.captions)
    encoded = encode_captions(pipe, [shard.captions[c] for c in ids], max_sequence_length, cfg.text_batch_size)
    for start, rows in zip(range(0, len(ids), cfg.text_batch_size), encoded):
        for cid, (t5, pooled) in zip(ids[start:start + cfg.text_batch_size], rows):
            t5_key, clip_key = text_keys(cid)
            tensors[t5_key], tensors[clip_key] = t5, pooled
        progress.update(len(rows))
    return tensors, {"kind": "text", "index": shard.index, "plan": shard.plan, "captions": shard.captions}


def _merge(out_dir: Path, cfg: PrecomputeConfig, fingerprint: dict[str, Any], vae_config: dict[str, Any],
           text_shards: list[_TextShard], image_shards: list[_ImageShard], validation: list[str],
           samples: int) -> dict[str, Any]:
    """The manifest from every shard's index (all shards are finished when this runs)."""
    shards: dict[str, dict[str, Any]] = {}
    texts: dict[str, dict[str, str]] = {}
    images: list[dict[str, Any]] = []
    skips: list[dict[str, str]] = []
    resolution_skips: list[dict[str, Any]] = []
    first_source: dict[str, str] = {}

    def load(name: str) -> dict[str, Any]:
        index = json.loads((out_dir / index_name(name)).read_text())
        shards[name] = {"sha256": index["sha256"], "size": index["size"]}
        return index

    for text_shard in text_shards:
        texts.update({cid: {"shard": text_shard.name, "caption": caption}
                      for cid, caption in load(text_shard.name)["captions"].items()})
    for image_shard in image_shards:
        index = load(image_shard.name)
        skips += index["skips"]
        resolution_skips += index["resolution_skips"]
        by_sample: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for entry in index["entries"]:
            by_sample[entry["sample_id"]].append(entry)
        for sid, entries in by_sample.items():  # dicts keep insertion (= listing) order
            source = entries[0]["source"]
            if sid in first_source:  # the same image and caption in an earlier shard
                skips.append({"source": source, "reason": f"duplicate of {first_source[sid]} (same image and caption)"})
                continue
            first_source[sid] = source
            images += entries
    per_resolution = Counter(e["resolution"] for e in images)
    per_bucket: dict[int, Counter] = defaultdict(Counter)
    for e in images:
        per_bucket[e["resolution"]][f"{e['width']}x{e['height']}"] += 1
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "args": asdict(cfg),
        "vae_scaling_factor": float(vae_config["scaling_factor"]),
        "vae_shift_factor": float(vae_config["shift_factor"]),
        "max_sequence_length": fingerprint["max_sequence_length"],
        "empty_caption_id": caption_id(""),
        "validation": [[prompt, caption_id(prompt)] for prompt in validation],
        "texts": texts,
        "images": images,
        "shards": shards,
        "skips": skips,
        "resolution_skips": resolution_skips,
        "counts": {
            "samples": samples,
            "images": len(first_source),
            "entries": len(images),
            "captions": len(texts),
            "skipped": len(skips),
            # JSON keys are strings: resolutions as "512", buckets as "WxH".
            "per_resolution": {str(res): n for res, n in sorted(per_resolution.items())},
            "per_bucket": {str(res): dict(sorted(c.items())) for res, c in sorted(per_bucket.items())},
            "resolution_skips": dict(Counter(str(s["resolution"]) for s in resolution_skips)),
        },
    }


def format_summary(manifest: dict[str, Any], out_dir: Path) -> str:
    """Human-readable summary: images, entries per resolution and bucket, skips with reasons."""
    counts = manifest["counts"]
    lines = [(f"Cached {counts['images']} of {counts['samples']} images ({counts['entries']} entries) and "
              f"{counts['captions']} captions in {out_dir}")]
    for res, n in counts["per_resolution"].items():
        bucket_counts = ", ".join(f"{b}: {c}" for b, c in counts["per_bucket"][res].items())
        skipped = counts["resolution_skips"].get(res, 0)
        lines.append(f"  {res}: {n} entries ({bucket_counts})"
                     + (f"; {skipped} images not cached at this resolution (would need more than "
                        f"--max_upscale {manifest['fingerprint']['max_upscale']:g}x upscaling)" if skipped else ""))
    if manifest["skips"]:
        lines.append(f"Skipped {len(manifest['skips'])} images:")
        lines += [f"  {s['source']}: {s['reason']}" for s in manifest["skips"]]
    return "\n".join(lines)


def _remove_stale(out_dir: Path, keep: set[str]) -> int:
    """Delete shard files of other fingerprints or past plans and leftover temporary files."""
    removed = 0
    for file in out_dir.iterdir():
        stale_shard = _SHARD_FILE.match(file.name) and file.name not in keep
        leftover_tmp = file.name.startswith(".") and file.name.endswith(TMP_SUFFIX)
        if file.is_file() and (stale_shard or leftover_tmp):
            file.unlink()
            removed += 1
    return removed


class _QuietTruncation(logging.Filter):
    """Drops FluxPipeline's truncation warnings: one per batch, quoting the cut-off text of every caption in
    it, padding included. The text phase reports counts once instead (truncation_report)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "was truncated because" not in str(record.msg)


@contextlib.contextmanager
def _quiet_truncation_warnings() -> Iterator[None]:
    """Meanwhile, FluxPipeline's truncation warnings are dropped (_QuietTruncation)."""
    flux_logger, quiet = logging.getLogger(FLUX_PIPELINE_LOGGER), _QuietTruncation()
    flux_logger.addFilter(quiet)
    try:
        yield
    finally:
        flux_logger.removeFilter(quiet)


def truncation_report(pipe: Any, captions: Sequence[str], max_sequence_length: int) -> list[str]:
    """Lines on the captions that FluxPipeline.encode_prompt cuts: at CLIP's 77 tokens (expected for long
    captions: only CLIP's pooled embedding is cut) and at max_sequence_length T5 tokens (the end of the
    caption is lost)."""
    lines, total = [], len(captions)
    clip = sum(len(ids) > pipe.tokenizer_max_length for ids in pipe.tokenizer(list(captions), verbose=False).input_ids)
    t5 = sum(len(ids) > max_sequence_length for ids in pipe.tokenizer_2(list(captions), verbose=False).input_ids)
    if clip:
        lines.append(f"{clip} of {total} captions are longer than CLIP's {pipe.tokenizer_max_length} tokens: "
                     f"CLIP's pooled embedding sees their start, as FluxPipeline's does (T5 reads up to "
                     f"{max_sequence_length} tokens)")
    if t5:
        lines.append(f"{t5} of {total} captions are longer than --max_sequence_length {max_sequence_length} T5 "
                     f"tokens and were cut there, as FluxPipeline cuts them: shorten them, or raise "
                     f"--max_sequence_length (FLUX.1-dev takes up to 512)")
    return lines


def _text_phase(cfg: PrecomputeConfig, device: torch.device, shards: list[_TextShard], out_dir: Path,
                max_sequence_length: int, show: bool, pipe: Any, separate_stream: bool = False) -> list[str]:
    """Encode and write the text shards with `pipe` (then freed); their names. `separate_stream`: on
    a CUDA stream of its own, for running on a thread beside the image phase."""
    if not shards:
        return []
    stream = torch.cuda.Stream(device) if separate_stream and device.type == "cuda" else None
    if stream:
        stream.wait_stream(torch.cuda.current_stream(device))  # the weights' upload
    written = []
    with _quiet_truncation_warnings(), torch.cuda.stream(stream) if stream else contextlib.nullcontext():
        with tqdm(total=sum(len(s.captions) for s in shards), unit="caption", desc="T5+CLIP",
                  disable=not show) as progress, _ShardWriter(out_dir) as writer:
            for shard in shards:
                tensors, index = _encode_text_shard(pipe, shard, cfg, max_sequence_length, progress)
                writer.write(shard.name, tensors, index)
                written.append(shard.name)
        for line in truncation_report(pipe, [c for s in shards for c in s.captions.values()], max_sequence_length):
            logger.warning(line)
        del pipe
        _free(device)
    return written


def _image_phase(cfg: PrecomputeConfig, device: torch.device, shards: list[_ImageShard], out_dir: Path,
                 resolutions: list[int], show: bool, vae: Any, bar_position: int = 0) -> list[str]:
    """Encode and write the image shards with `vae` (then freed); their names."""
    if not shards:
        return []
    written = []
    with ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="decode") as pool, \
            tqdm(total=sum(len(s.samples) for s in shards), unit="img", desc="VAE", disable=not show,
                 position=bar_position) as progress, _ShardWriter(out_dir) as writer:

        def decode(shard: _ImageShard) -> tuple[list[_ImageData], list[Future[_Prepared]]]:
            """Read the shard's bytes and queue its images for decoding, after any queued before."""
            data = _plan_image_shard(shard)
            return data, [pool.submit(_prepare, sample, item, shard.name, cfg, resolutions)
                          for sample, item in zip(shard.samples, data)]

        ahead = decode(shards[0])
        for k, shard in enumerate(shards):
            data, futures = ahead
            # The next shard decodes behind this one (two shards' images in memory at most), so the VAE
            # does not wait at a shard's start for its first full bucket.
            if k + 1 < len(shards):
                ahead = decode(shards[k + 1])
            # Taken in the listing's order, so the shard's contents do not depend on thread timing.
            prepared = (future.result() for future in futures)
            tensors, index = _encode_image_shard(vae, shard, data, prepared, cfg.vae_batch_size, progress)
            writer.write(shard.name, tensors, index)
            written.append(shard.name)
    del vae
    _free(device)
    return written


def run(cfg: PrecomputeConfig, accelerator: Accelerator) -> PrecomputeResult:
    """Build (or finish) the cache at cfg.embeddings_dir; call on every process.

    Returns:
        This process's PrecomputeResult; the manifest and summary on the main process.

    Raises:
        ConfigError: --pretrained_model_name_or_path or --resolutions is unusable.
        PrecomputeError: --dataset cannot be read; or --strict and some samples were skipped (main
            process; the manifest is then not written).
    """
    out_dir = Path(cfg.embeddings_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    vae_config, transformer_config = model_configs(cfg)
    max_sequence_length = resolve_max_sequence_length(cfg, transformer_config)
    fingerprint = make_fingerprint(cfg, max_sequence_length)
    fp_hash = fingerprint_hash(fingerprint)
    resolutions = fingerprint["resolutions"]
    for resolution in resolutions:  # fails here, before any model loads, on resolutions buckets refuse
        try:
            buckets.bucket_table(resolution, cfg.max_aspect)
        except ValueError as err:
            raise ConfigError("resolutions", str(err)) from err

    samples = list_samples(resolve_dataset(cfg, accelerator), cfg)
    validation = read_validation_prompts(cfg)
    captions = {caption_id(s.caption): s.caption for s in samples if s.caption is not None}
    captions.update({caption_id(text): text for text in ["", *validation]})
    sorted_captions = sorted(captions.items())
    text_shards = [_TextShard(k, shard_name("text", k, fp_hash), dict(chunk))
                   for k, chunk in _chunks(sorted_captions, cfg.shard_size)]
    for shard in text_shards:
        shard.plan = _digest(sorted(shard.captions.items()))
    image_shards = [_ImageShard(k, shard_name("images", k, fp_hash), list(chunk))
                    for k, chunk in _chunks(samples, cfg.shard_size)]

    rank, world = accelerator.process_index, accelerator.num_processes
    written: list[str] = []
    reused: list[str] = []
    pending_text: list[_TextShard] = []
    for shard in text_shards[rank::world]:
        if _read_index(out_dir, shard.name, shard.plan):
            reused.append(shard.name)
        else:
            pending_text.append(shard)
    pending_images: list[_ImageShard] = []
    for shard in image_shards[rank::world]:
        _plan_image_shard(shard)  # the bytes are read again when encoding: never all in memory at once
        if _read_index(out_dir, shard.name, shard.plan):
            reused.append(shard.name)
        else:
            pending_images.append(shard)
    if pending_text or pending_images:
        # The old manifest would describe shards about to be replaced; it returns when all are done.
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

    device, show = accelerator.device, accelerator.is_main_process
    text_phase = functools.partial(_text_phase, cfg, device, pending_text, out_dir, max_sequence_length, show)
    image_phase = functools.partial(_image_phase, cfg, device, pending_images, out_dir, resolutions, show)
    if cfg.sequential_models:  # one model in memory at a time: the text encoders, then the VAE
        written += text_phase(_load_text_pipeline(cfg, device, max_sequence_length) if pending_text else None)
        written += image_phase(_load_vae(cfg, device) if pending_images else None)
    else:
        # T5 (matmul-bound) and the VAE (convolutions, host-side decoding) share the GPU better than
        # they use it one after the other: the captions are encoded on a thread with a CUDA stream of
        # its own. Both models load first, here (loading sets process-wide defaults such as the dtype).
        pipe = _load_text_pipeline(cfg, device, max_sequence_length) if pending_text else None
        vae = _load_vae(cfg, device) if pending_images else None
        with ThreadPoolExecutor(1, thread_name_prefix="text") as text_thread:
            text = text_thread.submit(text_phase, pipe, separate_stream=True)
            del pipe  # the phases free their model when done
            images = image_phase(vae, bar_position=1)
            del vae
            written += text.result() + images

    accelerator.wait_for_everyone()
    manifest = summary = None
    failure = None
    if accelerator.is_main_process:
        manifest = _merge(out_dir, cfg, fingerprint, vae_config, text_shards, image_shards, validation, len(samples))
        summary = format_summary(manifest, out_dir)
        print(summary, flush=True)
        if cfg.strict and manifest["skips"]:
            (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # from an earlier, non-strict build
            failure = (f"--strict: {len(manifest['skips'])} images were skipped, so no {MANIFEST_NAME} was written "
                       f"to {out_dir} (finished shards are kept; fix or remove these and rerun):\n"
                       + "\n".join(f"  {s['source']}: {s['reason']}" for s in manifest["skips"]))
        else:
            write_atomic(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
            keep = set(manifest["shards"]) | {index_name(name) for name in manifest["shards"]}
            removed = _remove_stale(out_dir, keep)
            if removed:
                print(f"Removed {removed} files of earlier builds or interrupted writes from {out_dir}", flush=True)
    accelerator.wait_for_everyone()
    if failure:
        raise PrecomputeError(failure)
    return PrecomputeResult(written=written, reused=reused, manifest=manifest, summary=summary)
