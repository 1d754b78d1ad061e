"""Loading the FLUX transformer (and, for previews, the VAE and scheduler) and adding LoRA."""
from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from .config import ConfigError
from .graph_passes import BLOCK_COMPILE_OPTIONS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}

# Activations one FLUX.1 block keeps for its backward, per token (text + image, per sample), in bf16
# without checkpointing: 50.0 GiB peak at 1024 px (4,608 tokens) and 31.8 GiB at 512 px (1,536) on an
# H200, less 23.2 GiB of weights and LoRA state, over 57 blocks, is 103-110 KiB; rounded up.
ACTIVATION_BYTES_PER_TOKEN = 112 * 2**10
# What a recomputed block keeps instead: its input hidden states, 3072 bf16 values per token.
CHECKPOINT_BYTES_PER_TOKEN = 3072 * 2


def unloadable_message(name: str, err: Exception) -> str:
    """The message for a model folder or hub id that diffusers could not load."""
    return (f"cannot load {name}: {err}\nGive a diffusers folder (model_index.json, transformer/, vae/, ...) or a "
            f"hub id that is in the local cache (hf download {name}) or reachable.")


def load_transformer(name_or_path: str, *, base_components: str, revision: str | None = None,
                     variant: str | None = None, dtype: torch.dtype = torch.bfloat16,
                     quantization_config: Any = None) -> FluxTransformer2DModel:
    """The FLUX transformer alone, frozen: from a diffusers folder or hub id, or from a single-file
    checkpoint as BFL and ComfyUI ship it, built on `base_components`' transformer config.

    Raises:
        ConfigError: naming --pretrained_model_name_or_path or --base_components.
    """
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        try:
            model = FluxTransformer2DModel.from_pretrained(name_or_path, subfolder="transformer", revision=revision,
                                                           variant=variant, dtype=dtype,
                                                           quantization_config=quantization_config)
        except OSError as err:
            raise ConfigError("pretrained_model_name_or_path", unloadable_message(name_or_path, err)) from None
        return model.requires_grad_(False)
    # Offline, from_single_file can only build the model from a local config; the components'
    # transformer config is the right one (a dev file needs dev's guidance embedding).
    try:
        FluxTransformer2DModel.load_config(base_components, subfolder="transformer", revision=revision)
    except OSError as err:
        raise ConfigError("base_components", unloadable_message(base_components, err)) from None
    try:
        model = FluxTransformer2DModel.from_single_file(str(path), config=base_components, subfolder="transformer",
                                                        config_revision=revision, dtype=dtype,
                                                        quantization_config=quantization_config)
    except (OSError, KeyError, IndexError, ValueError, RuntimeError) as err:  # how diffusers' converter fails
        raise ConfigError("pretrained_model_name_or_path",
                          f"{path} is not a FLUX.1 transformer checkpoint that fits --base_components "
                          f"{base_components} ({type(err).__name__}: {err}); give the transformer file as BFL or "
                          f"ComfyUI ship it (with the matching dev or schnell components), or a diffusers folder"
                          ) from None
    return model.requires_grad_(False)


def load_vae_and_scheduler(name_or_path: str, *, revision: str | None = None,
                           dtype: torch.dtype = torch.bfloat16
                           ) -> tuple[AutoencoderKL, FlowMatchEulerDiscreteScheduler]:
    """The VAE (its decoder draws previews) and the scheduler of a diffusers folder or hub id."""
    vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", revision=revision, dtype=dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(name_or_path, subfolder="scheduler", revision=revision)
    vae.requires_grad_(False)
    return vae, scheduler


def add_lora(transformer: FluxTransformer2DModel, *, rank: int, alpha: float, target_modules: Sequence[str],
             dropout: float = 0.0, init: str = "gaussian") -> list[torch.nn.Parameter]:
    """Adds a PEFT adapter ("default") and returns its parameters, in fp32 over the frozen base.

    fp32 LoRA weights keep small updates from rounding away in bf16 (as diffusers' examples do);
    autocast still runs the LoRA matmuls in the base dtype.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=init,
                        target_modules=list(target_modules))
    try:
        transformer.add_adapter(config)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"--lora_layers: {err}") from None
    cast_training_params(transformer, dtype=torch.float32)
    return [p for p in transformer.parameters() if p.requires_grad]


class FlatParameters:
    """One tensor behind many parameters, for the optimizer and the gradient clipping.

    Each parameter becomes a view into `flat` (same values), so the optimizer updates all of them
    by stepping `flat`. Backward still leaves a gradient on each parameter (DDP averages those);
    `collect_grads` moves them into `flat.grad` before the step. The optimizer and the clipping then
    launch a few kernels per step instead of a few per tensor: FLUX.1's default LoRA layers have 838
    tensors, and bitsandbytes' AdamW8bit spent ~40 ms of host time per step on them while the GPU
    waited. Moving the module copies each view apart: call `bind` after anything that may move it
    (accelerate's `prepare` does on CPU processes, whose device it names `cpu:0`).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in self.params]))
        self.bind()

    def bind(self) -> None:
        """Make each parameter a view of its slice of `flat` again, keeping its values."""
        offset = 0
        with torch.no_grad():
            for param in self.params:
                piece = self.flat.data[offset:offset + param.numel()].view_as(param)
                if param.data_ptr() != piece.data_ptr():
                    piece.copy_(param.data)
                    param.data = piece
                offset += param.numel()

    def collect_grads(self) -> None:
        """flat.grad = the parameters' gradients (zero where one has none); theirs are released."""
        self.flat.grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                    for p in self.params])
        for param in self.params:
            param.grad = None


def flux_blocks(transformer: FluxTransformer2DModel) -> list[torch.nn.Module]:
    """The transformer's blocks in forward order: the double-stream ones, then the single-stream ones."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def blocks_to_checkpoint(free_bytes: int, tokens: int, blocks: int) -> int:
    """How many of `blocks` transformer blocks to recompute in the backward pass so that a step's
    activations fit in `free_bytes`: 0 when all fit, `blocks` when even that may not.

    Args:
        free_bytes: device memory left for activations (after weights, optimizer state and headroom).
        tokens: batch size x (text + image tokens) of the largest batch the run will see.
    """
    keep, recompute = tokens * ACTIVATION_BYTES_PER_TOKEN, tokens * CHECKPOINT_BYTES_PER_TOKEN
    excess = blocks * keep - free_bytes
    if excess <= 0:
        return 0
    return min(blocks, math.ceil(excess / (keep - recompute)))


def checkpoint_blocks(transformer: FluxTransformer2DModel, count: int) -> None:
    """Recompute the activations of `count` of the transformer's blocks in the backward pass (the
    double-stream ones first) and keep those of the rest: checkpointing only as much as memory
    requires, through diffusers' own gradient-checkpointing hook."""
    chosen = {id(block) for block in flux_blocks(transformer)[:count]}

    def run(block: torch.nn.Module, *args: Any) -> Any:
        if id(block) in chosen:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=run)


def _outputs_of_their_own(forward: Any) -> Any:
    """A single-stream block's forward whose two outputs are tensors of their own, not slices of one.

    diffusers' single block returns its text and image tokens as two slices of one [batch, tokens, dim]
    tensor. Compiled, AOTAutograd rebuilds such views outside the graph, so their backward runs eagerly:
    a zero-filled full-size gradient for each slice, then their sum, in every single block (a 1024 px step's
    profile has 77 fills and 40 adds of that size outside the compiled graphs, 1.5 ms on an H200;
    bench/RESULTS.md session 14). Cloned inside the compiled graph they are its outputs (Inductor still
    writes one buffer), and their gradients go into the compiled backward as they are."""
    @functools.wraps(forward)
    def own_outputs(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in forward(*args, **kwargs))
    return own_outputs


def compile_blocks(transformer: FluxTransformer2DModel, cuda_graphs: bool = False, checkpointed: int = 0) -> None:
    """Regional torch.compile: each block compiled on its own, one graph per block type reused 19/38
    times, rewritten by graph_passes (LoRA projections with fewer GEMM passes, GELU through a sigmoid). With
    `cuda_graphs`, each block's kernels replay as a CUDA graph (reduce-overhead mode), except the first
    `checkpointed` blocks (see checkpoint_blocks): their recomputation in the backward frees
    inputs that a graph recording cannot follow. Every forward of the transformer starts a new round of
    replays, whose outputs may overwrite the last round's: training reads nothing of a forward after its
    backward, sampling nothing of a denoising step after the next begins."""
    # Each block type is compiled once per variant it meets: bucket shapes (dynamic after the second),
    # whether its input requires grad (the first block's does not), grad or no-grad (previews), the
    # checkpoint's recomputation, graphs or not. Dynamo's default limit of 8 was hit on the tiny model
    # with recomputed blocks and previews, which fullgraph=True turns into an error.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in transformer.single_transformer_blocks:
        block.forward = _outputs_of_their_own(block.forward)
    for index, block in enumerate(flux_blocks(transformer)):
        # options instead of a mode ("reduce-overhead" is `triton.cudagraphs`): torch.compile takes one or the
        # other. Not `triton.multi_kernel`: 3.5-4.4 ms faster per 1024 px step on an H200, but a second run
        # that found its graphs in Inductor's on-disk cache crashed loading them (torch 2.11, bench/RESULTS.md
        # session 11), and that cache outlives runs on a machine.
        block.compile(fullgraph=True, options={"triton.cudagraphs": cuda_graphs and index >= checkpointed,
                                               **BLOCK_COMPILE_OPTIONS})
    if cuda_graphs:
        transformer.register_forward_pre_hook(lambda *_: torch.compiler.cudagraph_mark_step_begin())


class WarmGuards:
    """Skips Dynamo's guard checks for batch shapes that have already run once.

    Each call of a compiled block checks its guards on the host: ~130 us per call, ~7.5 ms of a 512 px
    batch-1 step (114 block calls) that is bound by the host (bench/RESULTS.md, sessions 6 and 9). Once a
    shape has run, every variant it needs is compiled, so Dynamo need only tell the compiled variants
    apart (`skip_guard_eval_unsafe`). A shape not seen before runs with full guards, and compiles.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.seen: set[tuple] = set()

    def __call__(self, *tensors: torch.Tensor) -> contextlib.AbstractContextManager:
        """The context for one training forward and backward whose inputs have the shapes of `tensors`."""
        if not self.enabled:
            return contextlib.nullcontext()
        key = tuple(tuple(t.shape) for t in tensors)
        if key in self.seen:
            return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        self.seen.add(key)
        return contextlib.nullcontext()


def cublas_without_workspace(device: torch.device) -> None:
    """On Hopper, no cuBLAS workspace (`CUBLAS_WORKSPACE_CONFIG=:0:0`, `CUBLASLT_WORKSPACE_SIZE=0`), unless
    the environment sets one. With a workspace, cuBLAS zeroes it with a memset before each large GEMM, bf16 and
    fp8 alike: ~1200 per 1024 px training step, each ~1 us plus a ~3 us gap before the GEMM, in CUDA graphs too.
    Without one it runs the same tiles in variants that need none: 2.1 ms (fp8) and 1.6 ms (bf16) faster per
    1024 px step on an H200, the same loss (bench/RESULTS.md, session 18); sample.py's GEMMs are the same kind.
    PyTorch sizes a workspace at the process's first cuBLAS call, so call this before any matmul on `device`."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":0:0")
        os.environ.setdefault("CUBLASLT_WORKSPACE_SIZE", "0")


def attention_backends(device: torch.device, cudnn: bool = False) -> contextlib.AbstractContextManager:
    """The SDPA kernels for the transformer on CUDA; wrap forward and backward (gradient checkpointing
    recomputes attention in the backward pass). Flash or memory-efficient attention by default.
    `cudnn` puts cuDNN's kernel first, which runs FLUX's attention about twice as fast on Hopper: for
    passes without a backward (sampling, previews) and for training with contiguous_attention_grads,
    without which its backward crashed inside FLUX (illegal memory access). The math kernel stays as
    the fallback for what the others refuse (the text encoders' masked attention in sample.py)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if cudnn:
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, *backends], set_priority=True)
    return sdpa_kernel(backends)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_attention_grads(transformer: FluxTransformer2DModel) -> None:
    """Give cuDNN's attention backward its output gradient in the output's own layout.

    FLUX's single-stream blocks concatenate the attention output [B, S, 3072] with the MLP's [B, S,
    12288] along features, so the attention output's gradient arrives as a slice of a wider tensor
    (rows 15,360 values apart, not 3,072): a gradient whose strides differ from the output's, which
    cuDNN's backward is known to mishandle (the double-stream blocks' gradients come contiguous). A
    hook on each single block's attention makes it contiguous: one [B, S, 3072] copy per block.
    """
    for block in transformer.single_transformer_blocks:
        block.attn.register_forward_hook(lambda _module, _args, out: _ContiguousGrad.apply(out))
