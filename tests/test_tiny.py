"""The tiny FLUX.1 pipeline builder (fluxlora.tiny) and the demo dataset (demo/)."""

import importlib.util
import json
import sys
from pathlib import Path

import huggingface_hub.constants
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file

from fluxlora import tiny
from fluxlora.config import MAX_SEQUENCE_LENGTH

IMAGE_SUFFIXES = {".jpg", ".png"}

# Published scheduler/scheduler_config.json values of black-forest-labs/FLUX.1-dev and -schnell,
# written out here rather than read from fluxlora.tiny so a typo there fails.
REAL_SCHEDULER = {
    "dev": {"shift": 3.0, "use_dynamic_shifting": True},
    "schnell": {"shift": 1.0, "use_dynamic_shifting": False},
}
REAL_SHIFT_PARAMS = {
    "num_train_timesteps": 1000,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


@pytest.fixture(scope="module", params=["dev", "schnell"])
def variant_pipe(request, tiny_flux_dev, tiny_flux_schnell):
    path = {"dev": tiny_flux_dev, "schnell": tiny_flux_schnell}[request.param]
    return request.param, FluxPipeline.from_pretrained(path, dtype=torch.float32)


def _generate(pipe: FluxPipeline, variant: str, prompt: str, **kwargs):
    return pipe(
        prompt,
        height=64,
        width=96,
        num_inference_steps=2,
        guidance_scale=3.5 if variant == "dev" else 0.0,
        max_sequence_length=MAX_SEQUENCE_LENGTH[variant],
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )


def test_layout_is_the_diffusers_flux_layout(tiny_flux_dev):
    index = json.loads((tiny_flux_dev / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    expected = {
        "transformer": "FluxTransformer2DModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel",
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "T5Tokenizer",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
    }
    for component, class_name in expected.items():
        assert index[component][1] == class_name
        assert (tiny_flux_dev / component).is_dir()
    assert (tiny_flux_dev / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_loads_offline_and_generates_requested_size(variant_pipe):
    variant, pipe = variant_pipe
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # from_pretrained above could not download
    image = _generate(pipe, variant, "a red circle on a blue background").images[0]
    assert isinstance(image, Image.Image)
    assert image.size == (96, 64)


def test_latent_output_is_packed_2x2_tokens_of_16_channels(variant_pipe):
    variant, pipe = variant_pipe
    latents = _generate(pipe, variant, "a yellow star", output_type="latent").images
    # 64x96 px -> 8x12 latent (8x VAE) -> 4x6 tokens of 16 channels x 2 x 2.
    assert latents.shape == (1, (64 // 16) * (96 // 16), 64)
    assert torch.isfinite(latents).all()


def test_vae_geometry_matches_flux(variant_pipe):
    _, pipe = variant_pipe
    vae = pipe.vae.config
    assert vae.latent_channels == 16
    assert 2 ** (len(vae.block_out_channels) - 1) == 8
    assert pipe.vae_scale_factor == 8
    assert vae.scaling_factor == pytest.approx(0.3611)
    assert vae.shift_factor == pytest.approx(0.1159)
    assert vae.use_quant_conv is False and vae.use_post_quant_conv is False
    image = torch.zeros(1, 3, 64, 96)
    assert pipe.vae.encode(image).latent_dist.mean.shape == (1, 16, 8, 12)


def test_transformer_geometry_matches_flux(variant_pipe):
    variant, pipe = variant_pipe
    transformer = pipe.transformer
    assert transformer.config.in_channels == 64
    assert transformer.x_embedder.in_features == 64
    assert transformer.proj_out.out_features == 64
    assert transformer.config.guidance_embeds is (variant == "dev")
    assert hasattr(transformer.time_text_embed, "guidance_embedder") is (variant == "dev")
    # The text streams feed in at the text encoders' widths.
    assert transformer.context_embedder.in_features == pipe.text_encoder_2.config.d_model
    assert transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert sum(transformer.config.axes_dims_rope) == transformer.config.attention_head_dim


def test_transformer_config_constant_builds_a_working_model():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**tiny.transformer_config("schnell"))
    tokens, text_len = 24, 5
    out = model(
        hidden_states=torch.randn(1, tokens, 64),
        encoder_hidden_states=torch.randn(1, text_len, tiny.T5_D_MODEL),
        pooled_projections=torch.randn(1, tiny.CLIP_HIDDEN_SIZE),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text_len, 3),
    ).sample
    assert out.shape == (1, tokens, 64)
    assert tiny.transformer_config("dev")["guidance_embeds"] is True


def test_clip_is_padded_to_77_tokens(variant_pipe):
    _, pipe = variant_pipe
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.max_position_embeddings == 77
    ids = pipe.tokenizer("a red circle", padding="max_length", max_length=pipe.tokenizer_max_length).input_ids
    assert len(ids) == 77
    # CLIP pools at the first eos; the model must look for the tokenizer's eos id.
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer_2.model_max_length == 512


@pytest.mark.parametrize("attr", ["tokenizer", "tokenizer_2"])
def test_tokenizers_give_distinct_ids_for_distinct_captions(variant_pipe, demo_dir, attr):
    _, pipe = variant_pipe
    tokenizer = getattr(pipe, attr)
    captions = [p.read_text().strip() for p in sorted((demo_dir / "images").glob("*.txt"))]
    assert len(captions) == 12
    ids = [tuple(tokenizer(c).input_ids) for c in captions]
    assert len(set(ids)) == len(captions)
    # Every demo caption word is in the word list, so each is exactly one token.
    n_special = len(tokenizer("").input_ids)
    assert [len(seq) - n_special for seq in ids] == [len(c.split()) for c in captions]
    # Listed words are single tokens: "red" and "blue" differ by one id, not by spelling.
    red, blue = tokenizer("red").input_ids, tokenizer("blue").input_ids
    assert len(red) == len(blue)
    assert sum(a != b for a, b in zip(red, blue, strict=True)) == 1


def test_unlisted_words_still_tokenize():
    # CLIP's unknown token is its eos (as in openai/clip-vit-large-patch14), T5's is <unk>.
    clip = tiny.build_clip_tokenizer()
    clip_ids = clip("a zebra, 42 quokkas!").input_ids
    assert clip.eos_token_id not in clip_ids[1:-1]
    t5 = tiny.build_t5_tokenizer()
    t5_ids = t5("a Zebra, 42 Quokkas!").input_ids
    assert t5.unk_token_id not in t5_ids
    assert t5.decode(t5_ids, skip_special_tokens=True) == "a Zebra, 42 Quokkas!"


def test_scheduler_config_matches_real_flux(variant_pipe):
    variant, pipe = variant_pipe
    config = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    for key, value in {**REAL_SHIFT_PARAMS, **REAL_SCHEDULER[variant]}.items():
        assert config[key] == value, key


def test_schnell_sigmas_are_unshifted_and_dev_sigmas_shift_with_resolution(tiny_flux_dev, tiny_flux_schnell):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sigmas = [1.0, 0.75, 0.5, 0.25]
    schnell = FluxPipeline.from_pretrained(tiny_flux_schnell).scheduler
    schnell.set_timesteps(sigmas=sigmas)
    assert schnell.sigmas[:-1].tolist() == pytest.approx(sigmas)

    dev = FluxPipeline.from_pretrained(tiny_flux_dev).scheduler
    mu = calculate_shift(4096, 256, 4096, 0.5, 1.15)  # a 1024x1024 image: 4096 packed tokens
    assert mu == pytest.approx(1.15)
    dev.set_timesteps(sigmas=sigmas, mu=mu)
    shifted = torch.tensor(sigmas)
    shifted = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / shifted - 1))
    assert dev.sigmas[:-1].tolist() == pytest.approx(shifted.tolist(), rel=1e-5)


def _weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(f.relative_to(path)): load_file(f) for f in sorted(path.rglob("*.safetensors"))}


def test_same_seed_writes_the_same_files(tmp_path, tiny_flux_dev):
    again = tiny.build_tiny_flux(tmp_path / "again", variant="dev", seed=0)
    files = sorted(p.relative_to(tiny_flux_dev) for p in tiny_flux_dev.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (again / rel).read_bytes() == (tiny_flux_dev / rel).read_bytes(), rel


def test_different_seed_writes_different_weights(tmp_path, tiny_flux_dev):
    other = _weights(tiny.build_tiny_flux(tmp_path / "other", variant="dev", seed=1))
    base = _weights(tiny_flux_dev)
    assert other.keys() == base.keys()
    for component in base:
        assert base[component].keys() == other[component].keys()
        assert any(not torch.equal(base[component][k], other[component][k]) for k in base[component]), (
            component
        )


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_flux(tmp_path / "p", variant="schnell", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_variant_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'pro'.*dev, schnell"):
        tiny.build_tiny_flux(tmp_path, variant="pro")


def test_cli_prints_the_path(tmp_path, capsys):
    out = tmp_path / "cli"
    assert tiny.main([str(out), "--variant", "schnell", "--seed", "3"]) == out
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] is False


# --- demo dataset ---------------------------------------------------------------------------


def _demo_images(demo_dir: Path) -> list[Path]:
    return sorted(p for p in (demo_dir / "images").iterdir() if p.suffix in IMAGE_SUFFIXES)


def test_demo_has_12_distinctly_captioned_images(demo_dir):
    images = _demo_images(demo_dir)
    assert len(images) == 12
    captions = []
    for image in images:
        caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption, image
        captions.append(caption)
    assert len(set(captions)) == 12
    # Nothing else in images/: every .txt has its image.
    assert {p.stem for p in (demo_dir / "images").glob("*.txt")} == {p.stem for p in images}


def test_demo_images_have_varied_sizes_and_aspect_ratios(demo_dir):
    sizes = []
    for path in _demo_images(demo_dir):
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.convert("RGB").getextrema() != ((0, 0), (0, 0), (0, 0)), path  # not blank
            sizes.append(img.size)
    ratios = {round(w / h, 2) for w, h in sizes}
    assert len(ratios) >= 6
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes) and any(w == h for w, h in sizes)
    assert {path.suffix for path in _demo_images(demo_dir)} == IMAGE_SUFFIXES


def test_demo_parquet_matches_the_folder(demo_dir):
    table = pq.read_table(demo_dir / "table.parquet").to_pylist()
    assert set(table[0]) == {"image", "action"}
    from_table = {row["image"]: row["action"] for row in table}
    assert len(from_table) == len(table) == 12
    from_folder = {
        p.relative_to(demo_dir).as_posix(): p.with_suffix(".txt").read_text(encoding="utf-8").strip()
        for p in _demo_images(demo_dir)
    }
    assert from_table == from_folder


def test_demo_validation_prompts(demo_dir):
    prompts = (demo_dir / "validation_prompts.txt").read_text(encoding="utf-8").splitlines()
    assert len(prompts) == 2
    assert all(p.strip() for p in prompts)


def test_demo_is_under_1_mb(demo_dir):
    total = sum(p.stat().st_size for p in demo_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 1_000_000


def test_make_demo_reproduces_the_committed_files(demo_dir, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_demo", demo_dir / "make_demo.py")
    make_demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_demo", make_demo)  # dataclasses resolve annotations there
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ in the committed demo/
    spec.loader.exec_module(make_demo)
    make_demo.make_demo(tmp_path)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(written) == 12 * 2 + 2
    for rel in written:
        assert (tmp_path / rel).read_bytes() == (demo_dir / rel).read_bytes(), (
            f"{rel}: rerun demo/make_demo.py"
        )
