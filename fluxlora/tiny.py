"""A randomly initialised FLUX.1 pipeline with FLUX's real geometry and tiny widths.

`build_tiny_flux` writes a folder in the diffusers layout (model_index.json, transformer/, vae/,
text_encoder/ (CLIP), text_encoder_2/ (T5), tokenizer/, tokenizer_2/, scheduler/) that
`FluxPipeline.from_pretrained` loads offline. It keeps everything that code paths depend on --
16 latent channels, 8x VAE downsampling, 2x2 latent packing (transformer in_channels 64), the VAE
scaling/shift factors, guidance embedding for dev only, CLIP padded to 77 tokens, the real
schedulers -- and shrinks only widths, depths and vocabularies, so training and sampling code written
against it runs unchanged on the real checkpoints.

    python -m fluxlora.tiny OUT_DIR [--variant dev|schnell] [--seed N]
"""

from __future__ import annotations

import argparse
import string
from collections import Counter
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

Variant = Literal["dev", "schnell"]
VARIANTS: tuple[str, ...] = ("dev", "schnell")

# Text widths. The transformer's joint_attention_dim must equal the T5 d_model (it embeds the T5
# token states) and pooled_projection_dim must equal the CLIP hidden size (it embeds CLIP's pooled
# output).
T5_D_MODEL = 32
CLIP_HIDDEN_SIZE = 32

# 2 double-stream + 2 single-stream blocks with 4 heads of 16: LoRA overfits measurably better on
# this than on 1+1 blocks with 2 heads (shared/notes/environment.md), and it still builds in
# about a second. axes_dims_rope must sum to attention_head_dim.
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels x 2 x 2 packing
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": T5_D_MODEL,
    "pooled_projection_dim": CLIP_HIDDEN_SIZE,
    "axes_dims_rope": [4, 4, 8],
}
"""FluxTransformer2DModel kwargs without guidance_embeds (see `transformer_config`)."""

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    # Four blocks -> three downsamplings -> 8x, as in FLUX's autoencoder.
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 8, 8],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
"""AutoencoderKL kwargs: FLUX.1's VAE geometry and latent normalisation, 8-channel blocks."""

CLIP_MAX_LENGTH = 77
"""CLIP token length; FluxPipeline pads CLIP prompts to tokenizer.model_max_length."""

T5_MODEL_MAX_LENGTH = 512
"""tokenizer_2.model_max_length in both real FLUX.1 repositories."""


# FLUX.1-dev/scheduler/scheduler_config.json and FLUX.1-schnell/scheduler/scheduler_config.json.
# Both carry the same dynamic-shift parameters; schnell switches dynamic shifting off and uses a
# static shift of 1 (no shift), dev shifts the schedule by resolution.
SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "dev": {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
    "schnell": {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
}

# Whole-word pieces for both tokenizers, so captions that differ by a word differ in token ids
# (and usually in length). Words not listed still tokenize, character by character.
VOCAB_WORDS: tuple[str, ...] = tuple(
    """
    a an the and or with without of in on at above below under over inside outside near next to
    behind between beside around through from into by for is are this that it its
    one two three four five six seven eight nine ten many some few several
    red orange yellow green blue purple pink brown black white gray grey gold silver dark light
    bright pale small large big tall tiny huge short long round flat empty full old new
    circle circles square squares triangle triangles star stars line lines stripe stripes
    dot dots ring rings shape shapes pattern checkerboard grid spiral diamond
    background foreground sky sea ocean water lake river sun moon cloud clouds rain snow
    hill hills mountain mountains field grass tree trees forest flower flowers leaf leaves
    house houses roof door window wall road bridge tower lighthouse boat ship car trunk
    bird birds fish cat dog horse person man woman child face
    night day morning evening sunset sunrise setting rising flying floating standing sitting
    photo photograph picture painting drawing image illustration style art portrait landscape
    scene view close up top bottom left right center middle corner edge side horizontal vertical
    sks tok ohwx trigger
    """.split()
)

_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's fixed ids 0, 1, 2
_CHARS = string.ascii_lowercase + string.digits + string.punctuation
_EOW = "</w>"  # CLIP's end-of-word suffix


def transformer_config(variant: Variant = "dev") -> dict[str, Any]:
    """FluxTransformer2DModel kwargs for a variant: dev embeds the guidance scale, schnell does not."""
    _check_variant(variant)
    return {**TRANSFORMER_CONFIG, "guidance_embeds": variant == "dev"}


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"Unknown FLUX.1 variant {variant!r}: use one of {', '.join(VARIANTS)}.")


def build_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP byte-pair tokenizer whose merges spell each of `VOCAB_WORDS` as one token.

    Vocabulary order follows openai/clip-vit-large-patch14: single characters, the same with the
    end-of-word suffix, merge results by rank, then <|startoftext|> and <|endoftext|> last. Every
    character of `_CHARS` is a token, so any text tokenizes (CLIP lower-cases it first).
    Padded/truncated to 77 tokens by FluxPipeline.
    """
    merges = _bpe_merges(VOCAB_WORDS)
    tokens = [
        *_CHARS,
        *(c + _EOW for c in _CHARS),
        *(left + right for left, right in merges),
        *_CLIP_SPECIALS,
    ]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=CLIP_MAX_LENGTH,
    )


def _bpe_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Ranked BPE merges learnt from `words` (each counted once), with ties broken by pair text.

    This is the textbook BPE training loop: merge the most frequent adjacent pair everywhere,
    repeat until every word is one symbol. Applying the merges in rank order (as the BPE model
    does when encoding) therefore rebuilds each word whole. It is written out here because the
    `tokenizers` trainer numbers symbols in hash-map order, which makes its merges differ from run
    to run and the saved tokenizer non-reproducible.
    """
    words_as_symbols = [(*w[:-1], w[-1] + _EOW) for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for symbols in words_as_symbols for pair in pairwise(symbols))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        words_as_symbols = [_merge_pair(symbols, best) for symbols in words_as_symbols]


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """`symbols` with every non-overlapping occurrence of `pair` (left to right) joined."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build_t5_tokenizer() -> T5Tokenizer:
    """A T5 unigram tokenizer with `VOCAB_WORDS` as whole-word pieces and single-character fallbacks.

    Ids 0, 1, 2 are <pad>, </s>, <unk> as in T5; a whole word (score -5) always beats spelling it
    out (-8 per character). Like T5 it is case-sensitive: capitalised words are spelled out.
    """
    pieces: list[tuple[str, float]] = [(token, 0.0) for token in _T5_SPECIALS]
    pieces.append(("▁", -6.0))
    pieces += [(f"▁{word}", -5.0) for word in dict.fromkeys(VOCAB_WORDS)]
    pieces += [(char, -8.0) for char in _CHARS + string.ascii_uppercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MODEL_MAX_LENGTH)


def build_tiny_flux(out_dir: str | Path, variant: Variant = "dev", seed: int = 0) -> Path:
    """Write a randomly initialised FLUX.1 pipeline that `FluxPipeline.from_pretrained` loads.

    Args:
        out_dir: folder to write (created; existing files of the same names are overwritten).
        variant: "dev" (guidance embedding, resolution-dependent shift) or "schnell" (neither).
        seed: seeds every component's initialisation; the same seed writes the same weights.
            The caller's global torch RNG state is left untouched.

    Returns:
        `out_dir` as a Path.
    """
    _check_variant(variant)
    out = Path(out_dir)
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    clip_config = CLIPTextConfig(
        vocab_size=len(clip_tokenizer),
        hidden_size=CLIP_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=CLIP_HIDDEN_SIZE,
        hidden_act="quick_gelu",
        # The pooled output is taken at the first eos position; with eos_token_id == 2 transformers
        # would fall back to the legacy argmax(input_ids) rule instead.
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    t5_config = T5Config(
        vocab_size=len(t5_tokenizer),
        d_model=T5_D_MODEL,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # T5 v1.1, the family of FLUX's t5-v1_1-xxl
        pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id,
        decoder_start_token_id=t5_tokenizer.pad_token_id,
    )
    # Seed each component separately so its weights do not depend on the others' sizes.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**transformer_config(variant))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**VAE_CONFIG)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(clip_config)
        torch.manual_seed(seed + 3)
        text_encoder_2 = T5EncoderModel(t5_config)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[variant]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    """CLI entry point: build a tiny pipeline and print its folder."""
    parser = argparse.ArgumentParser(
        prog="python -m fluxlora.tiny",
        description="Write a tiny randomly initialised FLUX.1 pipeline in the diffusers layout.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the pipeline into")
    parser.add_argument(
        "--variant", choices=VARIANTS, default="dev", help="FLUX.1 variant to mirror (default: dev)"
    )
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    args = parser.parse_args(argv)
    path = build_tiny_flux(args.out_dir, variant=args.variant, seed=args.seed)
    print(path)
    return path


if __name__ == "__main__":
    main()
