"""Rules for reductions that are not linear: variance and the norms (RMSNorm, LayerNorm).

(Sums, means and cumulative sums are linear: `linear.rule_linear_first`.) Each is written as the
composition the op computes — centre, square (a Cauchy square), mean, add ε, power −½ — so its
coefficients come from the same recurrences as the elementwise ops.
"""

from __future__ import annotations

import torch

from .._graph import aten
from .elementwise import pow_series
from .series import Unsupported, cval, is_series


def rule_var(ctx, node, args, kwargs):
    """var(u) = Σ_{i+j=n} mean(d_i·d_j)·N/(N − correction), d = u − mean(u)."""
    u = args[0]
    dims = cval(args[1]) if len(args) > 1 else cval(kwargs.get("dim"))
    if node.target == aten.var.correction:
        corr = cval(kwargs.get("correction", 1))
        corr = 1 if corr is None else corr
        keep = bool(cval(kwargs.get("keepdim", False)))
    else:  # var.dim(self, dim, unbiased, keepdim)
        unbiased = cval(args[2]) if len(args) > 2 else cval(kwargs.get("unbiased", True))
        corr = 1 if unbiased else 0
        keep = bool(cval(args[3]) if len(args) > 3 else cval(kwargs.get("keepdim", False)))
    v = node.args[0].meta.get("val")
    if v is None:
        raise Unsupported
    shape = v.shape
    rdims = range(len(shape)) if dims is None else [d % len(shape) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    count = 1
    for d in rdims:
        if not isinstance(shape[d], int):
            raise Unsupported
        count *= shape[d]
    dims_l = list(rdims)
    B = ctx.b
    base = ctx.base
    d = B.linear(u, lambda c, name: B.call(aten.sub.Tensor, (c, B.call(aten.mean.dim, (c, dims_l, True), name=name + "_mean")), name=name), base + "_centered")
    sq = B.square(d, base + "_sq")
    factor = count / max(count - corr, 1e-300) if count - corr > 0 else float("nan")
    return B.linear(sq, lambda c, name: B.scale(B.call(aten.mean.dim, (c, dims_l, keep), name=name), factor, name), base)


def rule_rms_norm(ctx, node, args, kwargs):
    """rms_norm(u) = u·(mean(u²) + ε)^(−½)·weight."""
    u = args[0]
    shape = cval(args[1])
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    eps = cval(args[3]) if len(args) > 3 else cval(kwargs.get("eps"))
    if eps is None:
        v = node.args[0].meta.get("val")
        eps = torch.finfo(v.dtype).eps if v is not None else 1e-6
    if is_series(weight):
        raise Unsupported
    B = ctx.b
    base = ctx.base
    dims = list(range(-len(shape), 0))
    sq = B.square(u, base + "_sq")
    ms = B.linear(sq, lambda c, name: B.call(aten.mean.dim, (c, dims, True), name=name), base + "_ms")
    r = pow_series(B, B.shift(ms, eps, base + "_eps"), -0.5, base + "_rsqrt")
    out = B.cauchy(u, r, base + ("_normed" if weight is not None else ""))
    if weight is not None:
        wc = cval(weight)
        out = B.linear(out, lambda c, name: B.call(aten.mul.Tensor, (c, wc), name=name), base)
    return out


def rule_layer_norm(ctx, node, args, kwargs):
    """layer_norm(u) = (u − mean u)·(var + ε)^(−½)·weight + bias."""
    u = args[0]
    shape = cval(args[1])
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    eps = cval(args[4]) if len(args) > 4 else cval(kwargs.get("eps", 1e-5))
    if is_series(weight) or is_series(bias):
        raise Unsupported
    B = ctx.b
    base = ctx.base
    dims = list(range(-len(shape), 0))
    d = B.linear(u, lambda c, name: B.call(aten.sub.Tensor, (c, B.call(aten.mean.dim, (c, dims, True), name=name + "_mean")), name=name), base + "_centered")
    var = B.linear(B.square(d, base + "_sq"), lambda c, name: B.call(aten.mean.dim, (c, dims, True), name=name), base + "_var")
    r = pow_series(B, B.shift(var, eps, base + "_eps"), -0.5, base + "_rstd")
    out = B.cauchy(d, r, base + "_normed")
    if weight is not None:
        wc = cval(weight)
        out = B.linear(out, lambda c, name: B.call(aten.mul.Tensor, (c, wc), name=name), base + "_scaled")
    if bias is not None:
        out = B.shift(out, cval(bias), base)
    return out
