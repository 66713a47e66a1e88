"""Rules for softmax and log-softmax, the smooth part of attention.

softmax(u) = e / Σe with e = exp(u − max u_0): the maximum is taken at the center only (a constant
shift, detached), then the exponential, a linear sum and the division recurrence. Fused
scaled-dot-product attention never reaches the Taylor pass: `passes.decompose` writes it out as
matmul, scale, mask and softmax first (its fused kernels have no forward derivative).
"""

from __future__ import annotations

import torch
from torch import fx

from .._graph import aten
from .elementwise import div_series, exp_series, log_series
from .series import Series, cval


def _dim_args(args, kwargs, i):
    """The `dim` argument of softmax-like ops, positional (index i) or keyword."""
    return cval(args[i]) if len(args) > i else cval(kwargs.get("dim"))


def _softmax_parts(ctx, u, dim, base):
    """(u − max u_0, e = exp of it, Σe along dim): the shared part of softmax and log-softmax.

    The maximum is taken at the center and detached: a constant shift that only keeps exp in range."""
    B = ctx.b
    m = B.call(aten.amax.default, (u[0], [dim], True), name=base + "_max")
    m = B.call(aten.detach.default, (m,), name=base + "_max")
    shifted = Series([B.call(aten.sub.Tensor, (u[0], m), name=B.cname(base + "_shift", 0))] + u.cs[1:])
    e = exp_series(B, shifted, base + "_exp")
    s = B.linear(e, lambda c, name: B.call(aten.sum.dim_IntList, (c, [dim], True), name=name), base + "_sum")
    return shifted, e, s


def rule_softmax(ctx, node, args, kwargs):
    """softmax(u) = e / Σe (the division recurrence), cast like the node's output."""
    u = args[0]
    dim = _dim_args(args, kwargs, 1)
    B = ctx.b
    _, e, s = _softmax_parts(ctx, u, dim, ctx.base)
    out = div_series(B, e, s, ctx.base)
    return _cast_like(ctx, out, node)


def rule_log_softmax(ctx, node, args, kwargs):
    """log_softmax(u) = (u − max) − log Σe, cast like the node's output."""
    u = args[0]
    dim = _dim_args(args, kwargs, 1)
    B = ctx.b
    shifted, e, s = _softmax_parts(ctx, u, dim, ctx.base)
    ls = log_series(B, s, ctx.base + "_logsum")
    out = B.add_series(shifted, ls, ctx.base, alpha=-1, expand_b=True)
    return _cast_like(ctx, out, node)


def _cast_like(ctx, s: Series, node):
    """The series cast to the node's output dtype where the op changes dtype (softmax(x, dtype=…))."""
    v = node.meta.get("val")
    if v is None or not isinstance(v, torch.Tensor):
        return s
    return Series([c if c is None else ctx.b.call(aten._to_copy.default, (c,), {"dtype": v.dtype}, name=ctx.b.cname(ctx.base, j))
                   for j, c in enumerate(s.cs)]) if _needs_cast(node) else s


def _needs_cast(node):
    """Whether the node's output dtype differs from its first input's."""
    a = node.args[0]
    av, v = a.meta.get("val") if isinstance(a, fx.Node) else None, node.meta.get("val")
    return av is not None and v is not None and getattr(av, "dtype", None) != getattr(v, "dtype", None)
