"""fp8 base matmuls (`--base_model_precision fp8`, `--low_memory`): numerics, conversion, training."""
from __future__ import annotations

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from torch import nn

from fluxlora import fp8
from fluxlora.config import ConfigError
from fluxlora.lora_io import read_lora
from fluxlora.metrics import read_jsonl
from fluxlora.models import add_lora, load_transformer
from fluxlora.trainer import LORA_FILE, train

from .conftest import reset_accelerate, train_config


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantize_rows_scales_each_row_to_e4m3_range():
    x = torch.randn(6, 64) * torch.logspace(-3, 3, 6)[:, None]  # rows six orders of magnitude apart
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == fp8.E4M3 and scale.shape == (6, 1) and scale.dtype == torch.float32
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((6,), fp8.E4M3_MAX))
    assert rel_err(q.float() * scale, x) < 0.04  # e4m3 keeps 3 mantissa bits: ~2-3% rms per element


@pytest.mark.parametrize("keep_transpose", [True, False])
def test_fp8_linear_matches_linear_forward_and_input_gradient(keep_transpose):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96).requires_grad_(False)
    layer = fp8.Fp8Linear(linear, keep_transpose=keep_transpose)
    x = torch.randn(2, 40, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = layer(x), linear(x_ref)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < 0.05
    assert rel_err(x.grad, x_ref.grad) < 0.05
    assert (layer.weight_t_fp8 is not None) == keep_transpose
    assert layer.state_dict() == {}  # the frozen base is never saved


def test_quantize_blocks_converts_block_linears_inside_lora_and_keeps_the_adapter(tiny_flux_dev):
    transformer = load_transformer(str(tiny_flux_dev), base_components=str(tiny_flux_dev), dtype=torch.float32)
    add_lora(transformer, rank=4, alpha=4, target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"])
    keys_before = set(get_peft_model_state_dict(transformer))
    modulation = transformer.transformer_blocks[0].norm1.linear
    expected = sum(1 for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
                   for name, m in block.named_modules()
                   if type(m) is nn.Linear and "lora_" not in name and "norm" not in name)
    assert fp8.quantize_blocks(transformer, torch.device("cpu")) == expected > 0
    block = transformer.transformer_blocks[0]
    assert isinstance(block.attn.to_q.base_layer, fp8.Fp8Linear)  # LoRA-wrapped
    assert isinstance(block.attn.to_out[0], fp8.Fp8Linear)  # not wrapped by this LoRA
    assert block.norm1.linear is modulation and type(modulation) is nn.Linear
    lora = [p for p in transformer.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert set(get_peft_model_state_dict(transformer)) == keys_before


def test_fp8_and_low_memory_training_give_the_same_lora_format(demo_cache, tiny_flux_dev, tmp_path, fresh_accelerate):
    files = {}
    for name, options in {"bf16": {}, "fp8": {"base_model_precision": "fp8"}, "low": {"low_memory": True}}.items():
        cfg = train_config(demo_cache, tiny_flux_dev, tmp_path / name, max_train_steps=4, checkpointing_steps=4,
                           mixed_precision="bf16", **options)
        train(cfg)
        reset_accelerate()
        tensors, _ = read_lora(tmp_path / name / LORA_FILE)
        files[name] = tensors
        losses = [row["loss"] for row in read_jsonl(tmp_path / name / "logs.jsonl")]
        assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    for name in ("fp8", "low"):
        assert {k: (v.shape, v.dtype) for k, v in files[name].items()} == \
               {k: (v.shape, v.dtype) for k, v in files["bf16"].items()}
        moved = [k for k in files[name] if ".lora_B." in k and files[name][k].abs().sum() > 0]
        assert moved  # the adapters trained through the fp8 base


@pytest.mark.parametrize("flag_name", ["base_model_precision", "low_memory"])
def test_fp8_base_needs_bf16_mixed_precision(demo_cache, tiny_flux_dev, tmp_path, flag_name):
    value = "fp8" if flag_name == "base_model_precision" else True
    with pytest.raises(ConfigError, match=f"--{flag_name}: .*--mixed_precision bf16"):
        train_config(demo_cache, tiny_flux_dev, tmp_path, **{flag_name: value})


@pytest.mark.gpu
@pytest.mark.parametrize("in_features,out_features", [(3072, 9216), (12288, 3072), (15360, 3072)])
def test_fp8_linear_on_cuda_matches_at_flux_shapes(in_features, out_features):
    """Hopper's fp8 kernels at FLUX's largest reductions (K up to 15360, the single blocks' proj_out), with
    the forward's fast accumulation: output and input gradient within e4m3's error of the fp32 layer."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    layer = fp8.Fp8Linear(linear)
    linear.float()  # the reference: the same bf16 weights, multiplied in fp32
    x_ref = torch.randn(4608, in_features, device="cuda", requires_grad=True)
    x = x_ref.detach().to(torch.bfloat16).requires_grad_(True)
    out, ref = layer(x), linear(x_ref)
    grad = torch.randn_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    assert rel_err(out, ref) < 0.05
    assert rel_err(x.grad, x_ref.grad) < 0.05


def test_fp8_operands_are_row_major_and_outputs_in_the_weight_dtype():
    """CUDA's _scaled_mm needs row-major quantized operands; the CPU kernel does not check, so check here."""
    q, _ = fp8.quantize_rows(torch.randn(32, 8).t())  # a transposed (column-major) input
    assert q.is_contiguous()
    layer = fp8.Fp8Linear(nn.Linear(32, 16).to(torch.bfloat16).requires_grad_(False))
    assert layer.weight_fp8.is_contiguous() and layer.weight_t_fp8.is_contiguous()
    assert layer(torch.randn(3, 32)).dtype == torch.bfloat16  # fp32 input, as autocast's norms give
