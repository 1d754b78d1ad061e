"""Typed configs for the three scripts, parsed from flags and an optional YAML file.

Each script has one dataclass. Every field is a flag of the same name (`--rank`, `--learning_rate`,
... as diffusers' example scripts name them); `--config file.yaml` may supply any of them, and flags
given on the command line win over the file. `validate()` checks everything that can be checked
before a model loads and raises `ConfigError` naming the flag to change.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import yaml

C = TypeVar("C")

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"
# T5 tokens each released model was trained with (FluxPipeline's max_sequence_length)
MAX_SEQUENCE_LENGTH: dict[str, int] = {"dev": 512, "schnell": 256}

# LoRA file formats: diffusers' (this toolkit, diffusers, ai-toolkit) and kohya sd-scripts' (ComfyUI, Forge)
LoraFormat = Literal["diffusers", "kohya"]
LORA_FORMATS: tuple[str, ...] = typing.get_args(LoraFormat)

# The attention and MLP projections of both FLUX block types (diffusers module names). "proj_out"
# also matches the transformer's final output projection, as in diffusers' example script.
DEFAULT_LORA_LAYERS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out",
)


class ConfigError(ValueError):
    """A bad flag value; the message starts with the flag and says what to do."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(f"--{flag}: {message}")


def flag(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence[Any] | None = None,
         metavar: str | None = None) -> Any:
    """A dataclass field that is also a command-line flag."""
    meta = {"help": help, "choices": choices, "metavar": metavar}
    if isinstance(default, (list, dict, tuple)):
        value = list(default) if isinstance(default, (list, tuple)) else dict(default)
        return field(default_factory=lambda: value.copy(), metadata=meta)
    return field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X | None` annotations."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of `cls` plus `--config`."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=str, default=None,
                        help="YAML file whose keys are any of these flags (without --); "
                             "flags on the command line win over it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "dest": f.name,
                                  "default": argparse.SUPPRESS}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            kwargs["help"] += " (required)"
        else:
            kwargs["help"] += f" (default: {default!r})"
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            # `--prompt a b` and `--prompt a --prompt b` both give [a, b]
            kwargs["nargs"] = "+"
            kwargs["action"] = "extend"
            kwargs["type"] = typing.get_args(tp)[0]
        else:
            kwargs["type"] = tp
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Type-check a value from YAML against the field's annotation."""
    tp, optional = _base_type(typing.get_type_hints(cls)[name])
    if value is None:
        if optional:
            return None
        raise ConfigError(name, "may not be empty in the config file")
    try:
        if typing.get_origin(tp) is list:
            items = value if isinstance(value, list) else [value]
            return [typing.get_args(tp)[0](v) for v in items]
        if tp is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(name, f"{value!r} in the config file is not a valid {getattr(tp, '__name__', tp)}")


def parse_config(cls: type[C], argv: Sequence[str] | None = None, description: str = "") -> C:
    """Parse flags (and `--config` YAML) into a validated `cls` instance; exits 2 on bad input."""
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    config_file = args.pop("config")
    try:
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError("config", f"{path} does not exist")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError("config", f"{path} must hold a mapping of flag names to values")
            for key, value in loaded.items():
                key = str(key).lstrip("-")
                if key not in names:
                    raise ConfigError("config", f"{path}: unknown key {key!r}; see --help for the flags")
                values[key] = _coerce(cls, key, value)
        values.update(args)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
        if missing:
            raise ConfigError(missing[0], "is required")
        cfg = cls(**values)
        cfg.validate()  # type: ignore[attr-defined]
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return cfg


def check_resolution(name: str, value: int) -> None:
    if value <= 0 or value % 16:
        raise ConfigError(name, f"{value} is not a positive multiple of 16 (FLUX packs 2x2 patches of "
                                f"8x-downsampled latents); use e.g. 512, 768 or 1024")


def _check_model(name: str, value: str) -> None:
    """An existing path, or a hub id of the form owner/name."""
    if Path(value).expanduser().exists():
        return
    if re.fullmatch(r"[\w.-]+/[\w.-]+", value) and not value.startswith("."):
        return  # a hub id: from_pretrained says whether it can be reached
    raise ConfigError(name, f"{value} does not exist; give a diffusers folder, a single-file "
                            f"checkpoint or a hub id such as {DEFAULT_MODEL}")


@dataclass
class PrecomputeConfig:
    """precompute_embeddings.py: encode images (VAE) and captions (T5 + CLIP) once, to a disk cache."""

    dataset: str = flag(help="images: a folder (with same-stem .txt captions or metadata.jsonl/.csv), "
                             "a .parquet/.csv/.jsonl table, a saved or hub Hugging Face dataset, or "
                             "oxen:OWNER/REPO (see --oxen_* flags)")
    embeddings_dir: str = flag(help="folder to write the cache to (read by train_flux_lora.py)")
    pretrained_model_name_or_path: str = flag(DEFAULT_MODEL, "diffusers folder or hub id of FLUX.1")
    revision: str | None = flag(None, "hub revision of the model")
    variant: str | None = flag(None, "weights variant of the model (e.g. fp16)")
    image_column: str | None = flag(None, "image column of a table/dataset (found among image, "
                                          "file_name, image_path, path when not given)")
    caption_column: str | None = flag(None, "caption column (found among text, caption, action when not given)")
    split: str = flag("train", "split of a Hugging Face dataset")
    resolutions: list[int] = flag([512, 768, 1024], "bucket resolutions: each image is cached at each one "
                                                    "(area close to res x res, sides multiples of 16)")
    max_aspect: float = flag(4.0, "widest aspect ratio of a bucket (and its inverse)")
    max_upscale: float = flag(2.0, "skip an image at a resolution that would need upscaling by more than this")
    flip_copies: bool = flag(False, "also cache a horizontally flipped copy of every image")
    trigger_phrase: str = flag("", "phrase prepended to every caption (\"TRIGGER, caption\")")
    caption_prefix: str = flag("", "text put before every caption (after the trigger phrase)")
    caption_suffix: str = flag("", "text put after every caption")
    max_sequence_length: int | None = flag(None, "T5 tokens per caption: 512 for dev, 256 for schnell when not given")
    validation_prompts: list[str] = flag([], "prompts encoded for previews during training")
    validation_prompts_file: str | None = flag(None, "file with one validation prompt per line")
    text_batch_size: int = flag(16, "captions per T5/CLIP batch")
    vae_batch_size: int = flag(8, "images per VAE batch (one bucket per batch)")
    shard_size: int = flag(64, "images per cache shard")
    sequential_models: bool = flag(False, "load the text encoders and the VAE one after another (less memory)")
    strict: bool = flag(False, "fail instead of skipping any image or caption")
    oxen_revision: str | None = flag(None, "branch or commit of an oxen: dataset")
    oxen_host: str | None = flag(None, "Oxen server host (default: Oxen's own config)")

    def validate(self) -> None:
        if not self.resolutions:
            raise ConfigError("resolutions", "give at least one resolution")
        for res in self.resolutions:
            check_resolution("resolutions", res)
        if self.max_aspect < 1:
            raise ConfigError("max_aspect", "must be at least 1")
        if self.max_upscale < 1:
            raise ConfigError("max_upscale", "must be at least 1 (1 means never upscale)")
        for name in ("text_batch_size", "vae_batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be at least 1")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 512:
            raise ConfigError("max_sequence_length", "must be between 1 and 512 (T5's limit in FLUX)")
        if self.validation_prompts_file and not Path(self.validation_prompts_file).is_file():
            raise ConfigError("validation_prompts_file", f"{self.validation_prompts_file} does not exist")
        _check_model("pretrained_model_name_or_path", self.pretrained_model_name_or_path)


@dataclass(kw_only=True)
class ModelSource:
    """The model flags of training and sampling: a diffusers folder or hub id, or a single transformer
    file with the rest of the pipeline from --base_components."""

    pretrained_model_name_or_path: str = flag(DEFAULT_MODEL, "diffusers folder or hub id of FLUX.1, or a single-file "
                                                              "transformer checkpoint (.safetensors as BFL/ComfyUI "
                                                              "ship it; the rest comes from --base_components)")
    base_components: str = flag(DEFAULT_MODEL, "diffusers folder or hub id whose VAE, text encoders, tokenizers, "
                                               "scheduler and transformer config go with a single-file "
                                               "--pretrained_model_name_or_path (build the cache from it)")
    revision: str | None = flag(None, "hub revision of the model (of --base_components for a single file)")
    variant: str | None = flag(None, "weights variant of the model (e.g. fp16)")

    @property
    def single_file(self) -> bool:
        """Whether the model is a single transformer file, the rest coming from --base_components."""
        return Path(self.pretrained_model_name_or_path).expanduser().is_file()

    @property
    def components(self) -> str:
        """Where the VAE, scheduler, text encoders (and so the cache) come from."""
        return self.base_components if self.single_file else self.pretrained_model_name_or_path

    def check_model(self) -> None:
        _check_model("pretrained_model_name_or_path", self.pretrained_model_name_or_path)
        if self.single_file:
            _check_model("base_components", self.base_components)
            if Path(self.base_components).expanduser().is_file():
                raise ConfigError("base_components", f"{self.base_components} is a file; give the diffusers folder "
                                                     f"or hub id of a FLUX.1 pipeline such as {DEFAULT_MODEL}")


@dataclass(kw_only=True)
class TrainConfig(ModelSource):
    """train_flux_lora.py: a LoRA on the FLUX.1 transformer, trained by flow matching from the cache."""

    embeddings_dir: str = flag(help="cache written by precompute_embeddings.py")
    output_dir: str = flag("runs/flux-lora", "the run folder: LoRA, checkpoints, logs, previews")
    # LoRA
    rank: int = flag(16, "LoRA rank")
    lora_alpha: float | None = flag(None, "LoRA alpha (default: equal to --rank, since ComfyUI ignores a stored alpha)")
    lora_dropout: float = flag(0.0, "dropout on the LoRA path")
    lora_layers: list[str] = flag(list(DEFAULT_LORA_LAYERS), "module name patterns that get LoRA")
    init_lora_weights: str = flag("gaussian", "initialisation of lora_A (lora_B starts at zero)",
                                  choices=["gaussian", "default", "pissa", "olora"])
    init_lora: str | None = flag(None, "existing LoRA file (diffusers or kohya format) to continue from")
    # flow matching
    timestep_sampling: str = flag("logit_normal", "how sigmas are drawn: sigmoid of a normal, uniform, SD3's "
                                                  "mode, or logit-normal then FLUX's resolution shift",
                                  choices=["logit_normal", "uniform", "mode", "flux_shift"])
    logit_mean: float = flag(0.0, "mean of the normal for logit_normal sampling")
    logit_std: float = flag(1.0, "std of the normal for logit_normal sampling")
    mode_scale: float = flag(1.29, "scale of the mode sampling")
    loss_weighting: str = flag("none", "loss weighting over sigmas, as diffusers' SD3/FLUX examples",
                               choices=["none", "sigma_sqrt", "cosmap"])
    guidance_scale: float = flag(1.0, "guidance fed to guidance-distilled models (dev) while training")
    caption_dropout: float = flag(0.0, "share of samples trained with the empty caption")
    repeats: int = flag(1, "times each cached image appears per epoch")
    holdout_images: int = flag(0, "cached images kept out of training for a held-out loss at fixed sigmas and "
                                  "noise, logged as val_loss every --validation_steps")
    resolutions: list[int] = flag([], "train only on these cached resolutions (default: all in the cache)")
    # optimisation
    max_train_steps: int = flag(2000, "optimizer steps")
    train_batch_size: int = flag(1, "images per batch per process (one bucket per batch)")
    gradient_accumulation_steps: int = flag(1, "batches per optimizer step")
    learning_rate: float = flag(1e-4, "learning rate")
    lr_scheduler: str = flag("constant", "learning-rate schedule (after warmup)",
                             choices=["constant", "constant_with_warmup", "cosine", "linear"])
    lr_warmup_steps: int = flag(0, "linear warmup steps")
    optimizer: str = flag("adamw8bit", "optimizer", choices=["adamw8bit", "adamw", "prodigy"])
    adam_beta1: float = flag(0.9, "Adam beta1")
    adam_beta2: float = flag(0.999, "Adam beta2")
    adam_weight_decay: float = flag(1e-4, "weight decay")
    adam_epsilon: float = flag(1e-8, "Adam epsilon")
    max_grad_norm: float = flag(1.0, "gradient clipping norm (0 turns clipping off)")
    mixed_precision: str = flag("bf16", "base weights and autocast precision", choices=["bf16", "fp16", "no"])
    gradient_checkpointing: bool = flag(False, "recompute activations in the backward pass (less memory, slower)")
    compile: bool = flag(True, "torch.compile the transformer's repeated blocks on CUDA (regional compilation: "
                               "about a minute at start, then ~1.4x faster steps; --no-compile skips it)")
    gc_steps: int = flag(50, "collect Python's garbage every N optimizer steps, on all processes at once, "
                              "instead of whenever Python decides (a collection on one process stalls the "
                              "step of all); 0 leaves Python's automatic collection on")
    attention_backend: str = flag("cudnn", "attention kernel for training on CUDA: cudnn (its output gradients made "
                                           "contiguous, without which its backward crashes) makes the 1024 px step "
                                           "1.2x faster than flash on an H200", choices=["flash", "cudnn"])
    cuda_graphs: bool | None = flag(None, "with --compile, replay each block's kernels as CUDA graphs (torch.compile's "
                                          "reduce-overhead mode): removes the host's work per step, which limits "
                                          "small images and many GPUs per host. Default: on where it applies "
                                          "(CUDA, --compile, --gradient_accumulation_steps 1, not FSDP)")
    base_model_precision: str = flag("bf16", "matmuls of the frozen base's blocks: fp8 runs them in e4m3 with "
                                             "row-wise scales (Hopper/Ada GPUs; faster, same memory)",
                                     choices=["bf16", "fp8"])
    low_memory: bool = flag(False, "train 1024 px in about 20 GB: store the base's blocks in fp8 (one copy) and "
                                   "recompute activations (implies fp8 forward matmuls and --gradient_checkpointing)")
    seed: int = flag(42, "seed for LoRA init, data order, noise and sigmas")
    # checkpoints and outputs
    checkpointing_steps: int = flag(200, "save a resumable checkpoint (and its LoRA file) every N steps")
    checkpoints_total_limit: int | None = flag(None, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = flag(None, "'latest' or a checkpoint folder to continue from")
    logging_steps: int = flag(1, "write a JSONL/tracker row every N steps (each is written during the next step, "
                                 "once the GPU is past it: logging every step costs no wait)")
    report_to: str = flag("none", "trackers besides the JSONL log", choices=["none", "wandb", "tensorboard", "all"])
    tracker_project_name: str = flag("flux-lora", "W&B / TensorBoard project")
    run_name: str | None = flag(None, "run name for trackers and Oxen branches (default: the --output_dir folder name)")
    wandb_entity: str | None = flag(None, "W&B entity (team or user)")
    wandb_tags: list[str] = flag([], "W&B run tags")
    wandb_log_model: bool = flag(False, "upload the final LoRA to W&B as a model artifact")
    oxen_repo: str | None = flag(None, "Oxen.ai repository (owner/name) to commit the LoRA, samples, logs and a "
                                       "model card to, on a new branch per run")
    oxen_branch: str | None = flag(None, "branch for --oxen_repo (default: run name + timestamp, never an "
                                         "existing one)")
    oxen_host: str | None = flag(None, "Oxen server host (default: Oxen's own config)")
    oxen_upload_checkpoints: bool = flag(False, "also upload each checkpoint's LoRA to --oxen_repo")
    max_nan_steps: int = flag(5, "stop (with a checkpoint of the last good state) after this many optimizer "
                                 "steps in a row with a non-finite loss or gradient; each one is skipped")
    # previews
    validation_steps: int = flag(200, "draw previews of the cached validation prompts every N steps (0: never)")
    validation_width: int = flag(1024, "preview width in pixels")
    validation_height: int = flag(1024, "preview height in pixels")
    validation_inference_steps: int = flag(28, "denoising steps per preview")
    validation_guidance_scale: float = flag(3.5, "guidance of the previews")
    validation_seed: int = flag(0, "seed of the previews (the same for every preview round)")
    process_group_timeout: int = flag(7200, "seconds a process waits at a barrier (previews and uploads "
                                            "run on the main process only)")

    def validate(self) -> None:
        if not Path(self.embeddings_dir, "manifest.json").is_file():
            raise ConfigError("embeddings_dir", f"{self.embeddings_dir} has no manifest.json; build the cache "
                                                f"with precompute_embeddings.py --embeddings_dir {self.embeddings_dir}")
        self.check_model()
        if self.gc_steps < 0:
            raise ConfigError("gc_steps", f"must be 0 (automatic) or more (got {self.gc_steps})")
        positive = ("rank", "max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                    "checkpointing_steps", "logging_steps", "repeats", "validation_inference_steps", "max_nan_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be at least 1")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError("lora_alpha", "must be positive")
        if not self.lora_layers:
            raise ConfigError("lora_layers", "give at least one module pattern")
        for name in ("lora_dropout", "caption_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, "must be in [0, 1)")
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate", "must be positive")
        if self.max_grad_norm < 0:
            raise ConfigError("max_grad_norm", "must be 0 (off) or positive")
        if self.holdout_images < 0:
            raise ConfigError("holdout_images", "must be 0 (none) or positive")
        if self.validation_steps < 0:
            raise ConfigError("validation_steps", "must be 0 (off) or positive")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError("checkpoints_total_limit", "must be at least 1")
        for name in ("validation_width", "validation_height"):
            check_resolution(name, getattr(self, name))
        for res in self.resolutions:
            check_resolution("resolutions", res)
        if self.init_lora and not Path(self.init_lora).is_file():
            raise ConfigError("init_lora", f"{self.init_lora} does not exist")
        if self.resume_from_checkpoint not in (None, "latest") and not Path(self.resume_from_checkpoint).is_dir():
            raise ConfigError("resume_from_checkpoint", f"{self.resume_from_checkpoint} is not a checkpoint "
                                                        f"folder; give 'latest' or a checkpoint-<step> folder")
        if (self.oxen_branch or self.oxen_upload_checkpoints) and not self.oxen_repo:
            raise ConfigError("oxen_repo", "is needed by --oxen_branch / --oxen_upload_checkpoints; give owner/name")
        if self.wandb_log_model and self.report_to not in ("wandb", "all"):
            raise ConfigError("wandb_log_model", "needs --report_to wandb (or all)")
        if self.cuda_graphs and self.gradient_accumulation_steps > 1:
            raise ConfigError("cuda_graphs", "needs --gradient_accumulation_steps 1 (a replay reuses the memory "
                                             "of the previous one's gradients); raise --train_batch_size instead")
        if self.fp8_base and self.mixed_precision != "bf16":
            flag_name = "low_memory" if self.low_memory else "base_model_precision"
            raise ConfigError(flag_name, f"the fp8 base needs --mixed_precision bf16 (got {self.mixed_precision})")
        if self.init_lora and self.resume_from_checkpoint:
            raise ConfigError("init_lora", "cannot be combined with --resume_from_checkpoint (the checkpoint "
                                           "already holds the LoRA); drop one of them")

    @property
    def alpha(self) -> float:
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def fp8_base(self) -> bool:
        """Whether the frozen blocks run in fp8 (asked for, or implied by --low_memory)."""
        return self.base_model_precision == "fp8" or self.low_memory

    @property
    def checkpointing(self) -> bool:
        """Whether activations are recomputed in the backward (asked for, or implied by --low_memory)."""
        return self.gradient_checkpointing or self.low_memory


@dataclass(kw_only=True)
class SampleConfig(ModelSource):
    """sample.py: offline generation with a FLUX.1 model and any number of LoRAs."""

    lora: list[str] = flag([], "LoRA files (diffusers, ai-toolkit or kohya sd-scripts format); several may be given")
    lora_scale: list[float] = flag([], "one scale per --lora (default 1.0 each)")
    prompt: list[str] = flag([], "prompts")
    prompt_file: str | None = flag(None, "text file (one prompt a line) or JSONL with prompt and optional "
                                         "seed, width, height, num_inference_steps, guidance_scale")
    output_dir: str = flag("samples", "folder for the PNGs, index.jsonl and grid.png")
    width: int = flag(1024, "image width in pixels (multiple of 16)")
    height: int = flag(1024, "image height in pixels (multiple of 16)")
    num_inference_steps: int = flag(28, "denoising steps")
    guidance_scale: float = flag(3.5, "guidance scale (distilled guidance for dev)")
    seed: list[int] = flag([0], "seeds: each prompt is rendered once with each (a JSONL line's own seed "
                                "replaces them)")
    batch_size: int = flag(1, "images per pipeline call")
    max_sequence_length: int | None = flag(None, "T5 tokens; when not given 512 for dev, 256 for schnell")
    compare: bool = flag(False, "also render without the LoRAs, same seeds, side by side")
    fuse_lora: bool = flag(True, "merge the LoRAs into the transformer's weights before rendering with them "
                                 "(diffusers' fuse_lora, the way ComfyUI applies LoRAs): no LoRA work per step, "
                                 "a tenth faster; --no-fuse_lora keeps them as adapters beside the base "
                                 "(load_lora_weights' images to the bit). With --quantize they stay adapters")
    mixed_precision: str = flag("bf16", "weights and compute dtype", choices=["bf16", "fp16", "no"])
    quantize: str = flag("none", "store the transformer in 4-bit NF4 (bitsandbytes, CUDA only) or its blocks in "
                                 "fp8, multiplied in fp8 on Ada/Hopper GPUs (faster) and dequantized elsewhere",
                         choices=["none", "nf4", "fp8"])
    cpu_offload: bool = flag(False, "keep models on the CPU and move each to the GPU when used (CUDA only)")
    vae_tiling: bool = flag(False, "decode in tiles (large images in less memory)")
    compile: bool = flag(False, "torch.compile the transformer's repeated blocks")

    def validate(self) -> None:
        self.check_model()
        for name in ("width", "height"):
            check_resolution(name, getattr(self, name))
        if not self.seed:
            raise ConfigError("seed", "give at least one seed")
        for name in ("num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be at least 1")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 512:
            raise ConfigError("max_sequence_length", "must be between 1 and 512 (T5's limit in FLUX)")
        for path in self.lora:
            if not Path(path).is_file():
                raise ConfigError("lora", f"{path} does not exist")
        if self.lora_scale and len(self.lora_scale) != len(self.lora):
            raise ConfigError("lora_scale", f"give one scale per --lora ({len(self.lora)}), or none")
        if self.prompt_file and not Path(self.prompt_file).is_file():
            raise ConfigError("prompt_file", f"{self.prompt_file} does not exist")
        if not self.prompt and not self.prompt_file:
            raise ConfigError("prompt", "give --prompt or --prompt_file")
        if self.compare and not self.lora:
            raise ConfigError("compare", "needs at least one --lora to compare against")
        import torch  # only this check needs it

        # diffusers refuses NF4 quantisation without CUDA, and offloading moves models between CPU and GPU.
        for name, needs_cuda in (("quantize", self.quantize == "nf4"), ("cpu_offload", self.cpu_offload)):
            if needs_cuda and not torch.cuda.is_available():
                raise ConfigError(name, "needs a CUDA GPU and none is visible; on the CPU use --quantize fp8 "
                                        "to save memory, or drop the flag")

    @property
    def lora_scales(self) -> list[float]:
        """The scale of each --lora: --lora_scale, or 1.0 each."""
        return self.lora_scale or [1.0] * len(self.lora)
