"""LoRA files: diffusers-format saving, kohya conversion, loading for --init_lora, key checks."""

import json
import os

import pytest
import safetensors.torch
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_kohya_flux_lora_to_diffusers,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import convert_lora
from fluxlora import lora_io
from fluxlora.config import DEFAULT_LORA_LAYERS
from fluxlora.lora_io import (
    check_lora_keys,
    convert_lora_file,
    from_kohya,
    load_lora_into_transformer,
    lora_state_dict,
    read_lora,
    read_lora_as_diffusers,
    save_lora,
    to_kohya,
)

ATTENTION_ONLY = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0")
# Every other linear layer of the FLUX transformer, so with DEFAULT_LORA_LAYERS all of them.
OTHER_LINEARS = (
    "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder", "context_embedder",
    "timestep_embedder.linear_1", "timestep_embedder.linear_2", "text_embedder.linear_1",
    "text_embedder.linear_2", "guidance_embedder.linear_1", "guidance_embedder.linear_2",
)


def lora_transformer(model_dir, *, rank=4, alpha=8, targets=DEFAULT_LORA_LAYERS, seed=0):
    """The tiny transformer with a LoRA adapter whose A and B are random (B is zero after init)."""
    transformer = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                       init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return transformer.eval()


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.6]),
        "guidance": torch.tensor([3.5]),
        "img_ids": img_ids.reshape(16, 3),
        "txt_ids": torch.zeros(8, 3),
    }


@torch.no_grad()
def output(transformer):
    return transformer(**inputs(), return_dict=False)[0]


@pytest.fixture
def pipe(tiny_flux_dev):
    return FluxPipeline.from_pretrained(tiny_flux_dev, dtype=torch.float32)


def adapter_weights(transformer, adapter_name):
    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def assert_lora_matters(transformer, expected):
    """Guard for the equality tests: the LoRA must change the output well beyond their tolerance."""
    transformer.disable_adapters()
    base = output(transformer)
    transformer.enable_adapters()
    assert (base - expected).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def test_lora_state_dict_keys_dtype_and_copies(tiny_flux_dev):
    transformer = lora_transformer(tiny_flux_dev)
    peft_keys = get_peft_model_state_dict(transformer).keys()
    state = lora_state_dict(transformer)

    assert set(state) == {f"transformer.{key}" for key in peft_keys}
    assert len(state) == 2 * (2 * 12 + 2 * 5 + 1)  # 12 per double block, 5 per single block, final proj_out
    for key, value in state.items():
        assert key.startswith("transformer.") and key.endswith((".lora_A.weight", ".lora_B.weight"))
        assert not any(part in key for part in ("base_model", "module.", "_orig_mod", "default"))
        assert value.dtype == torch.bfloat16 and value.device.type == "cpu" and value.is_contiguous()
    fp32 = lora_state_dict(transformer, dtype=torch.float32)
    assert all(value.dtype == torch.float32 for value in fp32.values())

    fp32["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].zero_()  # a copy: the model keeps its weights
    assert transformer.transformer_blocks[0].attn.to_q.lora_A["default"].weight.abs().sum() > 0


def test_lora_state_dict_strips_wrapper_prefixes(tiny_flux_dev):
    transformer = lora_transformer(tiny_flux_dev)
    expected = lora_state_dict(transformer)
    # A compiled block puts `_orig_mod.` inside parameter names; DataParallel adds `module.`.
    transformer.single_transformer_blocks[1] = torch.compile(transformer.single_transformer_blocks[1])
    assert any("_orig_mod" in name for name, _ in transformer.named_parameters())
    wrapped = torch.nn.DataParallel(transformer)

    state = lora_state_dict(wrapped)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)


@pytest.mark.parametrize("rank, alpha", [(4, 8), (4, 1)])
def test_saved_file_loads_in_diffusers_with_trained_output(tiny_flux_dev, pipe, tmp_path, rank, alpha):
    transformer = lora_transformer(tiny_flux_dev, rank=rank, alpha=alpha)
    expected = output(transformer)
    assert_lora_matters(transformer, expected)

    path = save_lora(tmp_path / "lora.safetensors", transformer, dtype=torch.float32)
    pipe.load_lora_weights(path)

    config = pipe.transformer.peft_config["default_0"]
    assert (config.r, config.lora_alpha) == (rank, alpha)
    trained, loaded = adapter_weights(transformer, "default"), adapter_weights(pipe.transformer, "default_0")
    assert loaded.keys() == trained.keys()  # nothing missing, nothing unexpected
    assert all(torch.equal(loaded[key], trained[key]) for key in trained)
    torch.testing.assert_close(output(pipe.transformer), expected, rtol=0, atol=1e-5)

    # By state dict diffusers sees no header: read_lora_as_diffusers folds alpha / rank in.
    pipe.delete_adapters("default_0")
    pipe.load_lora_weights(read_lora_as_diffusers(path), adapter_name="baked")
    assert pipe.transformer.peft_config["baked"].lora_alpha == rank
    torch.testing.assert_close(output(pipe.transformer), expected, rtol=0, atol=1e-5)


def test_save_lora_header_metadata(tiny_flux_dev, tmp_path):
    transformer = lora_transformer(tiny_flux_dev, rank=4, alpha=2)
    path = save_lora(tmp_path / "lora.safetensors", transformer,
                     metadata={"base_model": "tiny", "fluxlora.steps": "10", "trigger_phrase": "sks"})
    state, metadata = read_lora(path)

    assert state.keys() == lora_state_dict(transformer).keys()
    assert metadata["fluxlora.base_model"] == "tiny"
    assert metadata["fluxlora.steps"] == "10"  # already namespaced: not prefixed twice
    assert metadata["fluxlora.trigger_phrase"] == "sks"
    adapter = json.loads(metadata["lora_adapter_metadata"])
    assert adapter["transformer.r"] == 4 and adapter["transformer.lora_alpha"] == 2
    assert set(adapter["transformer.target_modules"]) == set(DEFAULT_LORA_LAYERS)

    with pytest.raises(TypeError, match="steps"):
        save_lora(tmp_path / "other.safetensors", transformer, metadata={"steps": 10})


def test_save_lora_without_adapter_is_a_clear_error(tiny_flux_dev, tmp_path):
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dev, subfolder="transformer")
    with pytest.raises(ValueError, match="no LoRA adapter named 'default'"):
        save_lora(tmp_path / "lora.safetensors", transformer)


def test_save_replaces_existing_file_whole_and_leaves_no_temp(tiny_flux_dev, tmp_path):
    transformer = lora_transformer(tiny_flux_dev)
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"x" * 10_000_000)  # longer than the new file: a non-atomic overwrite would leave a tail

    save_lora(path, transformer)
    assert os.listdir(tmp_path) == ["lora.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a temp file's private mode is not kept
    state, _ = read_lora(path)
    expected = lora_state_dict(transformer)
    assert all(torch.equal(state[key], expected[key]) for key in expected)


def test_failed_save_keeps_previous_file(tiny_flux_dev, tmp_path, monkeypatch):
    transformer = lora_transformer(tiny_flux_dev)
    path = save_lora(tmp_path / "lora.safetensors", transformer)
    before = path.read_bytes()

    def killed(fd):
        raise KeyboardInterrupt  # stands in for a kill after the data was written, before the rename

    monkeypatch.setattr(lora_io.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        save_lora(path, lora_transformer(tiny_flux_dev, seed=1))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["lora.safetensors"]


# ---------------------------------------------------------------------------------------------
# kohya conversion
# ---------------------------------------------------------------------------------------------


def test_kohya_export_names_shapes_and_alphas(tiny_flux_dev):
    transformer = lora_transformer(tiny_flux_dev, rank=4, alpha=8)
    kohya = to_kohya(lora_state_dict(transformer, dtype=torch.float32), alpha=8)

    double = ["img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
              "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2"]
    names = {f"lora_unet_double_blocks_{i}_{m}" for i in range(2) for m in double}
    names |= {f"lora_unet_single_blocks_{i}_{m}" for i in range(2) for m in ("linear1", "linear2")}
    names.add("lora_unet_final_layer_linear")
    assert set(kohya) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}

    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert kohya[f"{qkv}.lora_down.weight"].shape == (12, 64)
    assert kohya[f"{qkv}.lora_up.weight"].shape == (192, 12)
    assert kohya[f"{qkv}.alpha"].item() == 24  # 8 / 4 per path = 24 / 12
    linear1 = "lora_unet_single_blocks_1_linear1"
    assert kohya[f"{linear1}.lora_up.weight"].shape == (3 * 64 + 256, 16)
    assert kohya[f"{linear1}.alpha"].item() == 32
    assert kohya["lora_unet_double_blocks_1_img_mlp_2.alpha"].item() == 8
    # alphas stay float32 whatever the weights' dtype: bf16 would round 3 x 10.1 to 30.25
    odd = to_kohya(lora_state_dict(transformer, dtype=torch.bfloat16), alpha=10.1)
    assert odd[f"{qkv}.alpha"].dtype == torch.float32 and odd[f"{qkv}.alpha"].item() == pytest.approx(30.3)

    # Block diagonal: q's rows use only q's rank columns.
    up = kohya[f"{qkv}.lora_up.weight"]
    assert torch.count_nonzero(up[:64, 4:]) == 0 and torch.count_nonzero(up[:64, :4]) == 64 * 4
    to_q = transformer.transformer_blocks[0].attn.to_q
    assert torch.equal(up[:64, :4], to_q.lora_B["default"].weight)


def test_kohya_file_gives_the_same_output(tiny_flux_dev, pipe, tmp_path):
    transformer = lora_transformer(tiny_flux_dev, rank=4, alpha=2)
    expected = output(transformer)
    diffusers_file = save_lora(tmp_path / "lora.safetensors", transformer, dtype=torch.float32,
                               metadata={"steps": "7"})
    kohya_file = convert_lora_file(diffusers_file, tmp_path / "kohya.safetensors", "kohya")

    state, metadata = read_lora(kohya_file)
    assert all(key.startswith("lora_unet_") for key in state)
    # Alpha travels in the .alpha tensors; diffusers would apply the adapter metadata on top.
    assert "lora_adapter_metadata" not in metadata and metadata["fluxlora.steps"] == "7"

    pipe.load_lora_weights(read_lora_as_diffusers(kohya_file))
    torch.testing.assert_close(output(pipe.transformer), expected, rtol=0, atol=1e-5)


def test_diffusers_own_kohya_loader_agrees(tiny_flux_dev, pipe, tmp_path):
    """An independent check of names, fusing and alpha: diffusers' kohya path loads our export.

    Limited to double blocks: diffusers' converter hard-codes the full-size widths for the single
    blocks' linear1 (see the next test) and drops the final layer.
    """
    double_only = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in DEFAULT_LORA_LAYERS if m != "proj_mlp"
                   and m != "proj_out"]
    transformer = lora_transformer(tiny_flux_dev, rank=2, alpha=5, targets=double_only)
    expected = output(transformer)
    kohya = to_kohya(lora_state_dict(transformer, dtype=torch.float32), alpha=5)
    path = tmp_path / "kohya.safetensors"
    safetensors.torch.save_file(kohya, path)

    pipe.load_lora_weights(path)
    torch.testing.assert_close(output(pipe.transformer), expected, rtol=0, atol=1e-5)


def test_every_flux_linear_has_a_kohya_name_that_diffusers_maps_back(tiny_flux_dev):
    transformer = lora_transformer(tiny_flux_dev, rank=2, alpha=2, targets=DEFAULT_LORA_LAYERS + OTHER_LINEARS)
    base = FluxTransformer2DModel.from_pretrained(tiny_flux_dev, subfolder="transformer")
    lora_layers = {name for name, module in transformer.named_modules() if hasattr(module, "lora_A")}
    assert lora_layers == {name for name, module in base.named_modules() if isinstance(module, torch.nn.Linear)}
    state = lora_state_dict(transformer, dtype=torch.float32)
    # diffusers splits linear1 only at the full-size widths: checked in the next test.
    state = {k: v for k, v in state.items()
             if not (k.startswith("transformer.single_transformer_blocks.") and (".attn.to_" in k or "proj_mlp" in k))}

    converted = _convert_kohya_flux_lora_to_diffusers(to_kohya(state))  # alpha = rank: scale 1
    # diffusers returns the embedders and the final layer without the `transformer.` prefix.
    converted = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}
    assert converted.keys() == state.keys()
    for key, value in state.items():  # includes norm_out.linear, whose output halves are swapped
        torch.testing.assert_close(converted[key], value, rtol=0, atol=0)


def test_linear1_fusing_matches_diffusers_at_full_flux_width():
    hidden, rank = 3072, 2
    generator = torch.Generator().manual_seed(0)
    state = {}
    for part, width in (("attn.to_q", hidden), ("attn.to_k", hidden), ("attn.to_v", hidden), ("proj_mlp", 4 * hidden)):
        prefix = f"transformer.single_transformer_blocks.5.{part}"
        state[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator)
        state[f"{prefix}.lora_B.weight"] = torch.randn(width, rank, generator=generator)

    kohya = to_kohya(state, alpha=1)  # scale 1/2
    assert kohya["lora_unet_single_blocks_5_linear1.lora_up.weight"].shape == (7 * hidden, 4 * rank)
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    assert converted.keys() == state.keys()
    probe = torch.randn(hidden, 3, generator=generator)  # compares the updates without forming them
    for key, down in state.items():
        if key.endswith("lora_A.weight"):
            b_key = key.replace("lora_A", "lora_B")
            ours = 0.5 * state[b_key] @ (down @ probe)
            theirs = converted[b_key] @ (converted[key] @ probe)  # diffusers folds the scale in
            torch.testing.assert_close(theirs, ours)


def test_kohya_diffusers_kohya_round_trip(tiny_flux_dev):
    transformer = lora_transformer(tiny_flux_dev, rank=4, alpha=4)
    kohya = to_kohya(lora_state_dict(transformer, dtype=torch.float32), alpha=4)
    again = to_kohya(from_kohya(kohya))
    assert again.keys() == kohya.keys()
    assert all(torch.equal(again[key], kohya[key]) for key in kohya)


def effective_updates(kohya):
    """{kohya module: alpha / rank * up @ down}: what a kohya LoRA adds to each BFL weight."""
    names = {key.rsplit(".", 2)[0] for key in kohya if key.endswith("lora_down.weight")}
    out = {}
    for name in names:
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        out[name] = kohya[f"{name}.alpha"].item() / down.shape[0] * up @ down
    return out


def test_foreign_dense_kohya_round_trip_keeps_updates():
    """A LoRA trained fused (kohya) has a dense lora_up; it splits exactly and fuses back."""
    generator = torch.Generator().manual_seed(0)
    kohya = {}
    for name, rows, cols in (("double_blocks_0_img_attn_qkv", 192, 64), ("double_blocks_0_img_mlp_2", 64, 256),
                             ("single_blocks_0_linear1", 448, 64), ("final_layer_adaLN_modulation_1", 128, 64)):
        kohya[f"lora_unet_{name}.lora_down.weight"] = torch.randn(4, cols, generator=generator)
        kohya[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, 4, generator=generator)
        kohya[f"lora_unet_{name}.alpha"] = torch.tensor(3.0)

    diffusers = from_kohya(kohya)
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in diffusers
    assert "transformer.norm_out.linear.lora_A.weight" in diffusers
    again = to_kohya(diffusers)
    assert {k.rsplit(".", 2)[0] for k in again} == {k.rsplit(".", 2)[0] for k in kohya}
    before, after = effective_updates(kohya), effective_updates(again)
    for name in before:
        torch.testing.assert_close(after[name], before[name])


# ---------------------------------------------------------------------------------------------
# Loading into a model (--init_lora) and key checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["diffusers", "kohya"])
@pytest.mark.parametrize("targets", [DEFAULT_LORA_LAYERS, ATTENTION_ONLY], ids=["default", "attention"])
def test_load_lora_into_transformer_restores_weights_exactly(tiny_flux_dev, tmp_path, to, targets):
    trained = lora_transformer(tiny_flux_dev, rank=4, alpha=2, targets=targets, seed=0)
    path = save_lora(tmp_path / "lora.safetensors", trained, dtype=torch.float32)
    path = convert_lora_file(path, tmp_path / f"{to}.safetensors", to)

    fresh = lora_transformer(tiny_flux_dev, rank=4, alpha=2, targets=targets, seed=1)
    load_lora_into_transformer(fresh, path)
    expected, loaded = adapter_weights(trained, "default"), adapter_weights(fresh, "default")
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_load_lora_into_transformer_honours_a_different_alpha(tiny_flux_dev, tmp_path):
    trained = lora_transformer(tiny_flux_dev, rank=4, alpha=8)
    expected = output(trained)
    path = save_lora(tmp_path / "lora.safetensors", trained, dtype=torch.float32)

    fresh = lora_transformer(tiny_flux_dev, rank=4, alpha=2, seed=1)
    load_lora_into_transformer(fresh, path)
    torch.testing.assert_close(output(fresh), expected, rtol=0, atol=1e-5)


def test_init_lora_rank_mismatch_says_which_rank(tiny_flux_dev, tmp_path):
    path = save_lora(tmp_path / "r4.safetensors", lora_transformer(tiny_flux_dev, rank=4))
    model = lora_transformer(tiny_flux_dev, rank=8)
    with pytest.raises(ValueError, match="set --rank 4") as err:
        load_lora_into_transformer(model, path)
    assert "--init_lora" in str(err.value) and str(path) in str(err.value)


def test_init_lora_keys_outside_the_adapter_are_listed(tiny_flux_dev, tmp_path):
    path = save_lora(tmp_path / "full.safetensors", lora_transformer(tiny_flux_dev))
    model = lora_transformer(tiny_flux_dev, targets=ATTENTION_ONLY)
    with pytest.raises(ValueError, match="does not fit the model") as err:
        load_lora_into_transformer(model, path)
    message = str(err.value)
    assert "--init_lora" in message and str(path) in message
    # 35 LoRA modules, 14 of them attention: 21 do not fit, 10 are listed.
    listed = [line.strip() for line in message.splitlines() if line.startswith("  transformer.")]
    assert len(listed) == 10 and "21 of its 35 LoRA modules" in message and "... and 11 more" in message
    assert not any(name.endswith(ATTENTION_ONLY) for name in listed)


def test_lora_of_another_model_is_rejected(tiny_flux_dev, tmp_path):
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 4)}
    path = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file(sdxl, path)
    model = lora_transformer(tiny_flux_dev)
    with pytest.raises(ValueError, match="lora_unet_down_blocks_0_attentions_0_proj_in") as err:
        load_lora_into_transformer(model, path)
    assert "--init_lora" in str(err.value)

    with pytest.raises(ValueError, match="Not a FLUX LoRA"):
        check_lora_keys(model, {"unet.conv.weight": torch.zeros(1)})


def test_check_lora_keys_without_adapter(tiny_flux_dev):
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dev, subfolder="transformer")
    state = lora_state_dict(lora_transformer(tiny_flux_dev))
    check_lora_keys(transformer, state)  # fits: no error
    check_lora_keys(transformer, to_kohya(state))
    check_lora_keys(lora_transformer(tiny_flux_dev, rank=8), state)  # another LoRA already loaded

    wider = {k: torch.zeros(v.shape[0], 2 * v.shape[1]) if k.endswith("lora_A.weight") else v
             for k, v in state.items()}
    with pytest.raises(ValueError, match="layer sizes differ"):
        check_lora_keys(transformer, wider, source="sample.py --lora x")

    stray = {"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 64),
             "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(ValueError, match=r"transformer\.transformer_blocks\.7\.attn\.to_q"):
        check_lora_keys(transformer, stray)


def test_diffusers_alpha_keys_are_honoured():
    generator = torch.Generator().manual_seed(0)
    state = {"transformer.x_embedder.lora_A.weight": torch.randn(2, 64, generator=generator),
             "transformer.x_embedder.lora_B.weight": torch.randn(64, 2, generator=generator),
             "transformer.x_embedder.alpha": torch.tensor(1.0)}
    kohya = to_kohya(state)
    assert kohya["lora_unet_img_in.alpha"].item() == 1.0
    baked = from_kohya(kohya)
    torch.testing.assert_close(
        baked["transformer.x_embedder.lora_B.weight"] @ baked["transformer.x_embedder.lora_A.weight"],
        0.5 * state["transformer.x_embedder.lora_B.weight"] @ state["transformer.x_embedder.lora_A.weight"],
    )


def test_a_module_missing_its_lora_b_is_named():
    state = {"transformer.x_embedder.lora_A.weight": torch.ones(2, 64),
             "transformer.x_embedder.lora_B.weight": torch.ones(64, 2),
             "transformer.context_embedder.lora_A.weight": torch.ones(2, 64)}
    with pytest.raises(ValueError, match=r"missing their lora_A or lora_B weight:\n  context_embedder$"):
        to_kohya(state)


def test_kohya_file_without_alphas_applies_at_scale_one():
    """kohya's loaders take a missing `.alpha` as alpha = rank."""
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 64, generator=generator), torch.randn(64, 2, generator=generator)
    baked = from_kohya({"lora_unet_img_in.lora_down.weight": down, "lora_unet_img_in.lora_up.weight": up})
    torch.testing.assert_close(
        baked["transformer.x_embedder.lora_B.weight"] @ baked["transformer.x_embedder.lora_A.weight"], up @ down)


def test_file_header_scales_follow_peft_rank_alpha_patterns_and_rslora(tiny_flux_dev, tmp_path):
    """A file's LoraConfig header (rsLoRA, per-module rank and alpha) folds in as PEFT itself scales."""
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dev, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["to_q", "to_k"],
                                       rank_pattern={"to_k": 2}, alpha_pattern={"to_k": 3}))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    baked = read_lora_as_diffusers(save_lora(tmp_path / "rslora.safetensors", transformer, dtype=torch.float32))
    scales = set()
    for name, module in transformer.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            key = f"transformer.{name}"
            delta = baked[f"{key}.lora_B.weight"] @ baked[f"{key}.lora_A.weight"]
            torch.testing.assert_close(delta, module.get_delta_weight("default"), msg=key)
            scales.add(module.scaling["default"])
    assert scales == {8 / 2, 3 / 2 ** 0.5}  # alpha / sqrt(r): rsLoRA, with to_k's own rank and alpha


def test_modules_without_kohya_name_are_an_error():
    state = {"transformer.pos_embed.lora_A.weight": torch.zeros(2, 8),
             "transformer.pos_embed.lora_B.weight": torch.zeros(8, 2)}
    with pytest.raises(ValueError, match="'pos_embed' has no counterpart in kohya"):
        to_kohya(state)
    text_encoder = {"text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(2, 8),
                    "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": torch.zeros(8, 2)}
    with pytest.raises(ValueError, match="no counterpart in kohya"):
        to_kohya(text_encoder)


# ---------------------------------------------------------------------------------------------
# convert_lora.py
# ---------------------------------------------------------------------------------------------


def test_convert_lora_cli(tiny_flux_dev, tmp_path, capsys):
    src = save_lora(tmp_path / "lora.safetensors", lora_transformer(tiny_flux_dev), dtype=torch.float32)
    kohya, back = tmp_path / "kohya.safetensors", tmp_path / "back.safetensors"

    assert convert_lora.main([str(src), str(kohya), "--to", "kohya"]) == 0
    assert capsys.readouterr().out.strip() == str(kohya)
    assert convert_lora.main([str(kohya), str(back), "--to", "diffusers"]) == 0
    original, _ = read_lora(src)
    restored, _ = read_lora(back)
    assert restored.keys() == original.keys()
    for key in original:  # alpha 8 / rank 4 is folded into the weights: compare the updates
        if key.endswith("lora_A.weight"):
            b_key = key.replace("lora_A", "lora_B")
            torch.testing.assert_close(restored[b_key] @ restored[key], 2 * original[b_key] @ original[key])

    assert convert_lora.main([str(tmp_path / "missing.safetensors"), str(back), "--to", "kohya"]) == 1
    assert "missing.safetensors does not exist" in capsys.readouterr().err


def test_flux_dev_default_lora_size_as_the_allreduce_bench_assumes():
    """bench/bench_allreduce.py times the all-reduce of this many gradient values (DDP's per-step traffic)."""
    import sys
    from pathlib import Path

    from diffusers import FluxTransformer2DModel

    from fluxlora.config import DEFAULT_LORA_LAYERS
    from fluxlora.models import add_lora

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.bench_allreduce import LORA_VALUES

    with torch.device("meta"):  # the full FLUX.1-dev architecture, without memory
        transformer = FluxTransformer2DModel(guidance_embeds=True).requires_grad_(False)
    params = add_lora(transformer, rank=16, alpha=16, target_modules=DEFAULT_LORA_LAYERS)
    assert (len(params), sum(p.numel() for p in params)) == (838, LORA_VALUES)
