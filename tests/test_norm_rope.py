"""The fused q/k RMS norm + rotary embedding op, for a single block's q (no lead) and a double block's (the text
stream's q leading the image stream's): its torch formula against diffusers' modules, its gradients against fp64
autograd, its registrations, and on a GPU its Triton kernels against the formula."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from fluxlora import norm_rope

EPS = 1e-6


@dataclass
class Case:
    """x [B, S, H, D] and, for a double block, lead [B, T, H, D], each with its own norm weight [D]; rotary tables
    [T + S, D] fp32; an output gradient [B, T + S, H, D]."""
    x: torch.Tensor
    weight: torch.Tensor
    lead: torch.Tensor | None
    lead_weight: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    grad: torch.Tensor

    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.x, self.weight)] if self.lead is None else [(self.lead, self.lead_weight), (self.x, self.weight)]


def case(device: str = "cpu", tokens: int = 24, lead_tokens: int = 0, heads: int = 4, dim: int = 16, batch: int = 2,
         flux_tables: bool = True) -> Case:
    """x and lead bf16, each a slice of a wider GEMM output (row stride 3 H D), and the gradient laid out as
    attention's backward gives it ([B, H, S, D] transposed). The tables are FLUX's for random positions (each
    pair's two entries equal), or with `flux_tables=False` random values, so that a formula that takes one pair
    entry for the other fails."""
    gen = torch.Generator().manual_seed(0)

    def slice_of_gemm_output(n: int) -> torch.Tensor:
        wide = torch.randn(batch, n, 3 * heads * dim, generator=gen) * 3
        return wide.bfloat16()[..., heads * dim:2 * heads * dim].unflatten(-1, (heads, dim)).to(device)

    def weight() -> torch.Tensor:
        return (torch.rand(dim, generator=gen) + 0.5).bfloat16().to(device)

    x, x_weight = slice_of_gemm_output(tokens), weight()
    lead, lead_weight = (slice_of_gemm_output(lead_tokens), weight()) if lead_tokens else (None, None)
    total = lead_tokens + tokens
    ids = torch.randint(0, 64, (total, 3), generator=gen).float()
    axes = (dim // 8, 3 * dim // 8, dim // 2)  # FLUX's (16, 56, 56) for 128, scaled down
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)
    if not flux_tables:
        cos, sin = (torch.rand(total, dim, generator=gen) * 2 - 1 for _ in range(2))
    grad = torch.randn(batch, heads, total, dim, generator=gen).bfloat16().to(device).transpose(1, 2)
    return Case(x, x_weight, lead, lead_weight, cos.to(device), sin.to(device), grad)


def diffusers_q(c: Case, parts: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """What FLUX's attention processor computes for q: each stream through its torch.nn.RMSNorm (the module FLUX
    builds), the text stream first, then `apply_rotary_emb(..., sequence_dim=1)`; `parts` in place of the case's
    tensors (with their weights), all in `dtype` if given."""
    normed = []
    for x, weight in parts or c.parts():
        norm = torch.nn.RMSNorm(x.shape[-1], eps=EPS).to(x.device, dtype or weight.dtype).requires_grad_(False)
        norm.weight.copy_(weight)
        normed.append(norm(x.to(dtype) if dtype else x))
    tables = (c.cos.double(), c.sin.double()) if dtype == torch.float64 else (c.cos, c.sin)
    return apply_rotary_emb(torch.cat(normed, 1), tables, sequence_dim=1)


def autograd_gradients(c: Case, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The input gradients of `diffusers_q` (lead's first), computed by autograd in `dtype` (x's if None)."""
    inputs = [(x.detach().to(dtype or x.dtype).requires_grad_(), w) for x, w in c.parts()]
    diffusers_q(c, inputs, dtype).backward(c.grad.to(dtype or c.grad.dtype))
    return [x.grad for x, _ in inputs]


def op_gradients(c: Case) -> list[torch.Tensor]:
    """The input gradients of the op (lead's first) through its autograd registration."""
    x = c.x.detach().requires_grad_()
    lead = None if c.lead is None else c.lead.detach().requires_grad_()
    out, _ = norm_rope.rms_norm_rope(x, c.weight, c.cos, c.sin, EPS, lead, c.lead_weight)
    out.backward(c.grad)
    return [x.grad] if lead is None else [lead.grad, x.grad]


CASES = [pytest.param({}, id="single"), pytest.param({"tokens": 16, "lead_tokens": 8}, id="double")]


@pytest.mark.parametrize("flux_tables", [True, False])
@pytest.mark.parametrize("shape", CASES)
def test_formula_is_diffusers_to_the_bit(shape, flux_tables):
    c = case(**shape, flux_tables=flux_tables)
    out, rstd = norm_rope.reference(c.x, c.weight, c.cos, c.sin, EPS, c.lead, c.lead_weight)
    total = c.grad.shape[1]
    assert out.dtype == torch.bfloat16 and out.shape == c.grad.shape and rstd.shape == (2, total, 4)
    assert torch.equal(out, diffusers_q(c))
    joint = torch.cat([x for x, _ in c.parts()], 1)
    torch.testing.assert_close(rstd, joint.float().pow(2).mean(-1).add(EPS).rsqrt())


@pytest.mark.parametrize("shape", CASES)
def test_gradient_formula_is_exact_and_closer_to_fp64_than_bf16_autograd(shape):
    """In fp64 the formula is autograd's gradient (a sign, a table entry, a stream's weight or the norm's term off
    is off by O(1)); in bf16 it is no further from the fp64 gradient than diffusers' own bf16 backward."""
    c = case(**shape, flux_tables=False)
    truth = autograd_gradients(c, torch.float64)
    c64 = Case(*(None if t is None else t.double() for t in (c.x, c.weight, c.lead, c.lead_weight, c.cos, c.sin,
                                                               c.grad)))
    rstd64 = torch.cat([x.pow(2).mean(-1).add(EPS).rsqrt() for x, _ in c64.parts()], 1)
    exact = norm_rope.reference_backward(c64.grad, c64.x, c64.weight, c64.cos, c64.sin, rstd64, c64.lead,
                                         c64.lead_weight)
    assert (exact[0] is None) == (c.lead is None)
    for ours, expected in zip([g for g in exact if g is not None], truth):
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)

    _, rstd = norm_rope.reference(c.x, c.weight, c.cos, c.sin, EPS, c.lead, c.lead_weight)
    grads = norm_rope.reference_backward(c.grad, c.x, c.weight, c.cos, c.sin, rstd, c.lead, c.lead_weight)
    for ours, theirs, expected in zip([g for g in grads if g is not None], autograd_gradients(c), truth):
        assert ours.dtype == torch.bfloat16
        assert (ours.double() - expected).abs().max() <= (theirs.double() - expected).abs().max()


@pytest.mark.parametrize("shape", CASES)
def test_op_registrations(shape):
    """Fake tensors, autograd and schema as torch.compile uses them; the op's gradients are its formula's."""
    c = case(**shape)
    lead = None if c.lead is None else c.lead.detach().requires_grad_()
    torch.library.opcheck(norm_rope.rms_norm_rope,
                          (c.x.detach().requires_grad_(), c.weight, c.cos, c.sin, EPS, lead, c.lead_weight))
    _, rstd = norm_rope.reference(c.x, c.weight, c.cos, c.sin, EPS, c.lead, c.lead_weight)
    expected = norm_rope.reference_backward(c.grad, c.x, c.weight, c.cos, c.sin, rstd, c.lead, c.lead_weight)
    for got, want in zip(op_gradients(c), [g for g in expected if g is not None], strict=True):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [pytest.param({"tokens": 4608}, id="single"),
                                   pytest.param({"tokens": 4096, "lead_tokens": 512}, id="double")])
def test_triton_kernels_match_the_formula_at_flux_shapes(shape):
    """1024 px: 4608 tokens x 24 heads x 128 (a double block's 512 text tokens leading), q a slice of the fused GEMM
    output, the gradient transposed, tables whose pair entries differ. The forward as diffusers' but for rare values
    whose bf16 rounding of the normed row flips (rstd's fp32 sum runs in another order): a wrong index, sign or
    weight is off on most values of a stream, by O(1). The gradients no further from fp64 than diffusers' bf16
    backward."""
    c = case("cuda", **shape, heads=24, dim=128, batch=1, flux_tables=False)
    out, rstd = norm_rope.rms_norm_rope(c.x, c.weight, c.cos, c.sin, EPS, c.lead, c.lead_weight)
    expected = diffusers_q(c)
    assert (out != expected).float().mean() < 1e-3
    assert (out.float() - expected.float()).abs().max() <= 2 ** -4
    joint = torch.cat([x for x, _ in c.parts()], 1)
    torch.testing.assert_close(rstd, joint.float().pow(2).mean(-1).add(EPS).rsqrt())
    for ours, theirs, truth in zip(op_gradients(c), autograd_gradients(c), autograd_gradients(c, torch.float64),
                                   strict=True):
        ours, theirs = (ours.double() - truth).abs(), (theirs.double() - truth).abs()
        assert ours.mean() <= theirs.mean() and ours.max() <= 1.5 * theirs.max(), (ours.mean(), theirs.mean(),
                                                                                    ours.max(), theirs.max())
