"""fp8 (e4m3) matmuls for the frozen base: `--base_model_precision fp8` and `--low_memory`.

Hopper GPUs multiply fp8 at about 1.6-1.9x their bf16 rate: on an H100, FLUX's block shapes ran at
1.1-1.3 PFLOP/s with row-wise scales against 0.66-0.80 in bf16 (bench/RESULTS.md). The frozen
weights are quantized once, one scale per output row; activations and incoming gradients are
quantized per row on the fly (dynamic scaling, torchao's "rowwise" recipe), and `torch._scaled_mm`
accumulates in fp32 (the forward in Hopper's faster, less often promoted mode). The LoRA adapters
keep their own precision: only the frozen matmul changes.

Only the token-wise linear layers of the 57 transformer blocks are converted (99% of the FLOPs);
the modulation layers (`norm*.linear`, one row per image), embedders and the final layer stay as
they are.
"""
from __future__ import annotations

import torch
from torch import nn

from .models import flux_blocks

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantization: x [M, K] -> (q [M, K] e4m3, scale [M, 1] fp32), x ~= q * scale.

    Each row is scaled so that its largest magnitude maps to e4m3's largest value (448).
    """
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    # row-major whatever x's layout (elementwise ops keep a transposed input's strides): _scaled_mm
    # takes its left operand row-major and its right one as the transpose of a row-major tensor
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3, memory_format=torch.contiguous_format)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of quantize_rows: q [M, K] e4m3 and scale [M, 1] -> q * scale [M, K] in `dtype`."""
    return (q.float() * scale).to(dtype)


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ W.T + b with x quantized per row, W given as (W_q [N, K], scale [N, 1]) and b [N] or None.

    The backward needs W [N, K] as the right-hand, column-major operand, i.e. W.T row-major: given
    as `weight_t` (its own per-row quantization of W.T [K, N]); without it (low memory) the backward
    dequantizes W to x's dtype for one ordinary matmul. No weight gradient: the base is frozen.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                weight_t: torch.Tensor | None, weight_t_scale: torch.Tensor | None,
                bias: torch.Tensor | None) -> torch.Tensor:
        q, scale = quantize_rows(x)
        ctx.save_for_backward(weight, weight_scale, weight_t, weight_t_scale)
        # Hopper's fast accumulation in the forward, as torchao's fp8 training does (its backward keeps the
        # periodic promotion to fp32, as ours does): 0.342 -> 0.332 s per 1024 px step on an H100, the
        # same loss (bench/RESULTS.md, session 9). The bias in the GEMM's epilogue: the output is whole when
        # written, so a LoRA's up projection can add itself to it in its own GEMM (graph_passes)
        return torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale.t(), bias=bias,
                                out_dtype=x.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None, None]:  # [M, N] -> [M, K]
        weight, weight_scale, weight_t, weight_t_scale = ctx.saved_tensors
        if weight_t is not None:
            q, scale = quantize_rows(grad)
            grad_x = torch._scaled_mm(q, weight_t.t(), scale_a=scale, scale_b=weight_t_scale.t(),
                                      out_dtype=grad.dtype)
        else:
            grad_x = grad @ dequantize(weight, weight_scale, grad.dtype)
        return grad_x, None, None, None, None, None


def fp8_matmul_supported(device: torch.device) -> bool:
    """fp8 tensor cores: Ada and Hopper (compute capability 8.9+); the CPU kernel is for tests."""
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9))


class Fp8Linear(nn.Module):
    """A frozen `nn.Linear` whose matmuls run in fp8: same inputs, outputs and gradients for x.

    `keep_transpose` also stores W.T in fp8 for an fp8 backward (the same bytes as the bf16 weight);
    without it the weight takes half the bf16 memory and the backward dequantizes it per layer.
    Without `fp8_matmul` (GPUs before Ada) the weight is only stored in fp8 and dequantized per layer.
    """

    def __init__(self, linear: nn.Linear, keep_transpose: bool = True, fp8_matmul: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.fp8_matmul = fp8_matmul
        keep_transpose = keep_transpose and fp8_matmul
        weight = linear.weight.detach()
        self.compute_dtype = weight.dtype  # inputs come in fp32 from autocast's norms; nn.Linear would cast
        # non-persistent: the frozen base is never saved (checkpoints hold the LoRA only)
        for name, tensor in zip(("weight_fp8", "weight_scale"), quantize_rows(weight)):
            self.register_buffer(name, tensor, persistent=False)
        for name, tensor in zip(("weight_t_fp8", "weight_t_scale"),
                                quantize_rows(weight.t()) if keep_transpose else (None, None)):
            self.register_buffer(name, tensor, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in the original weight's dtype."""
        if not self.fp8_matmul:
            weight = dequantize(self.weight_fp8, self.weight_scale, self.compute_dtype)
            return nn.functional.linear(x.to(self.compute_dtype), weight, self.bias)
        rows = x.reshape(-1, self.in_features).to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = _Fp8Matmul.apply(rows, self.weight_fp8, self.weight_scale, self.weight_t_fp8, self.weight_t_scale, bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fp8_matmul={self.fp8_matmul}, fp8_backward={self.weight_t_fp8 is not None}")


def _converts(name: str, module: nn.Module) -> bool:
    """Frozen token-wise linear layers of a block: not the LoRA adapters, not the modulation."""
    if type(module) is not nn.Linear or module.weight.requires_grad:
        return False
    parts = name.split(".")
    return not any(p.startswith("lora_") or p.startswith("norm") for p in parts)


def quantize_blocks(transformer: nn.Module, device: torch.device, keep_transpose: bool = True,
                    move: bool = True) -> int:
    """Replace the frozen linear layers of every FLUX block (inside PEFT's LoRA wrappers too) by
    `Fp8Linear` for running on `device`. With `move`, block by block on `device`: the peak is the
    converted blocks plus one bf16 block, so a model loaded on the CPU never needs its bf16 size on
    the GPU; without, where the blocks are (CPU offloading). Returns the count.

    Add the LoRA first: PEFT would otherwise cast new adapters to the base weight's (fp8) dtype.
    """
    fp8_matmul = fp8_matmul_supported(device)
    count = 0
    for block in flux_blocks(transformer):
        if move:
            block.to(device)
        for name, module in list(block.named_modules()):
            if _converts(name, module):
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child, Fp8Linear(module, keep_transpose, fp8_matmul))
                count += 1
    return count
