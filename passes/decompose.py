"""Decompose fused ops that jets cannot go through into plain ATen ops.

- Fused scaled-dot-product attention kernels have no forward-mode derivative, so neither
  nested-AD jets nor Taylor-mode rules can go through them. They become the textbook
  softmax(q kᵀ · scale + mask) v (what torch's math backend computes).
- `aten.layer_norm` has a forward-mode derivative, but nesting it is wrong from the second order
  on (torch 2.13: on random float64 input the c_2 coefficient is off by 0.06 while every other op
  of the supported architectures is exact to 1e-10). It becomes mean, centering, variance and
  rsqrt, whose nested derivatives are right.
- Grouped matrix products of mixture-of-experts layers (`transformers::grouped_mm_fallback`,
  `aten._grouped_mm`) are opaque kernels without forward derivatives. They become `grouped_mm`, the
  same product written with slices, `mm` and `cat`, which nested AD goes through and which Taylor
  mode treats as linear in its input (the routing offsets are constants: the center's routing).
- In-place ops (`passes.cleanup.functionalize_inplace`): batched jets must never write into a
  shared side input.
- `silu` and `mish` have forward derivatives written with their backward kernels, which have none
  themselves: nesting them fails outside grad mode. They become x·σ(x) and x·tanh(softplus(x)).
"""

from __future__ import annotations

import math

import torch
from torch import fx

from ._graph import aten, replace_node, val
from .cleanup import functionalize_inplace


def _static(x):
    return x if isinstance(x, int) else None


def decompose_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every `aten.scaled_dot_product_attention` node; returns `gm`, recompiled."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
            continue
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        args = dict(zip(names, node.args))
        for key in names:
            if key in node.kwargs:
                args[key] = node.kwargs[key]
        q, k, v = args["query"], args["key"], args["value"]
        mask = args.get("attn_mask")
        is_causal = bool(args.get("is_causal", False))
        scale = node.kwargs.get("scale")
        gqa = bool(node.kwargs.get("enable_gqa", False))
        if args.get("dropout_p", 0.0):
            raise NotImplementedError("attention with dropout cannot be expanded; trace the model in eval mode")
        qv, kv = val(q), val(k)
        if scale is None:
            head_dim = _static(qv.shape[-1]) if qv is not None else None
            if head_dim is None:
                raise NotImplementedError("attention with a dynamic head size and no explicit scale")
            scale = 1.0 / math.sqrt(head_dim)
        with graph.inserting_before(node):
            if gqa and qv is not None and kv is not None:
                hq, hk = _static(qv.shape[-3]), _static(kv.shape[-3])
                if hq and hk and hq != hk:
                    k = graph.call_function(aten.repeat_interleave.self_int, (k, hq // hk, -3))
                    v = graph.call_function(aten.repeat_interleave.self_int, (v, hq // hk, -3))
            kt = graph.call_function(aten.transpose.int, (k, -2, -1))
            scores = graph.call_function(aten.matmul.default, (q, kt))
            scores = graph.call_function(aten.mul.Tensor, (scores, scale))
            if is_causal:
                length = graph.call_function(aten.sym_size.int, (q, -2))
                source = graph.call_function(aten.sym_size.int, (k, -2))
                ones = graph.call_function(aten.new_ones.default, (scores, [length, source]), {"dtype": torch.bool})
                causal = graph.call_function(aten.tril.default, (ones,))
                scores = graph.call_function(aten.where.ScalarOther, (causal, scores, float("-inf")))
            if mask is not None:
                mv = val(mask)
                if mv is not None and mv.dtype == torch.bool:
                    scores = graph.call_function(aten.where.ScalarOther, (mask, scores, float("-inf")))
                else:
                    scores = graph.call_function(aten.add.Tensor, (scores, mask))
            probs = graph.call_function(aten.softmax.int, (scores, -1))
            out = graph.call_function(aten.matmul.default, (probs, v))
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    gm.recompile()
    return gm



def _mean_keep(graph, x, dims):
    return graph.call_function(aten.mean.dim, (x, dims, True))


def decompose_layer_norm(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace `layer_norm` / `native_layer_norm` nodes by their arithmetic; returns `gm`."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.layer_norm.default, aten.native_layer_norm.default):
            continue
        x, shape = node.args[0], node.args[1]
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
        eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
        dims = list(range(-len(shape), 0))
        with graph.inserting_before(node):
            mu = _mean_keep(graph, x, dims)
            xc = graph.call_function(aten.sub.Tensor, (x, mu))
            var = _mean_keep(graph, graph.call_function(aten.mul.Tensor, (xc, xc)), dims)
            rstd = graph.call_function(aten.rsqrt.default, (graph.call_function(aten.add.Tensor, (var, eps)),))
            out = graph.call_function(aten.mul.Tensor, (xc, rstd))
            if weight is not None:
                out = graph.call_function(aten.mul.Tensor, (out, weight))
            if bias is not None:
                out = graph.call_function(aten.add.Tensor, (out, bias))
        if node.target is aten.layer_norm.default:
            out.meta = dict(node.meta)
            node.replace_all_uses_with(out)
        else:  # (out, mean, rstd) tuple consumed through getitem
            parts = (out, mu, rstd)
            for user in list(node.users):
                user.replace_all_uses_with(parts[user.args[1]])
                graph.erase_node(user)
        graph.erase_node(node)
    gm.recompile()
    return gm


def decompose_activations(gm: fx.GraphModule) -> fx.GraphModule:
    """silu(x) → x·sigmoid(x), mish(x) → x·tanh(softplus(x)); returns `gm`."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.silu.default, aten.mish.default):
            continue
        x = node.args[0]
        with graph.inserting_before(node):
            if node.target is aten.silu.default:
                gate = graph.call_function(aten.sigmoid.default, (x,))
            else:
                gate = graph.call_function(aten.tanh.default, (graph.call_function(aten.softplus.default, (x,)),))
            out = graph.call_function(aten.mul.Tensor, (x, gate))
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    gm.recompile()
    return gm


def grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[e−1] ≤ r < offs[e] of `input` (S, d_in) times `weight[e]` (d_in, d_out); rows past
    offs[-1] are zero. What `transformers::grouped_mm_fallback` computes, in differentiable ops."""
    parts, start = [], 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            parts.append(input[start:end] @ weight[e])
        start = max(start, end)
    rows = input.shape[0]
    if start < rows or not parts:
        parts.append(input.new_zeros(rows - start, weight.shape[-1]))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


DATA_DEPENDENT_OPS = {aten.histc.default, aten.nonzero.default, aten.bincount.default}


def data_dependent(gm: fx.GraphModule) -> bool:
    """Whether `gm` has ops whose shapes or loops depend on values (expert routing): vmap cannot
    batch them over centers, jets loop over centers instead."""
    return any(n.op == "call_function" and (n.target is grouped_mm or n.target in DATA_DEPENDENT_OPS)
               for n in gm.graph.nodes)


def _grouped_mm_targets() -> set:
    targets = set()
    custom = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if custom is not None:
        targets.add(custom.default)
    if hasattr(aten, "_grouped_mm"):
        targets.add(aten._grouped_mm.default)
    return targets


def decompose_grouped_mm(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace grouped expert products (2-D input, 3-D weights, offsets) by `grouped_mm`."""
    targets = _grouped_mm_targets()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        names = ("input", "weight", "offs", "bias", "out_dtype")
        args = dict(zip(names, node.args))
        args.update({("input" if k == "mat_a" else "weight" if k == "mat_b" else k): v for k, v in node.kwargs.items()})
        if args.get("offs") is None or args.get("bias") is not None:
            continue  # another form of grouped product: left to the fallback
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(grouped_mm, (args["input"], args["weight"], args["offs"]))
        replace_node(gm, node, new)
    gm.recompile()
    return gm


def decompose_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """`copy(dst, src)` (what functionalization makes of `dst.copy_(src)`) → `zeros_like(dst) + src`:
    the same values in dst's shape, through ops that forward AD can differentiate."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.copy.default:
            continue
        dst, src = node.args[0], node.args[1]
        with gm.graph.inserting_before(node):
            zeros = gm.graph.call_function(aten.zeros_like.default, (dst,))
            new = gm.graph.call_function(aten.add.Tensor, (zeros, src))
            dv, sv = val(dst), val(src)
            if dv is not None and sv is not None and dv.dtype != sv.dtype:
                new = gm.graph.call_function(aten._to_copy.default, (new,), {"dtype": dv.dtype})
        replace_node(gm, node, new)
    gm.recompile()
    return gm


def views_as_reshapes(gm: fx.GraphModule) -> fx.GraphModule:
    """`view` → `reshape`: same values, but no demand on strides, which differ once fused kernels are
    decomposed (a transpose of the decomposed attention's output cannot always be viewed)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
    gm.recompile()
    return gm


def decompose_for_jets(gm: fx.GraphModule) -> fx.GraphModule:
    """Every decomposition jets need, in place."""
    functionalize_inplace(gm)
    views_as_reshapes(gm)
    decompose_copy(gm)
    decompose_grouped_mm(gm)
    decompose_attention(gm)
    decompose_layer_norm(gm)
    decompose_activations(gm)
    return gm
