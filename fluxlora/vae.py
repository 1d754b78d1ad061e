"""The VAE encoder as precompute runs it on a GPU: diffusers' AutoencoderKL with the mid-block attention as
two GEMMs per image.

FLUX's VAE attends once, in the mid-block, over every latent position (16,384 tokens at 1024 px) with a
single head of size 512. Only SDPA's memory-efficient kernel accepts that head size, at ~120 TFLOP/s:
4.6 ms per image on an H100. An fp32 GEMM for the scores, softmax in place and a bf16 GEMM for the values
take ~2.9 ms, to the same error against an fp32 encoder (bench/RESULTS.md, session 7). The rest of the
encoder stays as diffusers runs it: a GroupNorm+SiLU fused by torch.compile ran no faster (session 7), and
compiling the whole encoder costs ~24 s per bucket shape (session 5).
"""
from __future__ import annotations

from typing import Any

import torch


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


def use_fp32_score_attention(vae: Any) -> None:
    """Give the single-head attentions of `vae.encoder`'s mid-block an FP32ScoresAttnProcessor (in place).
    The decoder keeps diffusers' processors."""
    for attn in vae.encoder.mid_block.attentions:
        if attn is not None and attn.heads == 1:
            attn.set_processor(FP32ScoresAttnProcessor())
