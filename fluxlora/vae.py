"""The VAE encoder as precompute runs it on a GPU: diffusers' AutoencoderKL, with two of its kernels replaced.

In eager mode most of the encoder's time is memory traffic, not arithmetic (kernel profile, 1024 px,
bf16, bench/RESULTS.md session 6): GroupNorm 19%, a separate SiLU after each GroupNorm, a separate bias
add after each convolution 15%, and the mid-block's single-head attention (head size 512, which only
SDPA's memory-efficient kernel accepts, at ~120 TFLOP/s) 15%. Compiling the whole encoder fuses all of
it but costs ~24 s per bucket shape. Here:
- each GroupNorm that a SiLU follows becomes one compiled GroupNorm+SiLU (one compile with dynamic
  shapes serves every bucket); where a convolution feeds it directly, the convolution's bias is added
  inside it instead of in a kernel of its own;
- the mid-block attention computes its scores as one fp32 GEMM per image, softmax in place, and the
  values as a bf16 GEMM, instead of the memory-efficient kernel.
Both compute what diffusers computes, to bf16 rounding.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def group_norm_silu(x: torch.Tensor, in_bias: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                    groups: int, eps: float) -> torch.Tensor:
    """SiLU(GroupNorm(x + in_bias)).

    Args:
        x: [B, C, H, W].
        in_bias: [C] or None: the bias of the convolution that produced x.
        weight, bias: [C], the GroupNorm's affine parameters.
    """
    if in_bias is not None:
        x = x + in_bias.view(-1, 1, 1)
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


class GroupNormSiLU(nn.Module):
    """A GroupNorm, the SiLU after it, and optionally the bias of the convolution before it, as one call of
    `fn` (group_norm_silu, or its compiled form). Keeps the GroupNorm's parameters under `norm`."""

    def __init__(self, norm: nn.GroupNorm, in_bias: nn.Parameter | None, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.norm, self.in_bias, self.fn = norm, in_bias, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.in_bias, self.norm.weight, self.norm.bias, self.norm.num_groups, self.norm.eps)


class FP32ScoresAttnProcessor:
    """diffusers' AttnProcessor2_0 for the VAE's single-head spatial self-attention (no mask, no spatial
    norm), with attention as two GEMMs per image: scores q k^T / sqrt(d) in fp32 [HW, HW], softmax in
    place, then the probabilities in the values' dtype times v. At 1024 px (16,384 tokens) the scores take
    1 GiB per image."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.heads != 1:
            raise ValueError("FP32ScoresAttnProcessor serves single-head self-attention without a mask")
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        tokens = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # [B, HW, C]
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        out = torch.empty_like(value)
        for i in range(batch):  # one image's fp32 scores at a time: [1, HW, HW]
            q, k = query[i:i + 1], key[i:i + 1].transpose(1, 2)
            scores = (torch.bmm(q, k, out_dtype=torch.float32) if q.is_cuda else torch.bmm(q.float(), k.float()))
            scores.mul_(key.shape[-1] ** -0.5)  # SDPA's default scale, head size = inner dim
            torch.softmax(scores, -1, out=scores)
            torch.bmm(scores.to(value.dtype), value[i:i + 1], out=out[i:i + 1])
        hidden_states = attn.to_out[1](attn.to_out[0](out))
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def fuse_encoder(vae: Any, compile: bool) -> None:
    """Replace, in place, `vae.encoder`'s GroupNorm+SiLU pairs by GroupNormSiLU and its mid-block attention's
    processor by FP32ScoresAttnProcessor. `compile`: run group_norm_silu compiled (CUDA); else eager, which
    only moves the work (for tests on the CPU). The decoder is left as it is."""
    fn = torch.compile(group_norm_silu, dynamic=True) if compile else group_norm_silu
    encoder = vae.encoder
    resnets = [r for block in encoder.down_blocks for r in block.resnets] + list(encoder.mid_block.resnets)
    for resnet in resnets:
        plain = (isinstance(resnet.nonlinearity, nn.SiLU) and resnet.time_emb_proj is None
                 and resnet.upsample is None and resnet.downsample is None)
        if not plain:  # another layout than FLUX's VAE: leave it to diffusers
            continue
        resnet.norm1 = GroupNormSiLU(resnet.norm1, None, fn)
        # conv1 feeds norm2 directly (no time embedding): its bias moves into the fused kernel
        resnet.norm2 = GroupNormSiLU(resnet.norm2, resnet.conv1.bias, fn)
        resnet.conv1.bias = None
        resnet.nonlinearity = nn.Identity()
    if isinstance(encoder.conv_act, nn.SiLU):
        encoder.conv_norm_out = GroupNormSiLU(encoder.conv_norm_out, None, fn)
        encoder.conv_act = nn.Identity()
    for attn in encoder.mid_block.attentions:
        if attn is not None and attn.heads == 1:
            attn.set_processor(FP32ScoresAttnProcessor())
