"""Graph passes for the compiled blocks: LoRA down projections that read the same input as one GEMM,
each LoRA up projection added to its base output inside a GEMM, the tanh GELU through a sigmoid, and the q/k RMS
norms with RoPE as one op with kernels of its own; after autograd, sums of GEMM outputs accumulated
in the large GEMMs' epilogues, in place, and one fp8 quantization per shared input.

LoRA down projections. In each FLUX block several LoRA layers read one activation: q, k, v and the MLP's
input layer of a single-stream block read its normed hidden states, and q, k, v (and the text stream's three) of a
double-stream block read theirs. Each down projection A [r, K] is a skinny GEMM that reads the whole
activation [tokens, K] for r outputs per token, in the forward and again for its weight gradient in the
backward: bound by memory, not FLOPs. Concatenating the siblings' A along their outputs reads the
activation once per pass: one GEMM x [tokens, K] @ [A_q; A_k; A_v; ...].T, split into each layer's
[tokens, r]. The outputs are the same dot products (summed in one kernel instead of several); autograd
splits the weight gradient back onto each A, so the LoRA parameters and files are unchanged.

Inductor's own `batch_linear_lhs` pass does the same only for 2-D inputs (FLUX's are [batch, tokens,
features]) and groups of five or more.

LoRA up projections. PEFT computes a LoRA layer as `result + B(A(x)) * s`: the base GEMM writes `result`
[tokens, N], the up projection's GEMM writes `B(A(x))` [tokens, N], and an elementwise kernel reads both to write
the sum (4 passes over [tokens, N]; 80 us per single block for the MLP's input layer at 1024 px on an H200).
`addmm(result, A(x), B.T, alpha=s)` has cuBLAS read `result` as its C operand and write the sum, one bf16 rounding
instead of two, and, once run in place (`addmm_in_place` below), 2 passes: 2.4-3.3 ms per 1024 px step with the fp8
base and 3.1-6.2 ms in bf16 (session 13), then 6.1 and 4.2 ms more in place (session 14).

The GELU. FLUX's MLPs use GELU's tanh approximation, 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3).
Inductor computes tanh with libdevice's accurate `tanhf` (a few dozen instructions), in each kernel that reads
the activation (the fp8 path's amax and quantization each recompute it) and again in the backward: 57 M values
per block at 1024 px. 0.5 (1 + tanh(u)) = sigmoid(2u) exactly, and Triton's sigmoid is one fast exp and a
division: the same function, rounded differently in fp32 (~1e-7), far below the bf16 it is stored in. On an
H200 the kernels holding the activation ran 3-30% faster, sample.py's compiled 1024 px image 1.9%
(bench/RESULTS.md, session 12).

q/k norm and RoPE. Inductor fuses a single block's q and k RMS norms with diffusers' `apply_rotary_emb` into one
kernel per direction, but rotates value by value, each value gathering its pair partner: ~1 TB/s. The op
`norm_rope.rms_norm_rope` reads each head row once, in Triton kernels forward and backward 2.5x faster: -4.4 ms
per 1024 px fp8 step and -3.7 ms in bf16 on an H200 with the single blocks' (bench/RESULTS.md, session 20). A
double block's rotation reads the text and image streams' norms concatenated; the op takes the text stream as a
lead with its own weight and writes the concatenation itself: another -0.9 to -1.3 ms per fp8 step (session 22).

These run on Dynamo's graph before autograd (Inductor's `pre_grad_custom_pass`): they see the model's
`F.linear`, `F.gelu`, `rms_norm` and RoPE calls, and autograd derives the backward of what they leave (the
norm and RoPE op's backward is its own).

Five more run on the forward and backward graphs after autograd (`post_grad_custom_post_pass`), where they
change how the GEMMs add their terms and how Inductor lowers them, not what is computed:
- With a bf16 base, each LoRA up projection goes before its base GEMM, which adds it in its epilogue
  (`lora_up_before_base`): a GEMM bound by FLOPs reads an addend at no visible cost, where the skinny up
  projection, bound by memory, would read and write [tokens, N] to add into the base output.
- In the backward, an input's gradient summed over the layers that read it (a single block's q, k, v, MLP and
  LoRA down projection) is accumulated by the base layers' GEMMs in their epilogues, the LoRA's first
  (`sums_into_large_gemms`), instead of each GEMM writing its term for an elementwise kernel to read them all.
  The fp8 base's `_scaled_mm` takes no addend, so these two change the bf16 (and low-memory fp8) path only.
- An addmm whose C operand is a GEMM output read by nothing else runs in place (`addmm_`). Inductor gives
  addmm a new output buffer, and ATen then copies C into it before cuBLAS adds the product: one memcpy of
  [tokens, N] per LoRA layer after the up-projection pass (418 per step, 6.5 ms of a 1024 px fp8 step on an H200).
  Its readers then read C, so that Inductor orders them after the write.
- A row amax over a concatenation (the fp8 quantization of a single block's proj_out input, cat(attention,
  GELU(mlp))) is taken part by part and the largest kept: the same maximum, without a kernel of its own that reads
  the whole concatenation back.
- A tensor that several `_scaled_mm` read (one fp8 quantization of q, k, v and the MLP's shared input) is
  materialised once. `_scaled_mm` needs exact strides, and Inductor meets that for an input still pending as
  a fused elementwise expression (the e4m3 cast) by writing a copy per GEMM: four e4m3 copies of a single
  block's normed input where one does.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch._inductor import inductor_prims
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph, Node

from . import norm_rope

aten = torch.ops.aten

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)
_GELU = (torch._C._nn.gelu, torch.nn.functional.gelu)
_ADD = (operator.add, torch.add)
_MUL = (operator.mul, torch.mul)
_TWO_SQRT_2_OVER_PI = 2 * (2 / torch.pi) ** 0.5
_GEMMS = (aten.mm.default, aten.addmm.default, aten._scaled_mm.default)  # each writes a new tensor
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_CONVERT = torch.ops.prims.convert_element_type.default


def _example(node: object) -> torch.Tensor | None:
    """The example value Dynamo recorded for a graph node (None for constants and non-tensors)."""
    value = node.meta.get("example_value") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _arg(node: Node, index: int, name: str) -> object:
    """A call's argument, given by position or by name (None when absent)."""
    return node.kwargs.get(name, node.args[index] if len(node.args) > index else None)


def _graph_weight_linear(node: object) -> tuple[Node, Node, torch.Tensor] | None:
    """(x, W's node, W's example) of a bias-free `linear(x, W)` whose 2-D W is an input of the graph (a
    parameter, as LoRA's are), else None."""
    if not isinstance(node, Node) or node.op != "call_function" or node.target not in _LINEAR:
        return None
    x, weight = node.args[0], _arg(node, 1, "weight")
    w = _example(weight)
    if (_arg(node, 2, "bias") is not None or not isinstance(x, Node) or w is None or w.dim() != 2
            or weight.op not in ("placeholder", "get_attr")):
        return None
    return x, weight, w


def _skinny_linear_input(node: Node) -> Node | None:
    """The input of a bias-free `linear(x, W)` whose W [N, K] is an input of the graph with N <= K / 4
    (a LoRA down projection), else None."""
    found = _graph_weight_linear(node)
    return found[0] if found is not None and 4 * found[2].shape[0] <= found[2].shape[1] else None


def _source(x: Node) -> tuple:
    """What a linear's input is computed from: PEFT casts it to the LoRA weights' dtype in each layer
    (`x.to(torch.float32)`), which gives each sibling its own node for the same values."""
    if x.op == "call_method" and x.target == "to":
        return (x.args, tuple(sorted(x.kwargs.items())))
    return (x,)


def fuse_shared_input_linears(graph: Graph) -> int:
    """Replace each group of two or more skinny bias-free linears of the same input by one linear over
    their concatenated weights, split back into the group's outputs. Returns the number of groups.

    x [..., K], weights W_i [N_i, K] -> linear(x, cat(W_i)) [..., sum N_i] -> split into [..., N_i].
    """
    groups: dict[tuple, list[Node]] = defaultdict(list)
    for node in graph.nodes:
        x = _skinny_linear_input(node)
        if x is not None:
            groups[_source(x)].append(node)
    fused = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        x, weights = members[0].args[0], [_arg(m, 1, "weight") for m in members]  # members in graph order
        x_example, sections = _example(x), [_example(w).shape[0] for w in weights]
        with graph.inserting_before(members[0]):
            stacked = graph.call_function(torch.cat, (weights,), {"dim": 0})
            # shapes for later passes (as Dynamo records them): [sum N_i, K] and [..., sum N_i]
            stacked.meta["example_value"] = _example(weights[0]).new_empty(sum(sections), x_example.shape[-1])
            out = graph.call_function(torch._C._nn.linear, (x, stacked))
            out.meta["example_value"] = x_example.new_empty(*x_example.shape[:-1], sum(sections))
            parts = graph.call_function(torch.split, (out, sections), {"dim": -1})
            for index, member in enumerate(members):
                piece = graph.call_function(operator.getitem, (parts, index))
                piece.meta.update(member.meta)
                member.replace_all_uses_with(piece)
        for member in members:
            old_input = member.args[0]
            graph.erase_node(member)
            if isinstance(old_input, Node) and not old_input.users:  # the other siblings' casts
                graph.erase_node(old_input)
        fused += 1
    return fused


def _lora_up(node: object) -> tuple[Node, Node, float, list[Node]] | None:
    """For `linear(h, B) * s` or `linear(h, B)` with B [N, r] a bias-free graph input, 4 r <= N (a LoRA up
    projection) and s a number: (h, B, s, its nodes, consumers first), else None."""
    scale, nodes = 1.0, []
    if (isinstance(node, Node) and node.op == "call_function" and node.target in _MUL and len(node.users) == 1
            and len(node.args) == 2):
        numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        tensors = [a for a in node.args if isinstance(a, Node)]
        if len(numbers) != 1 or len(tensors) != 1:
            return None
        nodes.append(node)
        scale, node = float(numbers[0]), tensors[0]
    found = _graph_weight_linear(node)
    if found is None or len(node.users) != 1 or 4 * found[2].shape[1] > found[2].shape[0]:
        return None
    return found[0], found[1], scale, nodes + [node]


def lora_up_into_base_output(graph: Graph) -> int:
    """Replace each `result + linear(h, B) * s` (a LoRA layer's output: the base layer's plus its up
    projection) by one `addmm(result, h, B.T, alpha=s)`. Returns the number replaced.

    result [..., N], h [..., r], B [N, r] -> [..., N]: the GEMM reads the base output as its C operand and
    writes the sum, instead of writing the up projection for an elementwise kernel to read back beside the
    base output (2 passes over [..., N] after the base GEMM's write instead of 4, and one rounding to bf16
    instead of two).
    """
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _ADD or len(node.args) != 2 or node.kwargs:
            continue
        out_value = _example(node)
        for base, lora in (node.args, node.args[::-1]):
            up, base_value = _lora_up(lora), _example(base)
            if up is None or base_value is None or out_value is None:
                continue
            h, weight, scale, dead = up
            h_value = _example(h)
            # same shape and dtype as the sum (no broadcast, no promotion): addmm computes exactly the sum
            if (h_value is None or base_value.shape != out_value.shape or base_value.dtype != out_value.dtype
                    or h_value.dtype != out_value.dtype):
                continue
            with graph.inserting_before(node):
                base_2d = graph.call_method("reshape", (base, -1, base_value.shape[-1]))
                h_2d = graph.call_method("reshape", (h, -1, h_value.shape[-1]))
                weight_t = graph.call_method("t", (weight,))
                out_2d = graph.call_function(torch.addmm, (base_2d, h_2d, weight_t), {"alpha": scale})
                out = graph.call_method("view_as", (out_2d, base))
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            for unused in dead:
                graph.erase_node(unused)
            replaced += 1
            break
    return replaced


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation as x * sigmoid(2u): x [...] -> [...], equal to
    `F.gelu(x, approximate="tanh")` up to fp32 rounding (computed in fp32, as Inductor computes the original)."""
    x32 = x.float()
    return (x32 * torch.sigmoid(_TWO_SQRT_2_OVER_PI * x32 * (1 + 0.044715 * x32 * x32))).to(x.dtype)


def gelu_tanh_as_sigmoid(graph: Graph) -> int:
    """Replace each `gelu(x, approximate="tanh")` by `gelu_tanh(x)`. Returns the number replaced."""
    replaced = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _GELU and _arg(node, 1, "approximate") == "tanh":
            with graph.inserting_before(node):
                new = graph.call_function(gelu_tanh, (node.args[0],))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            replaced += 1
    return replaced


def _method(node: object, name: str) -> bool:
    """Whether `node` calls the tensor method `name`."""
    return isinstance(node, Node) and node.op == "call_method" and node.target == name


def _function(node: object, *functions: object) -> bool:
    """Whether `node` calls one of `functions`."""
    return isinstance(node, Node) and node.op == "call_function" and node.target in functions


def _rotated_pairs(rotated: object) -> tuple[Node, list[Node]] | None:
    """(x, the nodes from x's reshape to `rotated`) where `rotated` is `flatten(stack([-imag, real], -1), 3)` of
    `real, imag = x.reshape(..., -1, 2).unbind(-1)` for an x [B, S, H, D]: the rotation by 90 degrees that
    diffusers' `apply_rotary_emb` multiplies by sin. Else None."""
    if not _method(rotated, "flatten"):
        return None
    stack = rotated.args[0]
    if not (_function(stack, torch.stack) and _arg(stack, 1, "dim") == -1 and len(stack.args[0]) == 2):
        return None
    neg, real = stack.args[0]
    if not (_function(neg, operator.neg) or _method(neg, "neg")) or not _function(real, operator.getitem):
        return None
    imag = neg.args[0]
    if (not _function(imag, operator.getitem) or (real.args[1], imag.args[1]) != (0, 1)
            or imag.args[0] is not real.args[0]):
        return None
    unbind, reshape = real.args[0], real.args[0].args[0]
    if not (_method(unbind, "unbind") and unbind.args[1:] == (-1,) and _method(reshape, "reshape")):
        return None
    x = reshape.args[0]
    pairs, whole = _example(reshape), _example(x)
    if (pairs is None or whole is None or whole.dim() != 4 or pairs.shape[-1] != 2
            or pairs.shape[:-2] != whole.shape[:-1] or _arg(rotated, 1, "start_dim") != 3):
        return None
    return x, [rotated, stack, neg, real, imag, unbind, reshape]


def _rope(node: Node) -> tuple[Node, Node, Node, list[Node]] | None:
    """(x, cos, sin, the nodes between x and `node`) where `node` is diffusers' `apply_rotary_emb(x, (cos, sin),
    sequence_dim=1)` on an x [B, S, H, D]: `(x.float() * cos + rotated(x).float() * sin).to(x.dtype)`, cos and sin
    [1, S, 1, D]. Else None."""
    if not _method(node, "to") or len(node.args) != 2 or node.kwargs:
        return None
    add = node.args[0]
    if not _function(add, *_ADD) or len(add.args) != 2 or len(add.users) != 1:
        return None
    terms = [term for term in add.args
             if _function(term, *_MUL) and len(term.users) == 1 and _method(term.args[0], "float")]
    if len(terms) != 2:
        return None
    for straight, turned in (terms, terms[::-1]):  # x.float() * cos + rotated.float() * sin, in either order
        found = _rotated_pairs(turned.args[0].args[0])
        if found is not None and found[0] is straight.args[0].args[0]:
            break
    else:
        return None
    x, chain = found
    cos, sin, whole = _example(straight.args[1]), _example(turned.args[1]), _example(x)
    table = (1, whole.shape[1], 1, whole.shape[3])
    if (cos is None or sin is None or tuple(cos.shape) != table or tuple(sin.shape) != table
            or node.args[1] != whole.dtype):
        return None
    return x, straight.args[1], turned.args[1], [node, add, straight, turned, straight.args[0], turned.args[0], *chain]


def _frozen_rms_norm(node: object, users: int) -> tuple[Node, Node, float] | None:
    """(x, weight, eps) where `node` is `rms_norm(x, (D,), weight, eps)` over x's last dimension with a weight that
    takes no gradient, read by `users` nodes. Else None."""
    if not (_function(node, torch.rms_norm, torch.nn.functional.rms_norm) and len(node.args) == 4
            and not node.kwargs and len(node.users) == users and isinstance(node.args[2], Node)):
        return None
    x, shape, weight, eps = node.args
    example = _example(weight)
    if tuple(shape) != (_example(x).shape[-1],) or not isinstance(eps, float) or example is None:
        return None
    return None if example.requires_grad else (x, weight, eps)


def _rope_input_norms(x: Node) -> tuple[tuple, list[Node]] | None:
    """(the op's arguments after the tables: eps and, for a double block, the lead and its weight, with x and its
    weight first; the norm nodes) where the rotation's input `x` is `rms_norm(x)` (a single block, read by the
    rotation's two paths) or `cat([rms_norm(text), rms_norm(image)], 1)` (a double block). Else None."""
    if not _function(x, torch.cat):
        found = _frozen_rms_norm(x, users=2)
        return None if found is None else (found, [x])
    if len(x.users) != 2 or _arg(x, 1, "dim") != 1 or len(x.args[0]) != 2:
        return None
    lead, main = (_frozen_rms_norm(part, users=1) for part in x.args[0])
    if lead is None or main is None or lead[2] != main[2]:
        return None
    return (main[0], main[1], main[2], lead[0], lead[1]), [x, *x.args[0]]


def rms_norm_rope_as_one_op(graph: Graph) -> int:
    """Replace each `apply_rotary_emb(rms_norm(x, (D,), weight, eps), (cos, sin), sequence_dim=1)` (a single
    block's q and k) by `norm_rope.rms_norm_rope(x, weight, cos, sin, eps)`, and each `apply_rotary_emb(cat(
    [rms_norm(text, ...), rms_norm(x, ...)], 1), ...)` (a double block's, the text stream first) by the op with
    the text stream as its lead: Triton kernels that read each head row once. Returns the number replaced.

    Only where the norms' weights and the tables take no gradient (the frozen base's; the op gives x and the lead
    their only gradients)."""
    replaced = 0
    for node in list(graph.nodes):
        found = _rope(node)
        if found is None:
            continue
        rotated, cos, sin, chain = found
        norms = _rope_input_norms(rotated)
        tables = [_example(t) for t in (cos, sin)]
        if norms is None or any(t is None or t.requires_grad for t in tables):  # the op gives no table a gradient
            continue
        (x, weight, eps, *lead), erased = norms
        with graph.inserting_before(node):
            flat = [graph.call_method("flatten", (t, 0, 2)) for t in (cos, sin)]  # [1, S, 1, D] -> [S, D]
            op = graph.call_function(torch.ops.fluxlora.rms_norm_rope.default, (x, weight, *flat, eps, *lead))
            out = graph.call_function(operator.getitem, (op, 0))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        _erase_unused([*chain, *erased])
        replaced += 1
    return replaced


def _gemm_behind(node: object, widening: bool = False) -> tuple[list[Node], Node] | None:
    """(the views between, the GEMM) when `node` is a GEMM's output through views only (and widening casts, with
    `widening`) and nothing else reads that output (in the aten graph after autograd): its one reader may then
    overwrite it. Else None."""
    chain = []
    while isinstance(node, Node) and node.op == "call_function" and len(node.users) == 1:
        if node.target in _GEMMS:
            return chain, node
        if node.target not in _VIEWS and not (widening and _widens(node)):
            return None
        chain.append(node)
        node = node.args[0]
    return None


def _inner(gemm: Node) -> int:
    """The length of a GEMM's dot products: K of its [M, K] left operand."""
    return gemm.args[1 if gemm.target == aten.addmm.default else 0].meta["val"].shape[1]


def _big_enough(gemm: Node, small: Node) -> bool:
    """Whether `gemm` does enough work per output to read an addend in its epilogue for free, beside `small`
    (whose addend it would read): a base layer's K beside a LoRA's rank."""
    return _inner(gemm) >= 4 * _inner(small)


def _plain_addmm(node: Node) -> bool:
    """addmm(C, a, b) with beta = alpha = 1."""
    return node.target == aten.addmm.default and node.kwargs.get("alpha", 1) == 1 and node.kwargs.get("beta", 1) == 1


def _erase_unused(nodes: list[Node]) -> None:
    """Erase those of `nodes` that nothing reads any more, and then what only they read among `nodes`."""
    pending = list(nodes)
    while pending:
        unused = [n for n in pending if not n.users]
        if not unused:
            return
        for node in unused:
            node.graph.erase_node(node)
            pending.remove(node)


def _widens(node: Node) -> bool:
    """Whether `node` casts a float tensor to a wider float type (exactly: bf16 to fp32)."""
    if node.op != "call_function" or node.target != _CONVERT:
        return False
    source, out = node.args[0].meta.get("val"), node.meta.get("val")
    return (isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor) and source.dtype.is_floating_point
            and out.dtype.is_floating_point and out.dtype.itemsize > source.dtype.itemsize)


def lora_up_before_base(graph: Graph) -> int:
    """Swap each `addmm(base, h, B.T, alpha=s)` (a LoRA up projection adding into its base layer's output, from
    the pre-grad pass) whose base is a bf16 `mm(x, W.T)` or `addmm(bias, x, W.T)` that nothing else reads for
    `addmm(addmm(bias, h, B.T, alpha=s), x, W.T)`: the up projection first, then the base GEMM adding it in its
    epilogue. Returns the number swapped.

    The same sum; but the skinny up projection [M, r] @ [r, N] is bound by memory, and as the second GEMM it reads
    and writes [M, N] (in place) where as the first it only writes it. The base GEMM, bound by FLOPs, reads its
    addend at no visible cost. The fp8 base (`_scaled_mm`) takes no addend: its layers keep the order.
    """
    swapped = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.addmm.default or node.kwargs.get("beta", 1) != 1:
            continue
        found = _gemm_behind(node.args[0])
        if found is None:
            continue
        views, base = found
        if (not (base.target == aten.mm.default or _plain_addmm(base))
                or base.meta["val"].shape != node.meta["val"].shape or not _big_enough(base, node)):
            continue
        if base.target == aten.addmm.default and base.args[0].meta["val"].dim() != 1:
            continue  # a bias is 1-D; another C is not this pattern
        x, weight_t = base.args[-2:]
        h, up_t = node.args[1:3]
        scale = node.kwargs.get("alpha", 1)
        with graph.inserting_before(node):
            if base.target == aten.addmm.default:  # bias + s h B.T, then + x W.T
                up = graph.call_function(aten.addmm.default, (base.args[0], h, up_t), {"alpha": scale})
                out = graph.call_function(aten.addmm.default, (up, x, weight_t))
            else:  # h B.T, then s (h B.T) + x W.T
                up = graph.call_function(aten.mm.default, (h, up_t))
                out = graph.call_function(aten.addmm.default, (up, x, weight_t), {"beta": scale})
        up.meta["val"] = node.meta["val"]
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        _erase_unused([node, *views, base])
        swapped += 1
    return swapped


def _is_add(node: object) -> bool:
    """A two-tensor `add` without broadcasting or a scale."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target == aten.add.Tensor
            and len(node.args) == 2 and not node.kwargs and all(isinstance(a, Node) for a in node.args)):
        return False
    out = node.meta.get("val")
    return all(isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].shape == out.shape
               and a.meta["val"].dtype == out.dtype for a in node.args)


def _sum_terms(root: Node) -> tuple[list[Node], list[Node]]:
    """The terms of the sum that `root` ends (its adds that nothing else reads, flattened) and those adds."""
    terms, adds, stack = [], [root], list(root.args)
    while stack:
        node = stack.pop(0)
        if _is_add(node) and len(node.users) == 1:
            adds.append(node)
            stack = list(node.args) + stack
        else:
            terms.append(node)
    return terms, adds


def sums_into_large_gemms(graph: Graph) -> int:
    """Rewrite each sum of GEMM outputs (a backward's gradient for an input that several layers read: the base
    layers' `mm(grad, W)` and the LoRA's `mm(grad_h, A)`) as a chain of addmms: the GEMM with the shortest dot
    products (the LoRA's) first, then each `mm` with 4x longer ones adding the running sum in its epilogue. What
    the sum had beside (other terms) is added after. Returns the number of sums rewritten.

    Before, each GEMM wrote its [M, K] and one elementwise kernel read them all; after, the big GEMMs read their
    addend where they are bound by FLOPs, and one tensor is left to read. Each addmm rounds to bf16, as eager
    autograd's accumulation does; where the graph sums the terms widened to fp32 (on CUDA, a norm's backward
    does), the bf16 total is widened once. With the fp8 base the big GEMMs are `_scaled_mm`, which take no addend:
    unchanged.
    """
    rewritten = 0
    for root in list(graph.nodes):
        if not _is_add(root) or (len(root.users) == 1 and _is_add(next(iter(root.users)))):
            continue  # not an add, or inside a larger sum
        terms, adds = _sum_terms(root)
        if len(set(terms)) != len(terms):
            continue  # a term added twice: left as it is
        behind = {t: _gemm_behind(t, widening=True) for t in terms}
        behind = {t: found for t, found in behind.items() if found is not None and found[1].meta["val"].is_contiguous()}
        gemms = {t: gemm for t, (_, gemm) in behind.items()}
        if len(gemms) < 2:
            continue
        seed_term = min(gemms, key=lambda t: _inner(gemms[t]))
        seed = gemms[seed_term]
        value = seed.meta["val"]
        absorbed = [t for t, g in gemms.items() if t is not seed_term and g.target == aten.mm.default
                    and g.meta["val"].shape == value.shape and g.meta["val"].dtype == value.dtype
                    and _big_enough(g, seed)]
        if not absorbed:
            continue
        out_value = root.meta["val"]
        with graph.inserting_before(root):
            total = seed
            for term in absorbed:
                total = graph.call_function(aten.addmm.default, (total, *gemms[term].args[:2]))
                total.meta["val"] = value
            total = graph.call_function(aten.view.default, (total, list(out_value.shape)))
            total.meta["val"] = value.view(out_value.shape)
            if out_value.dtype != value.dtype:  # the terms were widened (a norm's backward sums in fp32)
                total = graph.call_function(_CONVERT, (total, out_value.dtype))
                total.meta["val"] = out_value
            for term in terms:
                if term is not seed_term and term not in absorbed:
                    total = graph.call_function(aten.add.Tensor, (total, term))
                    total.meta["val"] = out_value
        root.replace_all_uses_with(total)
        _erase_unused(adds + [n for t in [seed_term, *absorbed] for n in behind[t][0]] + [gemms[t] for t in absorbed])
        rewritten += 1
    return rewritten


def addmm_in_place(graph: Graph) -> int:
    """Replace each `addmm(C, a, b)` whose C [M, N] is a contiguous GEMM output read only by it by
    `addmm_(C, a, b)`, the same sum written into C's memory. Returns the number replaced.

    A chain of them (sums_into_large_gemms) adds into one buffer: each is chosen on the graph as it was."""
    chosen = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target != aten.addmm.default:
            continue
        c, out = node.args[0], node.meta.get("val")
        c_value = c.meta.get("val") if isinstance(c, Node) else None
        if (c_value is None or out is None or c_value.shape != out.shape or c_value.dtype != out.dtype
                or not c_value.is_contiguous() or _gemm_behind(c) is None):
            continue
        chosen.append(node)
    if chosen:
        _lower_addmm_in_place_as_aten()
    for node in chosen:
        node.target = aten.addmm_.default
        node.replace_all_uses_with(node.args[0])  # its readers read C, which now holds the sum
    return len(chosen)


def _lower_addmm_in_place_as_aten() -> None:
    """Register ATen's `addmm_` kernel as Inductor's lowering of it, operands in the graph's layouts.

    Inductor has none, and its implicit fallback refuses to run where the CI variable is set (GitHub Actions
    sets it: `addmm_` has a decomposition) and, in a backward graph, first copies each operand to contiguous
    memory, where cuBLAS takes transposed ones as they are."""
    from torch._inductor import lowering  # here, where Inductor is compiling: importing it costs ~1 s

    if aten.addmm_.default not in lowering.lowerings:
        lowering.make_fallback(aten.addmm_.default, warn=False)


def one_copy_per_scaled_mm_input(graph: Graph) -> int:
    """Give each computed tensor that two or more `_scaled_mm` read one materialised copy in its own layout
    (Inductor's `force_stride_order`, which the GEMMs then share). Returns the number of such tensors."""
    shared = 0
    for node in list(graph.nodes):
        readers = [user for user in node.users if user.target == aten._scaled_mm.default]
        value = node.meta.get("val")
        if node.op != "call_function" or len(readers) < 2 or not isinstance(value, torch.Tensor):
            continue
        with graph.inserting_after(node):
            once = graph.call_function(inductor_prims.force_stride_order, (node, list(value.stride())))
        once.meta["val"] = value
        for reader in readers:
            reader.replace_input_with(node, once)
        shared += 1
    return shared


def row_amax_by_part(graph: Graph) -> int:
    """Replace each row amax `amax(abs(cat(parts, -1)), -1, keepdim)` (through views that keep the rows) by the
    largest of the parts' own row amaxes, viewed in the row amax's shape. Returns the number replaced.

    The same maximum to the bit. A single block's proj_out quantizes cat(attention, GELU(mlp)) [tokens, 15360] per
    row: its amax was a kernel of its own that read the whole concatenation back (96 us per block at 1024 px on an
    H200); the GELU part's amax runs where the GELU is formed instead: 1.0 ms of kernels and 2.0 ms per fp8 step
    less in a same-call A/B (bench/RESULTS.md, session 19)."""
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.amax.default or len(node.args) < 3 or not node.args[2]:
            continue
        magnitude = node.args[0]
        if not isinstance(magnitude, Node) or magnitude.target != aten.abs.default or len(magnitude.users) != 1:
            continue
        rows = magnitude.args[0]
        width = rows.meta["val"].shape[-1]
        if list(node.args[1]) not in ([-1], [rows.meta["val"].dim() - 1]):
            continue
        cat = rows
        while cat.target in _VIEWS and cat.args[0].meta["val"].shape[-1] == width:  # the same rows, in order
            cat = cat.args[0]
        if cat.target != aten.cat.default or cat.meta["val"].shape[-1] != width:
            continue
        dim, ndim = _arg(cat, 1, "dim") or 0, cat.meta["val"].dim()
        if dim % ndim != ndim - 1 or any(p.meta["val"].dim() != ndim or not p.meta["val"].shape[-1]
                                         for p in cat.args[0]):  # cat skips empty 1-D parts; amax refuses them
            continue
        value = node.meta["val"]
        with graph.inserting_before(node):
            maxes = []
            for part in cat.args[0]:
                part_value = part.meta["val"]
                part_abs = graph.call_function(aten.abs.default, (part,))
                part_abs.meta["val"] = part_value
                part_max = graph.call_function(aten.amax.default, (part_abs, [-1], True))
                part_max.meta["val"] = part_value.new_empty(*part_value.shape[:-1], 1)
                maxes.append(graph.call_function(aten.view.default, (part_max, list(value.shape))))
                maxes[-1].meta["val"] = value
            largest = maxes[0]
            for other in maxes[1:]:
                largest = graph.call_function(aten.maximum.default, (largest, other))
                largest.meta["val"] = value
        node.replace_all_uses_with(largest)
        _erase_unused([node, magnitude])
        replaced += 1
    return replaced


class _PassesOfThisFile(CustomGraphPass):
    """A custom pass whose uuid is the hash of this file and of the op it inserts (`norm_rope`), so that compiled
    graphs stay cacheable and change with them."""

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__, norm_rope.__file__))


class BlockGraphPasses(_PassesOfThisFile):
    """`fuse_shared_input_linears`, `lora_up_into_base_output`, `gelu_tanh_as_sigmoid` and
    `rms_norm_rope_as_one_op` as Inductor's `pre_grad_custom_pass`."""

    def __call__(self, graph: Graph) -> None:
        fuse_shared_input_linears(graph)
        lora_up_into_base_output(graph)
        gelu_tanh_as_sigmoid(graph)
        rms_norm_rope_as_one_op(graph)


class BlockPostGradPasses(_PassesOfThisFile):
    """`lora_up_before_base`, `sums_into_large_gemms`, `addmm_in_place`, `row_amax_by_part` and
    `one_copy_per_scaled_mm_input` as Inductor's `post_grad_custom_post_pass`."""

    def __call__(self, graph: Graph) -> None:
        lora_up_before_base(graph)
        sums_into_large_gemms(graph)
        addmm_in_place(graph)
        row_amax_by_part(graph)
        one_copy_per_scaled_mm_input(graph)


# One instance of each for every compiled block: torch.compile tells backends apart by their options, so a pass
# object per block would make each of the 57 blocks a different backend, compiled on its own.
BLOCK_GRAPH_PASSES = BlockGraphPasses()
BLOCK_POST_GRAD_PASSES = BlockPostGradPasses()
# torch.compile's options for FLUX blocks, in training and in sampling
BLOCK_COMPILE_OPTIONS = {"pre_grad_custom_pass": BLOCK_GRAPH_PASSES,
                         "post_grad_custom_post_pass": BLOCK_POST_GRAD_PASSES}
