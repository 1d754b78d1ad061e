"""The fused q/k RMS norm + rotary embedding op: its torch formula against diffusers' modules, its gradient
against fp64 autograd, its registrations, and on a GPU its Triton kernels against the formula."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from fluxlora import norm_rope

EPS = 1e-6


def inputs(device: str = "cpu", tokens: int = 24, heads: int = 4, dim: int = 16, batch: int = 2,
           flux_tables: bool = True):
    """x [B, S, H, D] bf16 as a slice of a wider GEMM output (row stride 3 H D), a norm weight, rotary tables
    [S, D] fp32 and an output gradient laid out as attention's backward gives it ([B, H, S, D] transposed).
    The tables are FLUX's for random positions (each pair's two entries equal), or with `flux_tables=False`
    random values, so that a formula that takes one pair entry for the other fails."""
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(batch, tokens, 3 * heads * dim, generator=gen) * 3
    x = wide.bfloat16()[..., heads * dim:2 * heads * dim].unflatten(-1, (heads, dim)).to(device)
    weight = (torch.rand(dim, generator=gen) + 0.5).bfloat16().to(device)
    ids = torch.randint(0, 64, (tokens, 3), generator=gen).float()
    axes = (dim // 8, 3 * dim // 8, dim // 2)  # FLUX's (16, 56, 56) for 128, scaled down
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)
    if not flux_tables:
        cos, sin = (torch.rand(tokens, dim, generator=gen) * 2 - 1 for _ in range(2))
    cos, sin = cos.to(device), sin.to(device)
    grad = torch.randn(batch, heads, tokens, dim, generator=gen).bfloat16().to(device).transpose(1, 2)
    return x, weight, cos, sin, grad


def diffusers_q(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """What FLUX's attention processor computes for q: torch.nn.RMSNorm (the module FLUX builds), then
    `apply_rotary_emb(..., sequence_dim=1)`, in x's dtype."""
    norm = torch.nn.RMSNorm(x.shape[-1], eps=EPS).to(x.device, weight.dtype)
    norm.weight.data.copy_(weight)
    norm.weight.requires_grad_(False)
    return apply_rotary_emb(norm(x), (cos, sin), sequence_dim=1)


def fp64_gradient(x, weight, cos, sin, grad) -> torch.Tensor:
    """The input gradient of `diffusers_q` computed in fp64."""
    x64 = x.double().requires_grad_()
    diffusers_q(x64, weight.double(), cos.double(), sin.double()).backward(grad.double())
    return x64.grad


@pytest.mark.parametrize("flux_tables", [True, False])
def test_formula_is_diffusers_to_the_bit(flux_tables):
    x, weight, cos, sin, _ = inputs(flux_tables=flux_tables)
    out, rstd = norm_rope.reference(x, weight, cos, sin, EPS)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and rstd.shape == x.shape[:3]
    assert torch.equal(out, diffusers_q(x, weight, cos, sin))
    torch.testing.assert_close(rstd, x.float().pow(2).mean(-1).add(EPS).rsqrt())


def test_gradient_formula_is_exact_and_closer_to_fp64_than_bf16_autograd():
    """In fp64 the formula is autograd's gradient (a sign, a table entry or the norm's term off is off by O(1));
    in bf16 it is no further from the fp64 gradient than diffusers' own bf16 backward."""
    x, weight, cos, sin, grad = inputs(flux_tables=False)
    truth = fp64_gradient(x, weight, cos, sin, grad)
    x64 = x.double()
    rstd64 = x64.pow(2).mean(-1).add(EPS).rsqrt()
    exact = norm_rope.reference_backward(grad.double(), x64, weight.double(), cos.double(), sin.double(), rstd64)
    torch.testing.assert_close(exact.double(), truth, rtol=1e-5, atol=1e-5)

    _, rstd = norm_rope.reference(x, weight, cos, sin, EPS)
    ours = norm_rope.reference_backward(grad, x, weight, cos, sin, rstd)
    xb = x.clone().requires_grad_()
    diffusers_q(xb, weight, cos, sin).backward(grad)
    assert ours.dtype == torch.bfloat16
    assert (ours.double() - truth).abs().max() <= (xb.grad.double() - truth).abs().max()


def test_op_registrations():
    """Fake tensors, autograd and schema as torch.compile uses them; the op's gradient is its formula's."""
    x, weight, cos, sin, grad = inputs()
    x = x.detach().requires_grad_()
    torch.library.opcheck(norm_rope.rms_norm_rope, (x, weight, cos, sin, EPS))
    out, _ = norm_rope.rms_norm_rope(x, weight, cos, sin, EPS)
    out.backward(grad)
    _, rstd = norm_rope.reference(x.detach(), weight, cos, sin, EPS)
    assert torch.equal(x.grad, norm_rope.reference_backward(grad, x.detach(), weight, cos, sin, rstd))


@pytest.mark.gpu
def test_triton_kernels_match_the_formula_at_flux_shapes():
    """1024 px single block: 4608 tokens x 24 heads x 128, q a slice of the fused GEMM output, the gradient
    transposed, tables whose pair entries differ. The forward as diffusers' but for rare values whose bf16 rounding
    of the normed row flips (rstd's fp32 sum runs in another order): a wrong index or sign is off on most values,
    by O(1). The gradient no further from fp64 than diffusers' bf16 backward."""
    x, weight, cos, sin, grad = inputs("cuda", tokens=4608, heads=24, dim=128, batch=1, flux_tables=False)
    x = x.detach().requires_grad_()
    out, rstd = norm_rope.rms_norm_rope(x, weight, cos, sin, EPS)
    expected = diffusers_q(x.detach(), weight, cos, sin)
    assert (out != expected).float().mean() < 1e-3
    assert (out.float() - expected.float()).abs().max() <= 2 ** -4
    torch.testing.assert_close(rstd, x.detach().float().pow(2).mean(-1).add(EPS).rsqrt())
    out.backward(grad)
    truth = fp64_gradient(x.detach(), weight, cos, sin, grad)
    xb = x.detach().clone().requires_grad_()
    diffusers_q(xb, weight, cos, sin).backward(grad)
    ours, theirs = (x.grad.double() - truth).abs(), (xb.grad.double() - truth).abs()
    assert ours.mean() <= theirs.mean() and ours.max() <= 1.5 * theirs.max(), (ours.mean(), theirs.mean(),
                                                                                ours.max(), theirs.max())
