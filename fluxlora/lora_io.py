"""Reading, writing and converting FLUX.1 LoRA files.

Two layouts exist for the same LoRA:

* diffusers (also ai-toolkit's): one LoRA per diffusers `nn.Linear`, keys
  `transformer.<module path>.lora_A.weight` / `.lora_B.weight`. Rank and alpha live in the
  safetensors header under diffusers' `lora_adapter_metadata` key (the PEFT `LoraConfig`), so
  `FluxPipeline.load_lora_weights` rebuilds the same scale `alpha / rank`.
* kohya sd-scripts (also what ComfyUI/Forge load natively): one LoRA per module of Black Forest
  Labs' original model, keys `lora_unet_<bfl path with _>.lora_down.weight` / `.lora_up.weight` /
  `.alpha`. BFL fuses q/k/v (and, in single blocks, the MLP input) into one linear layer, so
  several diffusers LoRAs become one kohya LoRA: `lora_down` is their `lora_A`s stacked along
  the rank and `lora_up` is block diagonal. That is exact, and the fused module's alpha is set so
  that `alpha / rank` per path is unchanged.

Internally both are parsed into one form, {diffusers module path: (lora_A, lora_B, scale)} with
the module's update `scale * lora_B @ lora_A`, and written out from it, so every conversion goes
through the same tables of module names.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch
from accelerate.utils import extract_model_from_parallel
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.loaders.lora_conversion_utils import swap_scale_shift
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.other import get_pattern_key
from torch.distributed.tensor import DTensor

from .config import LORA_FORMATS, LoraFormat

logger = logging.getLogger(__name__)

TRANSFORMER_PREFIX = "transformer."
"""Key prefix of the transformer's LoRA in diffusers' pipeline-level files."""

METADATA_NAMESPACE = "fluxlora."
"""Prefix of this toolkit's own entries in the safetensors header (base model, steps, ...)."""

KOHYA_PREFIX = "lora_unet_"

# Wrappers that add a path segment to parameter names: DDP/DataParallel (`module.`), PEFT's
# PeftModel (`base_model.model.`) and torch.compile (`_orig_mod.`, also inside the path when
# single blocks were compiled).
_LEADING_WRAPPERS = ("module.", "base_model.model.")
_COMPILE_SEGMENT = "_orig_mod."

# diffusers module (relative to a double block) -> BFL module of `double_blocks.{i}`.
_DOUBLE_BLOCK: dict[str, str] = {
    "attn.to_out.0": "img_attn_proj",
    "ff.net.0.proj": "img_mlp_0",
    "ff.net.2": "img_mlp_2",
    "norm1.linear": "img_mod_lin",
    "attn.to_add_out": "txt_attn_proj",
    "ff_context.net.0.proj": "txt_mlp_0",
    "ff_context.net.2": "txt_mlp_2",
    "norm1_context.linear": "txt_mod_lin",
}
_SINGLE_BLOCK: dict[str, str] = {
    "proj_out": "linear2",
    "norm.linear": "modulation_lin",
}
_GLOBAL: dict[str, str] = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "proj_out": "final_layer_linear",
    "norm_out.linear": "final_layer_adaLN_modulation_1",
}
# BFL's final modulation emits (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift):
# the LoRA's output rows are swapped, exactly as diffusers' checkpoint converter does.
_SWAPPED_HALVES = {"final_layer_adaLN_modulation_1"}

# Fused BFL modules: their diffusers parts in BFL's row order, and each part's output width as a
# multiple of the hidden size D (FLUX's inner dim equals D and its MLP ratio is 4).
_DOUBLE_FUSED: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "img_attn_qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), (1, 1, 1)),
    "txt_attn_qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (1, 1, 1)),
}
_SINGLE_FUSED: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (1, 1, 1, 4)),
}

_BLOCK_PATH = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_KOHYA_BLOCK = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_MAX_LISTED = 10


class _Lora(NamedTuple):
    """One module's LoRA: its weight update is `scale * up @ down`."""

    down: torch.Tensor  # diffusers lora_A, kohya lora_down: (rank, in_features)
    up: torch.Tensor  # diffusers lora_B, kohya lora_up: (out_features, rank)
    scale: float


# diffusers module path (without the `transformer.` prefix) -> its LoRA.
_Modules = dict[str, _Lora]


# --------------------------------------------------------------------------------------------
# Saving from a model
# --------------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare transformer inside DDP/DataParallel/torch.compile wrappers."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def _clean_key(key: str) -> str:
    """A parameter name without the path segments that model wrappers add."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LEADING_WRAPPERS:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key.replace(_COMPILE_SEGMENT, "")


def _adapter_config(model: torch.nn.Module, adapter_name: str) -> LoraConfig:
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        have = ", ".join(configs) or "none"
        raise ValueError(
            f"The transformer has no LoRA adapter named {adapter_name!r} (adapters: {have}); "
            "add one with transformer.add_adapter(LoraConfig(...)) before saving."
        )
    return configs[adapter_name]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a `DTensor`; a collective: every process must call
    it, in the same order), or `tensor` itself when it is not sharded."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def lora_state_dict(
    transformer: torch.nn.Module, *, dtype: torch.dtype = torch.bfloat16, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """The transformer's LoRA weights in diffusers' file layout.

    Keys are `transformer.<module path>.lora_A.weight` / `.lora_B.weight`, exactly what
    `FluxPipeline.save_lora_weights(transformer_lora_layers=get_peft_model_state_dict(t))` writes,
    with any `module.`, `_orig_mod.` or `base_model.model.` segments removed. Tensors are fresh
    contiguous CPU copies in `dtype` (bf16 by default: half the size of fp32, as kohya and
    ai-toolkit save; pass torch.float32 to keep full training precision). Under FSDP they are
    gathered from the shards: every process must call this.
    """
    model = _unwrap(transformer)
    _adapter_config(model, adapter_name)
    peft_sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {
        TRANSFORMER_PREFIX + _clean_key(key): full_tensor(value.detach()).to("cpu", dtype, copy=True).contiguous()
        for key, value in peft_sd.items()
    }


def _adapter_metadata_header(config: LoraConfig) -> str:
    """The LoraConfig as diffusers' `write_lora_layers` stores it: JSON, keys `transformer.<field>`."""
    fields = {key: list(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    return json.dumps({TRANSFORMER_PREFIX + key: value for key, value in fields.items()}, indent=2, sort_keys=True)


def _namespaced(metadata: Mapping[str, str] | None) -> dict[str, str]:
    out = {}
    for key, value in (metadata or {}).items():
        if not isinstance(value, str):
            raise TypeError(
                f"LoRA file metadata values must be strings (safetensors headers hold only strings); "
                f"{key!r} is {type(value).__name__}: convert it with str() or json.dumps() first."
            )
        out[key if key.startswith(METADATA_NAMESPACE) else METADATA_NAMESPACE + key] = value
    return out


def _atomic_save(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file so that `path` is either the old file or the complete new one.

    The data goes to a temporary file in the same folder (same file system, so the rename is
    atomic), is fsynced, and only then renamed over `path`; the folder is fsynced so the rename
    itself survives a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialised here and written with open() rather than by save_file or mkstemp, which create
    # 0600 files (safetensors 0.8 does): the mode would survive the rename.
    data = safetensors.torch.save(state_dict, metadata={"format": "pt", **metadata})
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # directories cannot be opened for fsync on Windows
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def save_lora(
    path: str | Path,
    transformer: torch.nn.Module,
    *,
    dtype: torch.dtype = torch.bfloat16,
    metadata: Mapping[str, str] | None = None,
    adapter_name: str = "default",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save the transformer's LoRA as one diffusers-format `.safetensors` file, atomically.

    `state_dict`: the tensors, when `lora_state_dict` has already gathered them (under FSDP every
    process gathers, one writes).

    The header carries the adapter's LoraConfig under diffusers' `lora_adapter_metadata` key (so
    `FluxPipeline.load_lora_weights` restores rank, alpha and target modules) and `metadata`
    (base model, steps, trigger phrase, ...) with each key put under the `fluxlora.` namespace.
    A killed process leaves either the previous file or the new one under `path`, never a part.

    Returns:
        `path` as a Path.
    """
    config = _adapter_config(_unwrap(transformer), adapter_name)
    if state_dict is None:
        state_dict = lora_state_dict(transformer, dtype=dtype, adapter_name=adapter_name)
    header = {LORA_ADAPTER_METADATA_KEY: _adapter_metadata_header(config), **_namespaced(metadata)}
    return _atomic_save(state_dict, path, header)


# --------------------------------------------------------------------------------------------
# Reading and parsing files
# --------------------------------------------------------------------------------------------


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors (on CPU) and its safetensors header metadata (empty if none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist.")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
        state_dict = safetensors.torch.load_file(path)
    except safetensors.SafetensorError as err:
        raise ValueError(f"{path} is not a readable .safetensors LoRA file: {err}") from err
    return state_dict, metadata


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> LoraFormat:
    """"kohya" for `lora_unet_*` keys, "diffusers" for `*.lora_A/B.weight` keys."""
    if any(key.startswith(KOHYA_PREFIX) for key in state_dict):
        return "kohya"
    if any(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in state_dict):
        return "diffusers"
    raise ValueError(
        "Not a FLUX LoRA in diffusers format (keys `transformer.<module>.lora_A.weight`) or kohya "
        f"format (keys `lora_unet_<module>.lora_down.weight`); its keys:{_listing(state_dict)}"
    )


def _listing(keys) -> str:
    keys = list(keys)
    shown = "\n  ".join(keys[:_MAX_LISTED])
    more = f"\n  ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def _adapter_scales(adapter_metadata: str | None, ranks: Mapping[str, int]) -> dict[str, float]:
    """Each module's `scale` under the LoraConfig stored in a diffusers file header.

    Follows PEFT's rules (LoraModel._create_and_replace / LoraLayer.update_layer): rank and alpha
    patterns override `r` / `lora_alpha`, and rsLoRA divides by sqrt(r) instead of r. Without
    metadata diffusers loads with alpha = rank, i.e. scale 1.
    """
    if not adapter_metadata:
        return dict.fromkeys(ranks, 1.0)
    fields = json.loads(adapter_metadata)
    prefix = TRANSFORMER_PREFIX
    config = {key.removeprefix(prefix): value for key, value in fields.items() if key.startswith(prefix)}
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    scales = {}
    for module, actual_rank in ranks.items():
        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", actual_rank))
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", rank))
        scales[module] = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return scales


def _parse_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    alphas: float | Mapping[str, float] | None = None,
    adapter_metadata: str | None = None,
) -> _Modules:
    """diffusers-format keys -> modules. Scale per module from `alphas` (alpha / rank), else from
    `<module>.alpha` keys, else from the file's adapter metadata, else 1."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        clean = _clean_key(key).removeprefix(TRANSFORMER_PREFIX)
        for suffix, slot in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha")):
            if clean.endswith(suffix):
                parts.setdefault(clean[: -len(suffix)], {})[slot] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            "Unsupported keys in a diffusers-format LoRA (only lora_A/lora_B weights and alphas are "
            f"supported; DoRA magnitudes and LoRA biases are not):{_listing(unknown)}"
        )
    incomplete = [module for module, slots in parts.items() if not {"down", "up"} <= slots.keys()]
    if incomplete:
        raise ValueError(f"LoRA modules missing their lora_A or lora_B weight:{_listing(incomplete)}")

    ranks = {module: slots["down"].shape[0] for module, slots in parts.items()}
    metadata_scales = _adapter_scales(adapter_metadata, ranks)
    modules: _Modules = {}
    for module, slots in parts.items():
        if alphas is not None:
            alpha = alphas if isinstance(alphas, (int, float)) else alphas[module]
            scale = alpha / ranks[module]
        elif "alpha" in slots:
            scale = slots["alpha"].item() / ranks[module]
        else:
            scale = metadata_scales[module]
        modules[module] = _Lora(slots["down"], slots["up"], scale)
    return modules


def _fused_dims(hidden: int, multiples: tuple[int, ...]) -> list[int]:
    return [hidden * m for m in multiples]


def _split_fused(down: torch.Tensor, up: torch.Tensor, dims: list[int]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Undo a fused LoRA: [(part index, down, up)] whose updates add up to `up @ down`.

    A fused LoRA written by stacking per-part LoRAs has a block-structured `up`: part j's rows are
    nonzero only in part j's rank columns and absent parts' rows are zero. The largest set of parts
    (in order, equal ranks) whose blocks explain every nonzero entry is split off exactly. A LoRA
    trained fused (dense `up`) has no such structure: each part then gets the whole `down` and its
    own rows of `up`, which is still exact (as kohya's and diffusers' converters do).
    """
    rank = down.shape[0]
    starts = list(itertools.accumulate([0, *dims]))
    nonzero = up != 0
    n = len(dims)
    for size in range(n, 0, -1):
        if rank % size:
            continue
        part_rank = rank // size
        for subset in itertools.combinations(range(n), size):
            allowed = torch.zeros_like(nonzero)
            for t, j in enumerate(subset):
                allowed[starts[j] : starts[j + 1], t * part_rank : (t + 1) * part_rank] = True
            if not (nonzero & ~allowed).any():
                return [
                    (
                        j,
                        down[t * part_rank : (t + 1) * part_rank].clone(),
                        up[starts[j] : starts[j + 1], t * part_rank : (t + 1) * part_rank].clone(),
                    )
                    for t, j in enumerate(subset)
                ]
    return [(j, down.clone(), up[starts[j] : starts[j + 1]].clone()) for j in range(n)]


def _kohya_to_diffusers_module(name: str) -> tuple[str | None, tuple[str, ...] | None, tuple[int, ...] | None]:
    """A kohya module name (without `lora_unet_`) -> (diffusers path, None, None) for a plain
    module, (block prefix, parts, width multiples) for a fused one, (None, None, None) if unknown."""
    match = _KOHYA_BLOCK.match(name)
    if match:
        kind, index, rest = match.groups()
        block = f"{'transformer_blocks' if kind == 'double_blocks' else 'single_transformer_blocks'}.{index}"
        plain, fused = (_DOUBLE_BLOCK, _DOUBLE_FUSED) if kind == "double_blocks" else (_SINGLE_BLOCK, _SINGLE_FUSED)
        if rest in fused:
            return block, *fused[rest]
        for diffusers_name, kohya_name in plain.items():
            if kohya_name == rest:
                return f"{block}.{diffusers_name}", None, None
        return None, None, None
    for diffusers_name, kohya_name in _GLOBAL.items():
        if kohya_name == name:
            return diffusers_name, None, None
    return None, None, None


def _parse_kohya(state_dict: Mapping[str, torch.Tensor]) -> _Modules:
    """kohya-format keys -> modules, splitting fused q/k/v(/mlp) LoRAs back into diffusers parts."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        suffix = next((s for s in _KOHYA_SUFFIXES if key.endswith(s)), None)
        if not key.startswith(KOHYA_PREFIX) or suffix is None:
            unknown.append(key)
            continue
        groups.setdefault(key[len(KOHYA_PREFIX) : -len(suffix)], {})[suffix] = value

    modules: _Modules = {}
    for name, slots in groups.items():
        target, parts, multiples = _kohya_to_diffusers_module(name)
        if target is None:
            unknown.extend(KOHYA_PREFIX + name + suffix for suffix in slots)
            continue
        if ".lora_down.weight" not in slots or ".lora_up.weight" not in slots:
            raise ValueError(f"kohya LoRA module {KOHYA_PREFIX}{name} lacks its lora_down or lora_up weight.")
        down, up = slots[".lora_down.weight"], slots[".lora_up.weight"]
        rank = down.shape[0]
        # kohya's default when a file has no alpha is alpha = rank (scale 1).
        scale = slots[".alpha"].item() / rank if ".alpha" in slots else 1.0
        if parts is None:
            if name in _SWAPPED_HALVES:
                up = swap_scale_shift(up)
            modules[target] = _Lora(down, up, scale)
            continue
        dims = _fused_dims(down.shape[1], multiples)
        if up.shape[0] != sum(dims):
            raise ValueError(
                f"kohya LoRA module {KOHYA_PREFIX}{name} has lora_up of {up.shape[0]} rows; a FLUX.1 "
                f"transformer with hidden size {down.shape[1]} needs {sum(dims)} ({'+'.join(map(str, dims))})."
            )
        for j, part_down, part_up in _split_fused(down, up, dims):
            modules[f"{target}.{parts[j]}"] = _Lora(part_down, part_up, scale)
    if unknown:
        raise ValueError(
            "kohya-format LoRA keys with no FLUX.1 transformer module (text-encoder LoRAs and other "
            f"models' LoRAs are not supported):{_listing(unknown)}"
        )
    return modules


def _parse(state_dict: Mapping[str, torch.Tensor], adapter_metadata: str | None = None) -> _Modules:
    if detect_format(state_dict) == "kohya":
        return _parse_kohya(state_dict)
    return _parse_diffusers(state_dict, adapter_metadata=adapter_metadata)


# --------------------------------------------------------------------------------------------
# Writing state dicts
# --------------------------------------------------------------------------------------------


def _bake(lora: _Lora) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with the scale folded in, split between them as kohya's converter does."""
    if lora.scale == 1.0:
        return lora.down, lora.up
    scale_down, scale_up = lora.scale, 1.0
    while scale_down * 2 < scale_up:
        scale_down *= 2
        scale_up /= 2
    return (
        (lora.down.float() * scale_down).to(lora.down.dtype),
        (lora.up.float() * scale_up).to(lora.up.dtype),
    )


def _emit_diffusers(modules: _Modules) -> dict[str, torch.Tensor]:
    """Diffusers keys with every scale folded into the weights (diffusers then loads with alpha =
    rank, which is what it does for files without adapter metadata)."""
    out = {}
    for module, lora in modules.items():
        down, up = _bake(lora)
        out[f"{TRANSFORMER_PREFIX}{module}.lora_A.weight"] = down
        out[f"{TRANSFORMER_PREFIX}{module}.lora_B.weight"] = up
    return out


def _kohya_name(module: str) -> tuple[str, int | None, tuple[int, ...] | None]:
    """A diffusers module path -> (kohya name, None, None), or for a part of a fused kohya module
    (kohya name, the part's index, the parts' width multiples)."""
    match = _BLOCK_PATH.match(module)
    if match:
        kind, index, rest = match.groups()
        double = kind == "transformer_blocks"
        plain, fused = (_DOUBLE_BLOCK, _DOUBLE_FUSED) if double else (_SINGLE_BLOCK, _SINGLE_FUSED)
        block = f"{KOHYA_PREFIX}{'double_blocks' if double else 'single_blocks'}_{index}_"
        if rest in plain:
            return block + plain[rest], None, None
        for fused_name, (parts, multiples) in fused.items():
            if rest in parts:
                return block + fused_name, parts.index(rest), multiples
    elif module in _GLOBAL:
        return KOHYA_PREFIX + _GLOBAL[module], None, None
    raise ValueError(
        f"LoRA module {module!r} has no counterpart in kohya's FLUX.1 format; keep this LoRA in "
        "diffusers format or train without that module in --target_modules."
    )


def _emit_kohya(modules: _Modules) -> dict[str, torch.Tensor]:
    """kohya keys; q/k/v(/mlp) parts fused into one LoRA of stacked rank with a block-diagonal up."""
    plain: dict[str, _Lora] = {}
    fused: dict[str, tuple[tuple[int, ...], dict[int, _Lora]]] = {}
    for module, lora in modules.items():
        name, index, multiples = _kohya_name(module)
        if index is None:
            plain[name] = lora
        else:
            fused.setdefault(name, (multiples, {}))[1][index] = lora

    out: dict[str, torch.Tensor] = {}

    def put(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        # fp32: bf16 would round e.g. alpha 30.3 (3 x 10.1) to 30.25, and loaders call .item() anyway.
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)

    for name, lora in plain.items():
        up = swap_scale_shift(lora.up) if name.removeprefix(KOHYA_PREFIX) in _SWAPPED_HALVES else lora.up
        put(name, lora.down, up, lora.scale * lora.down.shape[0])

    for name, (multiples, by_index) in fused.items():
        ordered = sorted(by_index.items())
        first = ordered[0][1]
        hidden = first.down.shape[1]
        dims = _fused_dims(hidden, multiples)
        starts = list(itertools.accumulate([0, *dims]))
        total_rank = sum(lora.down.shape[0] for _, lora in ordered)
        # Absent parts (e.g. proj_mlp when only attention was trained) keep zero rows.
        up = first.up.new_zeros(sum(dims), total_rank)
        column = 0
        for j, lora in ordered:
            if lora.down.shape[1] != hidden or lora.up.shape[0] != dims[j]:
                raise ValueError(
                    f"LoRA part {j} of {name} has shapes {tuple(lora.down.shape)}/{tuple(lora.up.shape)}, "
                    f"not those of a FLUX.1 transformer with hidden size {hidden}."
                )
            rank = lora.down.shape[0]
            # One alpha per fused module: parts whose scale differs from the first carry the
            # ratio in their block of `up` (1.0 for a uniform LoraConfig, so nothing changes).
            ratio = lora.scale / first.scale
            block = lora.up if ratio == 1.0 else (lora.up.float() * ratio).to(lora.up.dtype)
            up[starts[j] : starts[j + 1], column : column + rank] = block
            column += rank
        down = torch.cat([lora.down for _, lora in ordered], dim=0)
        put(name, down, up, first.scale * total_rank)
    return out


# --------------------------------------------------------------------------------------------
# Public conversions
# --------------------------------------------------------------------------------------------


def to_kohya(
    state_dict: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float] | None = None
) -> dict[str, torch.Tensor]:
    """Convert a diffusers-format FLUX LoRA state dict to kohya sd-scripts' FLUX format.

    Mirrors kohya's networks/convert_flux_lora.py (ai-toolkit -> sd-scripts): q/k/v (and, in
    single blocks, proj_mlp) LoRAs are fused into BFL's `img_attn_qkv`, `txt_attn_qkv` and
    `linear1` with `lora_down` = the parts' `lora_A` stacked (rank 3r/4r) and `lora_up` block
    diagonal, which changes no output. Unlike kohya's script it keeps each module's scale: the
    fused module gets alpha = (part alpha / r) x fused rank, and parts left out of training (e.g.
    proj_mlp for an attention-only LoRA) get zero rows.

    Args:
        state_dict: keys `transformer.<module>.lora_A.weight` / `.lora_B.weight` (optionally
            `<module>.alpha`).
        alpha: the LoRA's alpha (PEFT `lora_alpha`), one number or one per module path (without
            the `transformer.` prefix). None: use `<module>.alpha` keys if any, else alpha = rank.

    Raises:
        ValueError: for modules with no kohya name (e.g. text-encoder LoRAs), naming them.
    """
    return _emit_kohya(_parse_diffusers(state_dict, alphas=alpha))


def from_kohya(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a kohya sd-scripts FLUX LoRA state dict to diffusers format (`transformer.` keys).

    Each module's alpha / rank is folded into its weights (as diffusers' and kohya's converters
    do), so the result loads with alpha = rank: `FluxPipeline.load_lora_weights(result)` or
    `save`d as a file without adapter metadata. Fused modules are split back exactly; see
    `_split_fused`.

    diffusers' own `_convert_kohya_flux_lora_to_diffusers` is not used: it hard-codes the
    full-size FLUX widths (3072/12288) when splitting `linear1`, ignores the final layer's alpha,
    and returns the final layer and embedders without the `transformer.` prefix, so
    `load_lora_weights` silently drops them (with the default targets: the final `proj_out`).
    """
    return _emit_diffusers(_parse_kohya(state_dict))


def read_lora_as_diffusers(path: str | Path) -> dict[str, torch.Tensor]:
    """Any supported LoRA file as a diffusers-format state dict with alpha / rank folded in.

    For loading by state dict (`FluxPipeline.load_lora_weights(sd)`), where diffusers cannot see
    the file's header: its alpha would be lost and the LoRA applied at scale 1.
    """
    state_dict, metadata = read_lora(path)
    return _emit_diffusers(_parse(state_dict, metadata.get(LORA_ADAPTER_METADATA_KEY)))


def convert_lora_file(src: str | Path, dst: str | Path, to: LoraFormat) -> Path:
    """Convert a LoRA file to diffusers or kohya format; `dst` is written atomically.

    A file already in the target format is copied unchanged. Otherwise the header's
    `lora_adapter_metadata` is dropped (kohya files carry alpha in `.alpha` tensors, and
    converted diffusers files have it folded into the weights: keeping it would apply alpha
    twice) and the other header entries (e.g. `fluxlora.*`) are kept.

    Returns:
        `dst` as a Path.
    """
    if to not in LORA_FORMATS:
        raise ValueError(f"Unknown LoRA format {to!r}: use one of {', '.join(LORA_FORMATS)}.")
    state_dict, metadata = read_lora(src)
    try:
        if detect_format(state_dict) == to:
            converted, kept = state_dict, metadata
        else:
            modules = _parse(state_dict, metadata.get(LORA_ADAPTER_METADATA_KEY))
            converted = _emit_kohya(modules) if to == "kohya" else _emit_diffusers(modules)
            kept = {key: value for key, value in metadata.items() if key != LORA_ADAPTER_METADATA_KEY}
    except ValueError as err:
        raise ValueError(f"Cannot convert {src} to {to} format: {err}") from err
    return _atomic_save(converted, dst, kept)


# --------------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------------


def _check(model: torch.nn.Module, modules: _Modules, adapter_name: str | None, source: str) -> None:
    unmatched, wrong_shape = [], []
    wrong_rank: dict[int, list[str]] = {}
    model_rank = None
    for module, lora in modules.items():
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            unmatched.append(TRANSFORMER_PREFIX + module)
            continue
        is_lora_layer = isinstance(layer, BaseTunerLayer)
        if adapter_name is not None and not (is_lora_layer and adapter_name in getattr(layer, "lora_A", {})):
            unmatched.append(TRANSFORMER_PREFIX + module)
            continue
        base = layer.get_base_layer() if is_lora_layer else layer
        if not isinstance(base, torch.nn.Linear):
            unmatched.append(TRANSFORMER_PREFIX + module)
            continue
        rank = lora.down.shape[0]
        if lora.down.shape[1] != base.in_features or lora.up.shape != (base.out_features, rank):
            wrong_shape.append(
                f"{TRANSFORMER_PREFIX}{module}: LoRA maps {lora.down.shape[1]} -> {lora.up.shape[0]} features, "
                f"the layer {base.in_features} -> {base.out_features}"
            )
        elif adapter_name is not None and rank != layer.r[adapter_name]:
            model_rank = layer.r[adapter_name]
            wrong_rank.setdefault(rank, []).append(TRANSFORMER_PREFIX + module)

    target = f"module with LoRA adapter {adapter_name!r}" if adapter_name is not None else "linear layer"
    if unmatched:
        hint = (
            "Is it a LoRA of another model, or does it train modules outside --target_modules?"
            if adapter_name is not None
            else "Is it a LoRA of another model (SD/SDXL, FLUX.2, ...)?"
        )
        raise ValueError(
            f"{source} does not fit the model: {len(unmatched)} of its {len(modules)} LoRA modules "
            f"match no {target} of the FLUX.1 transformer:{_listing(unmatched)}\n{hint}"
        )
    if wrong_shape:
        raise ValueError(
            f"{source} does not fit the model: layer sizes differ (a LoRA of another FLUX model "
            f"size?):{_listing(wrong_shape)}"
        )
    if wrong_rank:
        ranks = sorted(wrong_rank)
        fix = f"set --rank {ranks[0]} to continue from it" if len(ranks) == 1 else "its ranks vary by module"
        listed = [module for rank in ranks for module in wrong_rank[rank]]
        raise ValueError(
            f"{source} has LoRA rank {'/'.join(map(str, ranks))} but the model's adapter has rank "
            f"{model_rank}: {fix}. Modules:{_listing(listed)}"
        )


def check_lora_keys(
    transformer: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    adapter_name: str | None = None,
    source: str = "LoRA",
) -> None:
    """Raise a clear ValueError if a LoRA state dict (diffusers or kohya format) does not fit.

    Every LoRA module must name a linear layer of the transformer with matching input and output
    sizes; with `adapter_name`, that layer must carry that PEFT adapter at the file's rank.
    Errors list up to 10 offending modules (diffusers names) and start with `source`, e.g.
    "--init_lora file x.safetensors".
    """
    try:
        modules = _parse(state_dict)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    _check(_unwrap(transformer), modules, adapter_name, source)


def load_lora_into_transformer(
    transformer: torch.nn.Module, path: str | Path, *, adapter_name: str = "default"
) -> None:
    """Load a LoRA file (diffusers or kohya format) into the transformer's existing adapter.

    For `--init_lora`: the adapter (from `add_adapter`) must target the file's modules at the
    file's rank. The file's per-module scale (alpha / rank) is honoured: when it differs from the
    adapter's, lora_B is rescaled so the model computes what the file describes; when it matches
    (the usual resume), the weights are copied bit for bit. Adapter modules the file lacks keep
    their initial values (logged as a warning).

    Raises:
        ValueError: naming the file and --init_lora, listing up to 10 modules that fit no adapter
            module, or whose sizes or rank differ (with the `--rank N` to use).
    """
    model = _unwrap(transformer)
    _adapter_config(model, adapter_name)
    source = f"--init_lora file {path}"
    state_dict, metadata = read_lora(path)
    try:
        modules = _parse(state_dict, metadata.get(LORA_ADAPTER_METADATA_KEY))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    _check(model, modules, adapter_name, source)

    peft_state_dict = {}
    for module, lora in modules.items():
        ratio = lora.scale / model.get_submodule(module).scaling[adapter_name]
        # A tolerance, because kohya stores alpha as a float32 number.
        up = lora.up if math.isclose(ratio, 1.0, rel_tol=1e-6) else lora.up.float() * ratio
        peft_state_dict[f"{module}.lora_A.weight"] = lora.down
        peft_state_dict[f"{module}.lora_B.weight"] = up
    result = set_peft_model_state_dict(model, peft_state_dict, adapter_name=adapter_name)
    missing = [key for key in result.missing_keys if f".{adapter_name}." in key and ".lora_" in key]
    if missing:
        logger.warning(
            "%s has no weights for %d LoRA parameters of the adapter; they keep their initial values:%s",
            source,
            len(missing),
            _listing(missing),
        )
