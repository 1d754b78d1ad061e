"""FLUX.1-dev's full architecture with random weights, for benchmarks (speed does not depend on them).

Sizes follow the published configs: the transformer's diffusers defaults (FLUX.1-dev), the 16-channel
VAE, CLIP ViT-L/14's text model and T5 v1.1 XXL's encoder. The tokenizers are the tiny ones built in
code (their ids fit the real vocabularies); text speed depends on the padded length, not the words.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from fluxlora.tiny import SCHEDULER_CONFIGS, build_clip_tokenizer, build_t5_tokenizer

VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
           latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
           use_quant_conv=False, use_post_quant_conv=False)
CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
          feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)


def _random(build, device: str, dtype: torch.dtype):
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(torch.float32)


def random_transformer(device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> FluxTransformer2DModel:
    return _random(lambda: FluxTransformer2DModel(guidance_embeds=True), device, dtype).requires_grad_(False)


def random_pipeline(device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                    transformer: bool = True) -> FluxPipeline:
    """A FluxPipeline of full-size random components on `device` (transformer optional)."""
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    clip_cfg = CLIPTextConfig(**CLIP, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                              pad_token_id=clip_tok.pad_token_id)
    t5_cfg = T5Config(**T5, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                      decoder_start_token_id=t5_tok.pad_token_id)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS["dev"]),
        vae=_random(lambda: AutoencoderKL(**VAE), device, dtype),
        text_encoder=_random(lambda: CLIPTextModel(clip_cfg), device, dtype), tokenizer=clip_tok,
        text_encoder_2=_random(lambda: T5EncoderModel(t5_cfg), device, dtype), tokenizer_2=t5_tok,
        transformer=random_transformer(device, dtype) if transformer else None)


def save_without_transformer(folder: Path, device: str = "cuda") -> Path:
    """The diffusers layout precompute reads: every component but the transformer's weights (its
    config.json stays, so the model is recognised as dev)."""
    pipe = random_pipeline(device, transformer=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    with torch.device("meta"):  # config only: precompute never loads the transformer's weights
        FluxTransformer2DModel(guidance_embeds=True).save_config(folder / "transformer")
    return folder
