"""Microseconds per call of `fluxlora.norm_rope`'s Triton kernels, every tiling, beside compiled diffusers (FLUX's
torch.nn.RMSNorm then `apply_rotary_emb`), for one q at 1024 px: 4608 tokens x 24 heads x 128, bf16, slices of the
fused q/k/v/MLP GEMM output (row stride 21504); a single block's, then a double block's (512 text tokens leading).
One JSON line per row; the values beside eager diffusers' and the gradient's error against fp64 last.

    python bench/bench_norm_rope.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402

from fluxlora import norm_rope  # noqa: E402

S, H, D, WIDE = 4608, 24, 128, 21504


def timed_us(fn, calls: int = 200) -> float:
    """Mean microseconds per call of `fn` over `calls` back-to-back launches, after 5 warm-up calls."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1e3


def slice_of_gemm_output(tokens: int, gen: torch.Generator) -> torch.Tensor:
    """[1, tokens, H, D] bf16 with the fused q/k/v/MLP GEMM output's row stride."""
    wide = torch.randn(1, tokens, WIDE, device="cuda", generator=gen, dtype=torch.bfloat16) * 3
    return wide[..., H * D:2 * H * D].unflatten(-1, (H, D))


def main() -> None:
    gen = torch.Generator("cuda").manual_seed(0)
    weight = (torch.rand(D, device="cuda", generator=gen) + 0.5).to(torch.bfloat16)
    angles = torch.rand(S, D // 2, device="cuda", generator=gen) * 6
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)  # FLUX's layout
    grad = torch.randn(1, S, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    norm = torch.nn.RMSNorm(D, eps=1e-6).to("cuda", torch.bfloat16).requires_grad_(False)
    norm.weight.copy_(weight)
    x = slice_of_gemm_output(S, gen)
    moved_mb = 2 * x.numel() * x.element_size() / 1e6  # the forward reads x and writes out; the backward 1.5x that

    compiled = torch.compile(lambda t: apply_rotary_emb(norm(t), (cos, sin), sequence_dim=1), fullgraph=True)
    with torch.no_grad():
        us = timed_us(lambda: compiled(x))
    print(json.dumps({"row": "compiled diffusers, single block", "forward_us": round(us, 1),
                      "forward_tb_s": round(moved_mb / us, 2)}))

    # a single block's q (no lead), then a double block's: 512 text tokens leading 4096 image tokens
    for block, text in (("single", 0), ("double", 512)):
        main_x = x[:, text:]
        lead = slice_of_gemm_output(text, gen) if text else main_x[:, :0]
        out, rstd = norm_rope.rms_norm_rope(main_x, weight, cos, sin, 1e-6, lead if text else None, weight)
        rows = S * H
        for per_program in (4, 8, 16, 32):
            for warps in (2, 4, 8):
                o, r = torch.empty_like(out), torch.empty_like(rstd)
                gin = torch.empty_like(out)
                grid = (-(-rows // per_program),)
                tiling = {"ROWS": per_program, "num_warps": warps}

                def forward(o=o, r=r, tiling=tiling, main_x=main_x, lead=lead):
                    norm_rope._forward_kernel[grid](main_x, weight, lead, weight, cos, sin, o, r, rows, S,
                                                    lead.shape[1], H, main_x.stride(0), main_x.stride(1),
                                                    lead.stride(0), lead.stride(1), 1e-6, D=D, LEAD=text > 0, **tiling)

                def backward(gin=gin, tiling=tiling, main_x=main_x, lead=lead):
                    norm_rope._backward_kernel[grid](grad, main_x, weight, lead, weight, cos, sin, rstd, gin, rows, S,
                                                     lead.shape[1], H, grad.stride(0), grad.stride(1), main_x.stride(0),
                                                     main_x.stride(1), lead.stride(0), lead.stride(1), D=D,
                                                     LEAD=text > 0, **tiling)

                fwd, bwd = timed_us(forward), timed_us(backward)
                print(json.dumps({"row": f"triton, {block} block", **tiling,
                                  "chosen": tiling in (norm_rope._FORWARD_TILING, norm_rope._BACKWARD_TILING),
                                  "forward_us": round(fwd, 1), "forward_tb_s": round(moved_mb / fwd, 2),
                                  "backward_us": round(bwd, 1), "backward_tb_s": round(1.5 * moved_mb / bwd, 2)}))

    out, rstd = norm_rope.rms_norm_rope(x, weight, cos, sin, 1e-6)
    gx = norm_rope.rms_norm_rope_backward(grad, x, weight, cos, sin, rstd)
    eager_x = x.detach().clone().requires_grad_()
    eager = apply_rotary_emb(norm(eager_x), (cos, sin), sequence_dim=1)
    eager.backward(grad)
    x64 = x.double().requires_grad_()
    norm64 = torch.nn.RMSNorm(D, eps=1e-6).to("cuda", torch.float64).requires_grad_(False)
    norm64.weight.copy_(weight.double())
    apply_rotary_emb(norm64(x64), (cos.double(), sin.double()), sequence_dim=1).backward(grad.double())
    errors = {"ours": (gx.double() - x64.grad).abs(), "eager diffusers": (eager_x.grad.double() - x64.grad).abs()}
    print(json.dumps({"row": "values, single block", "forward_values_unlike_eager": int((out != eager).sum()),
                      "of": out.numel(), "forward_max_diff": (out.float() - eager.float()).abs().max().item(),
                      "grad_max_err_vs_fp64": {k: e.max().item() for k, e in errors.items()},
                      "grad_mean_err_vs_fp64": {k: e.mean().item() for k, e in errors.items()}}))

if __name__ == "__main__":
    main()
