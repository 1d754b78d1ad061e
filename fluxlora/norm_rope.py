"""FLUX's q/k RMS norm followed by its rotary embedding, as one op with Triton kernels on CUDA.

diffusers' attention processor normalizes q and k per head (`torch.nn.RMSNorm`, frozen weight) and then applies
`apply_rotary_emb`, which rotates interleaved pairs (x[2i], x[2i+1]) by per-position angles. Inductor fuses the
two into one reduction per head row, but computes the rotation element by element, each value gathering its
partner through index arithmetic and re-reading the fp32 tables for each of the 24 heads: ~1 TB/s on an H200,
a quarter of its bandwidth (bench/RESULTS.md, session 19). These kernels read each row once, split it into its
pairs, and write the rotated row once. A double block normalizes its text and image streams' q (or k), each with
its own weight, and rotates their concatenation: the op takes the text stream as a `lead` and writes the whole.

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


def reference(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
              lead: torch.Tensor | None = None,
              lead_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S, H, D], weight [D], cos and sin [T + S, D] fp32, optionally lead [B, T, H, D] with its own weight
    -> (out [B, T + S, H, D] in x's dtype, rstd [B, T + S, H] fp32): `apply_rotary_emb(cat([RMSNorm(lead),
    RMSNorm(x)], 1), (cos, sin), sequence_dim=1)` as diffusers computes it (a double block's text stream leads)."""
    parts = [(x, weight)] if lead is None else [(lead, lead_weight), (x, weight)]
    rstd = torch.cat([torch.rsqrt(p.float().pow(2).mean(-1) + eps) for p, _ in parts], 1)
    y = torch.cat([(p.float() * r[..., None] * w.float()).to(x.dtype)
                   for (p, w), r in zip(parts, rstd.split([p.shape[1] for p, _ in parts], 1))], 1).float()
    real, imag = y.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], -1).flatten(-2)
    return (y * cos[:, None] + rotated * sin[:, None]).to(x.dtype), rstd


def reference_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, rstd: torch.Tensor, lead: torch.Tensor | None = None,
                       lead_weight: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The input gradients of `reference` (grad [B, T + S, H, D], rstd [B, T + S, H]) -> (lead's [B, T, H, D] or
    None, x's [B, S, H, D]) in x's dtype, computed in fp32: the rotation's transpose, then RMS norm's backward with
    a frozen weight."""
    g = grad.float()
    g0, g1 = g.unflatten(-1, (-1, 2)).unbind(-1)
    c0, c1 = cos[:, None].unflatten(-1, (-1, 2)).unbind(-1)
    s0, s1 = sin[:, None].unflatten(-1, (-1, 2)).unbind(-1)
    # out[2i] = y[2i] c[2i] - y[2i+1] s[2i];  out[2i+1] = y[2i+1] c[2i+1] + y[2i] s[2i+1]
    gy = torch.stack([g0 * c0 + g1 * s1, g1 * c1 - g0 * s0], -1).flatten(-2)
    parts = [(x, weight)] if lead is None else [(lead, lead_weight), (x, weight)]
    sizes = [p.shape[1] for p, _ in parts]
    grads = []
    for (p, w), gp, r in zip(parts, gy.split(sizes, 1), rstd.split(sizes, 1)):
        gw, xhat = gp * w.float(), p.float() * r[..., None]
        grads.append((r[..., None] * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))).to(x.dtype))
    return (None, grads[0]) if lead is None else (grads[0], grads[1])


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
    def _load_parts(x_ptr, stride_xb, stride_xs, lead_ptr, stride_lb, stride_ls, b, s, h, mask, T,
                    D: tl.constexpr, LEAD: tl.constexpr):
        """[ROWS, D] fp32: the rows of cat([lead, x], 1), lead's T tokens first (LEAD), or of x alone."""
        if LEAD:
            x = (_load_rows(lead_ptr, stride_lb, stride_ls, b, s, h, mask & (s < T), D)
                 + _load_rows(x_ptr, stride_xb, stride_xs, b, s - T, h, mask & (s >= T), D))
        else:
            x = _load_rows(x_ptr, stride_xb, stride_xs, b, s, h, mask, D)
        return x

    @triton.jit
    def _weights(w_ptr, lw_ptr, s, T, D: tl.constexpr, LEAD: tl.constexpr):
        """[ROWS, D] or [1, D] fp32: each row's norm weight, lead's for its T tokens (LEAD), x's for the rest."""
        d = tl.arange(0, D)
        w = tl.load(w_ptr + d).to(tl.float32)[None, :]
        if LEAD:
            w = tl.where((s < T)[:, None], tl.load(lw_ptr + d).to(tl.float32)[None, :], w)
        return w

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, lead_ptr, lw_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr, rows, S, T, H,
                        stride_xb, stride_xs, stride_lb, stride_ls, eps, D: tl.constexpr, ROWS: tl.constexpr,
                        LEAD: tl.constexpr):
        """ROWS head rows (b, s, h) of cat([lead, x], 1) per program, S tokens of which lead's T: x rows at
        b*stride_xb + (s - T)*stride_xs + h*D, lead's at b*stride_lb + s*stride_ls + h*D; out and rstd contiguous
        [B, S, H, D] and [B, S, H], tables [S, D]. Without a lead (LEAD false, T = 0) the lead's loads, weight
        and index arithmetic are compiled out: a single block's kernels are the plain ones."""
        r, mask, b, s, h = _rows(ROWS, rows, S, H)
        x = _load_parts(x_ptr, stride_xb, stride_xs, lead_ptr, stride_lb, stride_ls, b, s, h, mask, T, D, LEAD)
        rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
        y = x * rstd[:, None] * _weights(w_ptr, lw_ptr, s, T, D, LEAD)
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
        y0, y1 = _pairs(y, ROWS, D)
        c0, c1 = _pairs(_load_rows(cos_ptr, 0, D, 0, s, 0, mask, D), ROWS, D)
        s0, s1 = _pairs(_load_rows(sin_ptr, 0, D, 0, s, 0, mask, D), ROWS, D)
        out = _interleave(y0 * c0 - y1 * s0, y1 * c1 + y0 * s1, ROWS, D)
        tl.store(out_ptr + r[:, None] * D + tl.arange(0, D)[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask[:, None])
        tl.store(rstd_ptr + r, rstd, mask=mask)

    @triton.jit
    def _backward_kernel(g_ptr, x_ptr, w_ptr, lead_ptr, lw_ptr, cos_ptr, sin_ptr, rstd_ptr, gin_ptr, rows, S, T, H,
                         stride_gb, stride_gs, stride_xb, stride_xs, stride_lb, stride_ls, D: tl.constexpr,
                         ROWS: tl.constexpr, LEAD: tl.constexpr):
        """The input gradient of `_forward_kernel`'s rows, cat([lead, x], 1)'s, contiguous [B, S, H, D] in gin
        (stored at r * D as the forward stores out: an earlier form that scattered it into x's and the lead's own
        tensors took 45 us per call in the step against 25); grad rows at b*stride_gb + s*stride_gs + h*D."""
        r, mask, b, s, h = _rows(ROWS, rows, S, H)
        g0, g1 = _pairs(_load_rows(g_ptr, stride_gb, stride_gs, b, s, h, mask, D), ROWS, D)
        c0, c1 = _pairs(_load_rows(cos_ptr, 0, D, 0, s, 0, mask, D), ROWS, D)
        s0, s1 = _pairs(_load_rows(sin_ptr, 0, D, 0, s, 0, mask, D), ROWS, D)
        gy = _interleave(g0 * c0 + g1 * s1, g1 * c1 - g0 * s0, ROWS, D) * _weights(w_ptr, lw_ptr, s, T, D, LEAD)
        rstd = tl.load(rstd_ptr + r, mask=mask, other=0.0)
        x = _load_parts(x_ptr, stride_xb, stride_xs, lead_ptr, stride_lb, stride_ls, b, s, h, mask, T, D, LEAD)
        xhat = x * rstd[:, None]
        gin = rstd[:, None] * (gy - xhat * (tl.sum(gy * xhat, 1) / D)[:, None])
        tl.store(gin_ptr + r[:, None] * D + tl.arange(0, D)[None, :], gin.to(gin_ptr.dtype.element_ty),
                 mask=mask[:, None])


# Head rows per program and warps: among the fastest of ROWS 4-32 x 2-8 warps at 1024 px on an H200
# (bench/bench_norm_rope.py; bench/RESULTS.md, session 20): ~25 us per call forward and backward in the training step
# for a single block's q or k (28 MB each way), where Inductor's kernel for q and k together took 113 and 127 us. A
# double block's: 23 us forward, 42 us backward (session 22; why the backward is slower there is not known yet).
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
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                  lead: torch.Tensor | None = None,
                  lead_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S, H, D], weight [D], cos and sin [T + S, D] fp32, optionally lead [B, T, H, D] and its weight [D]
    -> (out [B, T + S, H, D] contiguous, rstd [B, T + S, H] fp32): FLUX's q or k after its RMS norm and rotary
    embedding, a single block's (no lead) or a double block's (the text stream's q or k leading)."""
    if not _on_triton(x):
        return reference(x, weight, cos, sin, eps, lead, lead_weight)
    x = _packed(x)
    B, S, H, D = x.shape
    lead, lead_weight = (x[:, :0], weight) if lead is None else (_packed(lead), lead_weight)
    T = lead.shape[1]
    out = torch.empty((B, T + S, H, D), dtype=x.dtype, device=x.device)
    rstd = torch.empty((B, T + S, H), dtype=torch.float32, device=x.device)
    rows = B * (T + S) * H
    grid = (triton.cdiv(rows, _FORWARD_TILING["ROWS"]),)
    _forward_kernel[grid](x, weight, lead, lead_weight, cos.contiguous(), sin.contiguous(), out, rstd, rows, T + S, T,
                          H, x.stride(0), x.stride(1), lead.stride(0), lead.stride(1), eps, D=D, LEAD=T > 0,
                          **_FORWARD_TILING)
    return out, rstd


@rms_norm_rope.register_fake
def _(x, weight, cos, sin, eps, lead=None, lead_weight=None):
    B, S, H, D = x.shape
    T = 0 if lead is None else lead.shape[1]
    return x.new_empty((B, T + S, H, D)), x.new_empty((B, T + S, H), dtype=torch.float32)


@torch.library.custom_op("fluxlora::rms_norm_rope_backward", mutates_args=())
def rms_norm_rope_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, rstd: torch.Tensor, lead: torch.Tensor | None = None,
                           lead_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The input gradient of `rms_norm_rope` (grad [B, T + S, H, D]) -> cat([lead's, x's], 1) [B, T + S, H, D]
    contiguous (T = 0 without a lead)."""
    if not _on_triton(x):
        g_lead, gx = reference_backward(grad, x, weight, cos, sin, rstd, lead, lead_weight)
        return gx if g_lead is None else torch.cat([g_lead, gx], 1)
    x, grad = _packed(x), _packed(grad)
    B, S, H, D = x.shape
    lead, lead_weight = (x[:, :0], weight) if lead is None else (_packed(lead), lead_weight)
    T = lead.shape[1]
    gin = torch.empty((B, T + S, H, D), dtype=x.dtype, device=x.device)
    rows = B * (T + S) * H
    grid = (triton.cdiv(rows, _BACKWARD_TILING["ROWS"]),)
    _backward_kernel[grid](grad, x, weight, lead, lead_weight, cos.contiguous(), sin.contiguous(), rstd, gin, rows,
                           T + S, T, H, grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), lead.stride(0),
                           lead.stride(1), D=D, LEAD=T > 0, **_BACKWARD_TILING)
    return gin


@rms_norm_rope_backward.register_fake
def _(grad, x, weight, cos, sin, rstd, lead=None, lead_weight=None):
    return x.new_empty(grad.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, cos, sin, _, lead, lead_weight = inputs
    ctx.lead_tokens = None if lead is None else lead.shape[1]
    ctx.save_for_backward(x, weight, cos, sin, output[1], lead, lead_weight)


def _backward(ctx, grad_out, grad_rstd):
    x, weight, cos, sin, rstd, lead, lead_weight = ctx.saved_tensors
    gin = rms_norm_rope_backward(grad_out, x, weight, cos, sin, rstd, lead, lead_weight)
    if ctx.lead_tokens is None:
        return gin, None, None, None, None, None, None
    return gin[:, ctx.lead_tokens:], None, None, None, None, gin[:, :ctx.lead_tokens], None


rms_norm_rope.register_autograd(_backward, setup_context=_setup_context)
