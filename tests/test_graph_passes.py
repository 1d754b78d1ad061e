"""The compiled blocks' graph passes: LoRA down projections that share an input as one GEMM, LoRA up projections
added inside a GEMM, the tanh GELU through a sigmoid, q/k RMS norm and RoPE as one op; after autograd, with a bf16
base, the LoRA's terms and the summed gradients added in the large GEMMs' epilogues, those GEMMs in place, row
amaxes of a concatenation taken part by part and one fp8 quantization per shared input."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

from fluxlora import fp8
from fluxlora.graph_passes import (BLOCK_COMPILE_OPTIONS, BLOCK_GRAPH_PASSES, addmm_in_place,
                                   fuse_shared_input_linears, gelu_tanh, gelu_tanh_as_sigmoid, lora_up_before_base,
                                   lora_up_into_base_output, rms_norm_rope_as_one_op, row_amax_by_part,
                                   sums_into_large_gemms)

from .conftest import tiny_lora_transformer

TOKENS, TEXT_TOKENS = 16, 8
aten = torch.ops.aten


def lora_block(model, kind: str, dropout: float = 0.0) -> tuple[FluxTransformer2DModel, torch.nn.Module, tuple]:
    """The tiny transformer in bf16 (so PEFT casts each LoRA input to fp32) with non-zero LoRA B weights, its
    first "single" or "double" block, and the rotary embedding of the block's TOKENS + TEXT_TOKENS positions."""
    transformer, _ = tiny_lora_transformer(model, torch.bfloat16, dropout)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:  # zero at init: the down projections' gradients would be zero too
            torch.nn.init.normal_(param, std=0.1)
    block = (transformer.single_transformer_blocks if kind == "single" else transformer.transformer_blocks)[0]
    return transformer, block, transformer.pos_embed(torch.zeros(TOKENS + TEXT_TOKENS, 3))


def forward_backward(block: torch.nn.Module, fn, rope,
                     dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Output, input gradient and LoRA gradients of a block's forward and backward under bf16 autocast
    (with `dtype` float32: in fp32, no autocast; the same input values)."""
    dim = block.attn.to_q.in_features
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, TOKENS, dim, generator=gen).bfloat16().to(dtype).requires_grad_()
    text = torch.randn(1, TEXT_TOKENS, dim, generator=gen).bfloat16().to(dtype)
    temb = torch.randn(1, dim, generator=gen).bfloat16().to(dtype)
    block.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = fn(hidden, text, temb, image_rotary_emb=rope)
    sum((o.float() ** 2).mean() for o in out).backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    return out[1], hidden.grad, grads


def paired(results: tuple, reference: tuple) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Two `forward_backward` runs' tensors side by side, named: output, input gradient, each parameter's
    gradient (both runs must have gradients for the same parameters)."""
    (out, grad_in, grads), (ref_out, ref_grad_in, ref_grads) = results, reference
    assert sorted(grads) == sorted(ref_grads)
    return [("output", out, ref_out), ("input grad", grad_in, ref_grad_in),
            *[(name, grads[name], ref_grads[name]) for name in ref_grads]]


def assert_same_results(results: tuple, reference: tuple, **tolerance: float) -> None:
    """Two `forward_backward` runs agree (assert_close, with its default or the given rtol and atol): output,
    input gradient and each parameter's gradient."""
    for name, new, ref in paired(results, reference):
        torch.testing.assert_close(new, ref, msg=name, **tolerance)


def assert_as_close_to_fp32(block: torch.nn.Module, rope, results: tuple, reference: tuple, factor: float) -> None:
    """bf16 `results` are within `factor` times the bf16 `reference`'s error of the block's fp32 results, on each
    tensor (plus 0.2% of its largest value): a rounding order that differs passes, a lost, doubled or misscaled
    term is off by its whole size."""
    block32 = copy.deepcopy(block).float()
    exact = forward_backward(block32, block32, rope, torch.float32)
    for (name, new, eager), (_, _, fp32) in zip(paired(results, reference), paired(reference, exact)):
        new_err, eager_err = ((t.float() - fp32).abs().max().item() for t in (new, eager))
        assert new_err <= factor * eager_err + 2e-3 * fp32.abs().max().item(), (name, new_err, eager_err)


def captured(block: torch.nn.Module, graph_pass, counts: list[int]):
    """The block through Dynamo with `graph_pass` applied to its graph (its returns in `counts`), run
    eagerly (no Inductor)."""
    def backend(gm: torch.fx.GraphModule, _inputs):
        counts.append(graph_pass(gm.graph))
        gm.graph.lint()
        gm.recompile()
        return gm
    torch._dynamo.reset()
    return torch.compile(block, backend=backend, fullgraph=True)


@pytest.mark.parametrize("kind, groups", [("single", 1), ("double", 2)])
def test_fused_down_projections_give_the_same_outputs_and_gradients(tiny_flux_dev, kind, groups):
    """Single blocks: q, k, v and proj_mlp read one activation; double blocks: q, k, v of each stream."""
    transformer, block, rope = lora_block(tiny_flux_dev, kind)
    fused: list[int] = []
    results = forward_backward(block, captured(block, fuse_shared_input_linears, fused), rope)
    reference = forward_backward(block, block, rope)
    assert fused == [groups]
    assert len([n for n in reference[2] if "lora_A" in n]) == (5 if kind == "single" else 12)
    assert_same_results(results, reference)  # the split weight gradient lands on each layer's own A


def test_layers_with_lora_dropout_keep_their_own_projections(tiny_flux_dev):
    """Each layer draws its own dropout mask, so the siblings' inputs differ: nothing to fuse."""
    _, block, rope = lora_block(tiny_flux_dev, "single", dropout=0.1)
    fused: list[int] = []
    forward_backward(block, captured(block, fuse_shared_input_linears, fused), rope)
    assert fused == [0]


def test_gelu_tanh_is_torchs_tanh_approximation():
    """x * sigmoid(2u) = 0.5 x (1 + tanh(u)): values and gradients as F.gelu(approximate="tanh") to fp32
    rounding, over the range where both saturate; bf16 inputs give bf16 outputs."""
    x = torch.linspace(-12, 12, 100001, dtype=torch.float64)
    ref = torch.nn.functional.gelu(x, approximate="tanh")
    x32 = x.float().requires_grad_()
    out = gelu_tanh(x32)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    out.backward(torch.ones_like(out))
    x64 = x.clone().requires_grad_()
    torch.nn.functional.gelu(x64, approximate="tanh").backward(torch.ones_like(x64))
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=0, atol=5e-6)  # 1.08: ~20 fp32 ulps
    assert gelu_tanh(torch.ones(3, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("kind, gelus", [("single", 1), ("double", 2)])
def test_gelu_through_a_sigmoid_gives_the_same_outputs_and_gradients(tiny_flux_dev, kind, gelus):
    """Single blocks: the MLP's activation; double blocks: the image and the text stream's MLPs."""
    transformer, block, rope = lora_block(tiny_flux_dev, kind)
    replaced: list[int] = []
    results = forward_backward(block, captured(block, gelu_tanh_as_sigmoid, replaced), rope)
    assert replaced == [gelus]
    assert_same_results(results, forward_backward(block, block, rope))


@pytest.mark.parametrize("kind", ["single", "double"])
def test_rms_norm_rope_as_one_op_gives_the_same_outputs_and_gradients(tiny_flux_dev, kind):
    """q and k each through one `rms_norm_rope`, a double block's with the text stream as the lead (on the CPU the
    op's torch formula: the block's output to the bit, its gradients computed in fp32 from the rotation to the
    norms' inputs). Random positions (zeros make RoPE the identity) and norm weights (each its own)."""
    transformer, block, _ = lora_block(tiny_flux_dev, kind)
    gen = torch.Generator().manual_seed(3)
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):  # ones at init: a swapped weight would pass
        if hasattr(block.attn, name):
            getattr(block.attn, name).weight.data.uniform_(0.5, 1.5, generator=gen)
    ids = torch.randint(0, 64, (TOKENS + TEXT_TOKENS, 3), generator=torch.Generator().manual_seed(2)).float()
    rope = transformer.pos_embed(ids)
    replaced: list[int] = []
    results = forward_backward(block, captured(block, rms_norm_rope_as_one_op, replaced), rope)
    reference = forward_backward(block, block, rope)
    assert replaced == [2]
    assert torch.equal(results[0], reference[0])
    assert_as_close_to_fp32(block, rope, results, reference, factor=1.5)


@pytest.mark.parametrize("kind, change", [("single", "trained norm weight"), ("double", "trained norm weight"),
                                          ("double", "other eps")])
def test_rms_norm_rope_as_one_op_leaves_what_it_cannot_take(tiny_flux_dev, kind, change):
    """The op gives its inputs their only gradients and one eps to the whole concatenation: q is left to Inductor
    where its (image) norm's weight trains, or, in a double block, where the text stream's norm has another eps;
    k is still replaced, and the block's output is unchanged."""
    transformer, block, rope = lora_block(tiny_flux_dev, kind)
    if change == "trained norm weight":
        block.attn.norm_q.weight.requires_grad_(True)
    else:
        block.attn.norm_added_q.eps *= 10
    replaced: list[int] = []
    results = forward_backward(block, captured(block, rms_norm_rope_as_one_op, replaced), rope)
    assert replaced == [1]
    assert torch.equal(results[0], forward_backward(block, block, rope)[0])


@pytest.mark.parametrize("kind, layers", [("single", 5), ("double", 12)])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_lora_up_into_base_output_gives_the_same_outputs_and_gradients(tiny_flux_dev, kind, layers, scale):
    """Every LoRA layer's `result + B(A(x)) * s` as one addmm with the base output as its C operand: single
    blocks q, k, v, proj_mlp and proj_out; double blocks the 6 attention and 2 MLP layers of each stream.
    With s != 1 too (alpha != rank)."""
    transformer, block, rope = lora_block(tiny_flux_dev, kind)
    for module in transformer.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            module.scaling["default"] = scale
    replaced: list[int] = []
    results = forward_backward(block, captured(block, lora_up_into_base_output, replaced), rope)
    assert replaced == [layers]
    # addmm rounds the sum to bf16 once where mm + add rounded twice, so it is not the unfused bf16 result to
    # the bit: measured against the block in fp32, it is about as close as the unfused one to bf16 rounding (either
    # is closer on some tensors; 2.4x further on one tensor on a CPU with AVX-512 bf16 dot products); a wrong scale
    # (10% off fails), weight or layout is off by the size of the LoRA's contribution
    assert_as_close_to_fp32(block, rope, results, forward_backward(block, block, rope), factor=3)


@pytest.mark.parametrize("kind, layers, fp8_inputs", [("single", 5, 2), ("double", 12, 8)])
def test_post_grad_passes_add_in_place_and_quantize_each_input_once(tiny_flux_dev, kind, layers, fp8_inputs):
    """Inductor (on the CPU) with the fp8 base: each LoRA layer's addmm writes into its base output instead of a
    copy of it, and each distinct input of the forward's fp8 GEMMs is quantized into one e4m3 buffer (single
    blocks: the normed input of q, k, v and proj_mlp, and proj_out's; double blocks: each stream's normed input
    of its q, k, v, and the other layers' own), with the same outputs and gradients as without these passes."""
    transformer, block, rope = lora_block(tiny_flux_dev, kind)
    fp8.quantize_blocks(transformer, torch.device("cpu"))
    results, forward_code = {}, {}
    for options in ({"pre_grad_custom_pass": BLOCK_GRAPH_PASSES}, BLOCK_COMPILE_OPTIONS):
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, options=options)
        results[len(options)], code = run_and_get_code(forward_backward, block, compiled, rope)
        forward_code[len(options)] = code[0]
    assert forward_code[2].count("torch.ops.aten.addmm_.default(") == layers  # every layer has a LoRA
    quantized = re.findall(r"_scaled_mm\((\w+), ", forward_code[2])  # the e4m3 buffer each fp8 GEMM reads
    assert len(quantized) == layers and len(set(quantized)) == fp8_inputs
    assert_same_results(results[2], results[1], rtol=0, atol=0)


def test_addmm_in_place_only_where_nothing_else_reads_its_input():
    """`c = a @ b` read again after `addmm(c, h, w)` must keep its values: that addmm stays out of place."""
    def read_again(a, b, h, w):
        c = a @ b
        return torch.addmm(c, h, w) * 2 + c

    def read_once(a, b, h, w):
        return torch.addmm(a @ b, h, w) * 2

    gen = torch.Generator().manual_seed(0)
    a, b, h, w = (torch.randn(shape, generator=gen) for shape in ((32, 16), (16, 24), (32, 4), (4, 24)))
    for fn, in_place in ((read_again, False), (read_once, True)):
        torch._dynamo.reset()
        out, (code,) = run_and_get_code(torch.compile(fn, options=BLOCK_COMPILE_OPTIONS), a, b, h, w)
        torch.testing.assert_close(out, fn(a, b, h, w))
        assert ("aten.addmm_.default(" in code) == in_place, fn.__name__


def aten_graph(fn, *args: torch.Tensor) -> torch.fx.GraphModule:
    """`fn` traced to the functional aten graph that post-grad passes see (with each node's fake value)."""
    return make_fx(fn, tracing_mode="fake")(*args)


def targets(gm: torch.fx.GraphModule, op) -> list[torch.fx.Node]:
    """The graph's nodes that call `op` (or, given "placeholder", its inputs in order)."""
    return [n for n in gm.graph.nodes if (n.op if op == "placeholder" else n.target) == op]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_lora_up_goes_before_its_base_gemm(bias, scale):
    """`addmm(x W.T + b, h, B.T, alpha=s)` becomes `addmm(b + s h B.T, x, W.T)` (or `addmm(h B.T, x, W.T,
    beta=s)` without a bias): the skinny GEMM first, the base GEMM adding its output, in place after
    `addmm_in_place`; the same values."""
    def layer(x, w, b, h, up):
        base = torch.addmm(b, x, w.t()) if bias else torch.mm(x, w.t())
        return torch.addmm(base, h, up.t(), alpha=scale) * 3

    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(shape, generator=gen) for shape in ((32, 64), (24, 64), (24,), (32, 4), (24, 4))]
    gm = aten_graph(layer, *args)
    assert lora_up_before_base(gm.graph) == 1 and addmm_in_place(gm.graph) == 1
    gm.graph.lint()
    gm.recompile()
    x, w, _, h, _ = targets(gm, "placeholder")
    (in_place,) = targets(gm, aten.addmm_.default)
    up, x_in, w_t = in_place.args
    assert x_in is x and w_t.args[0] is w  # the base GEMM: x [32, 64] @ W.T
    assert up.target == (aten.addmm.default if bias else aten.mm.default) and up.args[-2] is h
    torch.testing.assert_close(gm(*args), layer(*args))


def test_lora_up_stays_after_a_base_output_read_elsewhere():
    """A base output that something else reads keeps its GEMM: the LoRA up projection adds into a copy."""
    def layer(x, w, h, up):
        base = torch.mm(x, w.t())
        return torch.addmm(base, h, up.t()) * 3 + base

    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(shape, generator=gen) for shape in ((32, 64), (24, 64), (32, 4), (24, 4))]
    gm = aten_graph(layer, *args)
    assert lora_up_before_base(gm.graph) == 0


@pytest.mark.parametrize("widened", [False, True])
def test_gradient_sums_accumulate_in_the_large_gemms(widened):
    """`g1 W1 + gh A + g2 W2 + other` (views of GEMM outputs, as autograd sums an input's gradient) becomes
    `addmm(addmm(gh A, g1, W1), g2, W2) + other`: the skinny GEMM's output is the seed that the large GEMMs
    add in place. Widened: bf16 terms cast to fp32 and summed there (as CUDA graphs sum a norm's input gradient)
    become the bf16 chain cast once, each partial sum rounded to bf16 as eager autograd rounds it."""
    def term(t):
        t = t.view(2, 16, 24)
        return torch.ops.prims.convert_element_type(t, torch.float32) if widened else t

    def grad_sum(g1, w1, gh, a, g2, w2, other):
        return (term(g1 @ w1) + term(gh @ a) + term(g2 @ w2) + other) * 3

    gen = torch.Generator().manual_seed(0)
    shapes = ((32, 64), (64, 24), (32, 4), (4, 24), (32, 96), (96, 24), (2, 16, 24))
    args = [torch.randn(shape, generator=gen) for shape in shapes]
    if widened:
        args[:6] = [a.bfloat16() for a in args[:6]]
    gm = aten_graph(grad_sum, *args)
    assert sums_into_large_gemms(gm.graph) == 1 and addmm_in_place(gm.graph) == 2
    gm.graph.lint()
    gm.recompile()
    g1, _, gh, _, g2, _, _ = targets(gm, "placeholder")
    first, second = targets(gm, aten.addmm_.default)
    assert first.args[0].target == aten.mm.default and first.args[0].args[0] is gh  # gh A, the seed
    assert second.args[0] is first.args[0]  # both add into its buffer
    assert {first.args[1], second.args[1]} == {g1, g2}
    assert len(targets(gm, aten.mm.default)) == 1 and len(targets(gm, aten.add.Tensor)) == 1  # + other
    assert len(targets(gm, torch.ops.prims.convert_element_type.default)) == widened
    if not widened:
        torch.testing.assert_close(gm(*args), grad_sum(*args))
        return
    g1, w1, gh, a, g2, w2, other = args
    eager = ((torch.addmm(torch.addmm(gh @ a, g1, w1), g2, w2)).view(2, 16, 24).float() + other) * 3
    torch.testing.assert_close(gm(*args), eager, rtol=0, atol=0)  # bf16 partial sums, as eager rounds them


@pytest.mark.parametrize("cat_dim, amax_dim, replaced", [(-1, -1, 1), (2, 1, 1), (1, -1, 0), (-1, 0, 0)])
def test_row_amax_of_a_concatenation_is_taken_part_by_part(cat_dim, amax_dim, replaced):
    """`amax(abs(cat([a, b], -1).view(rows, -1)), -1, keepdim=True)` (the fp8 quantization's row scale of a
    single block's proj_out input) becomes the larger of a's and b's row amaxes, to the bit; a concatenation along
    another dimension, or an amax over another, stays as it is."""
    def row_scale(a, b):
        x = torch.cat([a, b], cat_dim)
        return (x.view(-1, x.shape[-1]).abs().amax(amax_dim, keepdim=True) * 3).float()

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1, 8, 16, generator=gen).bfloat16()
    b = torch.randn(1, 8, 48 if cat_dim in (-1, 2) else 16, generator=gen).bfloat16()
    a[0, :4] *= 8  # the largest magnitude in a for half the rows, in b for the others
    gm = aten_graph(row_scale, a, b)
    assert row_amax_by_part(gm.graph) == replaced
    gm.graph.lint()
    gm.recompile()
    read = [n.args[0] for n in targets(gm, aten.abs.default)]  # what each abs reads: the parts, or the whole
    if replaced:
        assert read == targets(gm, "placeholder")
    else:
        assert len(read) == 1 and read[0].op != "placeholder"
    torch.testing.assert_close(gm(a, b), row_scale(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("kind, layers, sums, backward_in_place, dtype",
                         [("single", 5, 2, 5, torch.bfloat16), ("single", 5, 2, 5, torch.float32),
                          ("double", 12, 7, 9, torch.float32)])  # ~25 s each on 2 CPU cores: no bf16 double
def test_base_gemms_add_lora_and_gradient_terms_in_their_epilogue(tiny_flux_dev, kind, layers, sums,
                                                                 backward_in_place, dtype, monkeypatch):
    """Inductor (on the CPU) with the bf16 (or fp32) base: every LoRA layer's up projection goes before its base
    GEMM, which adds it in place, and each gradient summed over layers (single blocks: the normed input of q, k,
    v, proj_mlp and the LoRA's fused down projection, proj_out's input; double blocks: the image stream's q, k, v
    input and each stream's other layers; this test's text input needs no gradient) is accumulated by the large
    GEMMs in place. In fp32 the outputs and gradients are the eager block's; in bf16 the sums are rounded in another
    order (each addmm rounds its partial sum), and the results are about as close to the fp32 block's as the eager
    bf16 block's are (within 4x on each of the tiny block's tensors), where a lost or doubled term is off by the
    term's whole size."""
    from fluxlora import graph_passes

    _, block, rope = lora_block(tiny_flux_dev, kind)
    block = block.to(dtype)  # the LoRA weights stay in fp32
    counts: dict[str, list[int]] = {}
    for name in ("lora_up_before_base", "sums_into_large_gemms", "addmm_in_place"):
        def counted(graph, _pass=getattr(graph_passes, name), _name=name):
            counts.setdefault(_name, []).append(_pass(graph))
            return counts[_name][-1]
        monkeypatch.setattr(graph_passes, name, counted)
    monkeypatch.setenv("CI", "true")  # as on GitHub Actions, where Inductor refuses implicit ATen fallbacks
    with torch._inductor.config.patch(force_disable_caches=True):  # the passes must run to be counted
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, options=BLOCK_COMPILE_OPTIONS)
        results = forward_backward(block, compiled, rope, dtype)
    assert counts == {"lora_up_before_base": [layers, 0], "sums_into_large_gemms": [0, sums],
                      "addmm_in_place": [layers, backward_in_place]}  # [forward graph, backward graph]
    reference = forward_backward(block, block, rope, dtype)
    if dtype == torch.bfloat16:
        assert_as_close_to_fp32(block, rope, results, reference, factor=4)
        return
    for name, new, eager in paired(results, reference):
        # fp32 rounding of the reordered sums, on each tensor's scale (from 1e-3 to 4 in the tiny block)
        torch.testing.assert_close(new, eager, rtol=0, atol=1e-5 * eager.abs().max().item(), msg=name)
