"""A Triton kernel for `fp8.quantize_rows` on CUDA: each row read once, into registers, for both its amax
and its quantization.

Compiled, the torch version became two kernels for the rows of the single blocks' proj_out input and MLP
gradient (15,360 and 12,288 values): one for the amax, one for the quantization, each recomputing the
GELU and concatenation that produce the row from their inputs; 258 us per block for the forward's, where
moving its bytes once takes ~75 us on an H200 (bench/RESULTS.md, session 11). Here the row comes from
memory (the bf16 input is materialised anyway: the LoRA's matmul and the backward read it) and the same
fp8 values and scales come out, to the bit.

Imported only where Triton is (CUDA builds of torch); `fp8.quantize_rows` falls back to torch ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, row_stride, K, BLOCK: tl.constexpr):
    """One program per row: x [row, :K] (unit stride) -> q [row, :K] e4m3, scale [row] fp32."""
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < K
    x = tl.load(x_ptr + row * row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    # IEEE divisions and round-to-nearest-even into e4m3, as torch's `(x.float() / scale).to(e4m3)`
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), 448.0)
    q = tl.clamp(tl.div_rn(x, scale), -448.0, 448.0)
    tl.store(q_ptr + row * K + offsets, q.to(tl.float8e4nv), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] on CUDA -> (q [M, K] e4m3 row-major, scale [M, 1] fp32); see `fp8.quantize_rows`."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, k = x.shape
    q = torch.empty((rows, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    # the whole row in registers: up to 32 fp32 values per thread (16 warps for FLUX's 12,288-15,360)
    _quantize_rows_kernel[(rows,)](x, q, scale, x.stride(0), k, BLOCK=block,
                                   num_warps=min(16, max(4, block // 1024)))
    return q, scale
