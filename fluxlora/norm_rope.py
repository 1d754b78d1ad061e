"""FLUX's q/k RMS norm followed by its rotary embedding, as one op with Triton kernels on CUDA.

diffusers' attention processor normalizes q and k per head (`torch.nn.RMSNorm`, frozen weight) and then applies
`apply_rotary_emb`, which rotates interleaved pairs (x[2i], x[2i+1]) by per-position angles. Inductor fuses the
two into one reduction per head row, but computes the rotation element by element, each value gathering its
partner through index arithmetic and re-reading the fp32 tables for each of the 24 heads: ~1 TB/s on an H200,
a quarter of its bandwidth (bench/RESULTS.md, session 19). These kernels read each row once, split it into its
pairs, and write the rotated row once.

Numerics: eager diffusers' (the norm in fp32, rounded to the input dtype, the rotation in fp32, rounded again);
the backward in fp32 from the output gradient to the input gradient, rounded once.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the op runs its torch formula
    triton = None


def reference(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S, H, D], weight [D], cos and sin [S, D] fp32 -> (out [B, S, H, D] in x's dtype, rstd [B, S, H]
    fp32): `apply_rotary_emb(RMSNorm(x), (cos, sin), sequence_dim=1)` as diffusers computes it."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    y = (xf * rstd[..., None] * weight.float()).to(x.dtype).float()
    real, imag = y.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], -1).flatten(-2)
    return (y * cos[:, None] + rotated * sin[:, None]).to(x.dtype), rstd


def reference_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The input gradient of `reference` (grad and x [B, S, H, D], rstd [B, S, H]) -> [B, S, H, D] in x's dtype,
    computed in fp32: the rotation's transpose, then RMS norm's backward with a frozen weight."""
    g = grad.float()
    g0, g1 = g.unflatten(-1, (-1, 2)).unbind(-1)
    c0, c1 = cos[:, None].unflatten(-1, (-1, 2)).unbind(-1)
    s0, s1 = sin[:, None].unflatten(-1, (-1, 2)).unbind(-1)
    # out[2i] = y[2i] c[2i] - y[2i+1] s[2i];  out[2i+1] = y[2i+1] c[2i+1] + y[2i] s[2i+1]
    gy = torch.stack([g0 * c0 + g1 * s1, g1 * c1 - g0 * s0], -1).flatten(-2) * weight.float()
    xhat = x.float() * rstd[..., None]
    return (rstd[..., None] * (gy - xhat * (gy * xhat).mean(-1, keepdim=True))).to(x.dtype)


if triton is not None:
    @triton.jit
    def _rows(ROWS: tl.constexpr, rows, S, H):
        """This program's head rows r of [B, S, H] (flattened), which exist, and their (b, s, h)."""
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        return r, r < rows, r // (H * S), (r // H) % S, r % H

    @triton.jit
    def _load_rows(ptr, stride_b, stride_s, b, s, h, mask, D: tl.constexpr):
        """[ROWS, D] fp32: the rows of a [B, S, H, D] tensor whose heads are packed (stride D, then 1)."""
        offsets = (b * stride_b + s * stride_s + h * D)[:, None] + tl.arange(0, D)[None, :]
        return tl.load(ptr + offsets, mask=mask[:, None], other=0.0).to(tl.float32)

    @triton.jit
    def _pairs(t, ROWS: tl.constexpr, D: tl.constexpr):
        """[ROWS, D] -> its even and odd columns, [ROWS, D / 2] each."""
        return tl.split(tl.reshape(t, (ROWS, D // 2, 2)))

    @triton.jit
    def _interleave(even, odd, ROWS: tl.constexpr, D: tl.constexpr):
        """The inverse of `_pairs`."""
        return tl.reshape(tl.join(even, odd), (ROWS, D))

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr, rows, S, H, stride_xb, stride_xs,
                        eps, D: tl.constexpr, ROWS: tl.constexpr):
        """ROWS head rows (b, s, h) per program: x rows at b*stride_xb + s*stride_xs + h*D, out and rstd
        contiguous [B, S, H, D] and [B, S, H], tables [S, D]."""
        r, mask, b, s, h = _rows(ROWS, rows, S, H)
        x = _load_rows(x_ptr, stride_xb, stride_xs, b, s, h, mask, D)
        rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
        w = tl.load(w_ptr + tl.arange(0, D)).to(tl.float32)
        y0, y1 = _pairs((x * rstd[:, None] * w[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32), ROWS, D)
        c0, c1 = _pairs(_load_rows(cos_ptr, 0, D, 0, s, 0, mask, D), ROWS, D)
        s0, s1 = _pairs(_load_rows(sin_ptr, 0, D, 0, s, 0, mask, D), ROWS, D)
        out = _interleave(y0 * c0 - y1 * s0, y1 * c1 + y0 * s1, ROWS, D)
        tl.store(out_ptr + r[:, None] * D + tl.arange(0, D)[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask[:, None])
        tl.store(rstd_ptr + r, rstd, mask=mask)

    @triton.jit
    def _backward_kernel(g_ptr, x_ptr, w_ptr, cos_ptr, sin_ptr, rstd_ptr, gx_ptr, rows, S, H, stride_gb, stride_gs,
                         stride_xb, stride_xs, D: tl.constexpr, ROWS: tl.constexpr):
        """The input gradient of `_forward_kernel`'s rows: grad rows at b*stride_gb + s*stride_gs + h*D, gx
        contiguous [B, S, H, D]."""
        r, mask, b, s, h = _rows(ROWS, rows, S, H)
        g0, g1 = _pairs(_load_rows(g_ptr, stride_gb, stride_gs, b, s, h, mask, D), ROWS, D)
        c0, c1 = _pairs(_load_rows(cos_ptr, 0, D, 0, s, 0, mask, D), ROWS, D)
        s0, s1 = _pairs(_load_rows(sin_ptr, 0, D, 0, s, 0, mask, D), ROWS, D)
        w = tl.load(w_ptr + tl.arange(0, D)).to(tl.float32)
        gy = _interleave(g0 * c0 + g1 * s1, g1 * c1 - g0 * s0, ROWS, D) * w[None, :]
        rstd = tl.load(rstd_ptr + r, mask=mask, other=0.0)
        xhat = _load_rows(x_ptr, stride_xb, stride_xs, b, s, h, mask, D) * rstd[:, None]
        gx = rstd[:, None] * (gy - xhat * (tl.sum(gy * xhat, 1) / D)[:, None])
        tl.store(gx_ptr + r[:, None] * D + tl.arange(0, D)[None, :], gx.to(gx_ptr.dtype.element_ty),
                 mask=mask[:, None])


# Head rows per program and warps: among the fastest of ROWS 4-32 x 2-8 warps at 1024 px on an H200
# (bench/bench_norm_rope.py; bench/RESULTS.md, session 20): ~25 us per call forward and backward in the training step
# for a single block's q or k (28 MB each way), where Inductor's kernel for q and k together took 113 and 127 us.
_FORWARD_TILING = {"ROWS": 8, "num_warps": 2}
_BACKWARD_TILING = {"ROWS": 8, "num_warps": 4}


def _on_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels take x [B, S, H, D]: on CUDA (or on the CPU under Triton's interpreter,
    TRITON_INTERPRET=1, to check their indexing without a GPU; its fp32 -> bf16 casts truncate, so most values
    differ from the GPU's by a bf16 step), with D a power of two (a whole row is one Triton block)."""
    on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and on_device and x.shape[3] >= 2 and x.shape[3] & (x.shape[3] - 1) == 0


def _packed(x: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] with each token's heads packed (strides [., ., D, 1]; a slice of a wider GEMM output is),
    copied only if not."""
    return x if x.stride(3) == 1 and x.stride(2) == x.shape[3] else x.contiguous()


@torch.library.custom_op("fluxlora::rms_norm_rope", mutates_args=())
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S, H, D], weight [D], cos and sin [S, D] fp32 -> (out [B, S, H, D] contiguous, rstd [B, S, H] fp32):
    FLUX's q or k after its RMS norm and rotary embedding."""
    if not _on_triton(x):
        return reference(x, weight, cos, sin, eps)
    x = _packed(x)
    B, S, H, D = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty((B, S, H), dtype=torch.float32, device=x.device)
    rows = B * S * H
    grid = (triton.cdiv(rows, _FORWARD_TILING["ROWS"]),)
    _forward_kernel[grid](x, weight, cos.contiguous(), sin.contiguous(), out, rstd, rows, S, H, x.stride(0),
                          x.stride(1), eps, D=D, **_FORWARD_TILING)
    return out, rstd


@rms_norm_rope.register_fake
def _(x, weight, cos, sin, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(x.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fluxlora::rms_norm_rope_backward", mutates_args=())
def rms_norm_rope_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The input gradient of `rms_norm_rope` (grad and x [B, S, H, D]) -> [B, S, H, D] contiguous."""
    if not _on_triton(x):
        return reference_backward(grad, x, weight, cos, sin, rstd)
    x, grad = _packed(x), _packed(grad)
    B, S, H, D = x.shape
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = B * S * H
    grid = (triton.cdiv(rows, _BACKWARD_TILING["ROWS"]),)
    _backward_kernel[grid](grad, x, weight, cos.contiguous(), sin.contiguous(), rstd, gx, rows, S, H, grad.stride(0),
                           grad.stride(1), x.stride(0), x.stride(1), D=D, **_BACKWARD_TILING)
    return gx


@rms_norm_rope_backward.register_fake
def _(grad, x, weight, cos, sin, rstd):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, cos, sin, _ = inputs
    ctx.save_for_backward(x, weight, cos, sin, output[1])


def _backward(ctx, grad_out, grad_rstd):
    x, weight, cos, sin, rstd = ctx.saved_tensors
    return rms_norm_rope_backward(grad_out, x, weight, cos, sin, rstd), None, None, None, None


rms_norm_rope.register_autograd(_backward, setup_context=_setup_context)
