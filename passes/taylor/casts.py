"""Rules for selections, masks and comparisons: where, masked_fill, topk/sort, max/min along a
dimension, amax/amin, and ops whose value is piecewise constant (comparisons, isnan, argmax).

(Plain casts, `_to_copy`/`to`/`type_as`, and gathers, `index_select`/`gather`/`index`/`embedding`,
are linear in x: `linear.rule_linear_first`.) Which entries a selection picks is piecewise
constant in x: the jet keeps the center's choice (indices from c_0) and carries every coefficient
through the same gather; the remainder of an expansion absorbs what changes when the variate
selects otherwise (mixture-of-experts routing, max-pooling, …).
"""

from __future__ import annotations

import operator

from .._graph import aten
from .series import Const, Parts, Series, Unsupported, cval, is_series


def rule_where(ctx, node, args, kwargs):
    """where(cond, a, b): each coefficient selected by the condition at the center (zeros filled in)."""
    cond, a, b = args[0], args[1], args[2]
    if is_series(cond) and (cond[0] is None or cond.nonzero(1)):
        raise Unsupported
    B = ctx.b
    cc = cond[0] if is_series(cond) else cval(cond)  # a piecewise-constant condition (isnan(x)): its value
    out = [B.call(node.target, (cc, a[0] if is_series(a) else cval(a), b[0] if is_series(b) else cval(b)), name=B.cname(ctx.base, 0))]
    for j in range(1, ctx.k + 1):
        aj = a[j] if is_series(a) else None
        bj = b[j] if is_series(b) else None
        name = B.cname(ctx.base, j)
        if aj is None and bj is None:
            out.append(None)
        elif bj is None:
            out.append(B.call(aten.where.ScalarOther, (cc, aj, 0.0), name=name))
        elif aj is None:
            out.append(B.call(aten.where.ScalarSelf, (cc, 0.0, bj), name=name))
        else:
            out.append(B.call(aten.where.self, (cc, aj, bj), name=name))
    return Series(out)


def rule_piecewise_constant(ctx, node, args, kwargs):
    """Boolean- and index-valued ops (comparisons, isnan, argmax) are constant in t almost
    everywhere: their series is op(c_0), then zeros (TransformerLens's where(isnan(p), 0, p))."""
    def at0(a):
        if is_series(a):
            if a[0] is None:
                raise Unsupported
            return a[0]
        if isinstance(a, (list, tuple)):
            return type(a)(at0(e) for e in a)
        return cval(a)

    B = ctx.b
    value = B.call(node.target, tuple(at0(a) for a in args), {key: at0(v) for key, v in kwargs.items()},
                   name=B.cname(ctx.base, 0))
    return Series([value] + [None] * ctx.k)


def rule_masked_fill(ctx, node, args, kwargs):
    """masked_fill(a, mask, value): the value enters c_0 only; higher coefficients are filled with 0."""
    a, mask, value = args[0], args[1], args[2]
    if is_series(mask) or is_series(value) or not is_series(a):
        raise Unsupported
    B = ctx.b
    mc, vc = cval(mask), cval(value)
    zero = 0.0 if node.target == aten.masked_fill.Scalar else None

    def fn(c, name):
        if zero is None:
            return B.call(aten.masked_fill.Scalar, (c, mc, 0.0), name=name)
        return B.call(node.target, (c, mc, zero), name=name)

    return B.linear(a, fn, ctx.base, c0=lambda c, name: B.call(node.target, (c, mc, vc), name=name))


def _select_values(ctx, u: Series, idx, dim, keepdim=True):
    """Every coefficient of u from j = 1 on gathered at the center's indices `idx` along `dim`
    (c_0 is left to the caller, which has it from the op itself)."""
    B = ctx.b

    def fn(c, name):
        out = B.call(aten.gather.default, (c, dim, idx), name=name)
        return out if keepdim else B.call(aten.squeeze.dim, (out, dim), name=name)

    return Series([None] + [None if c is None else fn(c, B.cname(ctx.base, j)) for j, c in enumerate(u.cs) if j > 0])


def rule_topk(ctx, node, args, kwargs):  # topk(x, k, dim=-1, largest=True, sorted=True) / sort(x, dim, descending)
    """topk / sort: (values, indices) with the indices of the center and the values' series gathered at them."""
    u = args[0]
    if not is_series(u) or any(is_series(a) for a in args[1:]):
        raise Unsupported
    B = ctx.b
    rest = tuple(cval(a) for a in args[1:])
    kw = {key: cval(v) for key, v in kwargs.items()}
    pair = B.call(node.target, (u[0], *rest), kw, name=ctx.base + "_center")
    values0 = B.call(operator.getitem, (pair, 0), name=B.cname(ctx.base, 0))
    idx = B.call(operator.getitem, (pair, 1), name=ctx.base + "_index")
    name = str(getattr(node.target, "overloadpacket", node.target))
    if name.endswith("topk"):
        dim = rest[1] if len(rest) > 1 else kw.get("dim", -1)
    else:  # sort(self, dim=-1, descending=False) / sort.stable(self, *, stable, dim, descending)
        dim = rest[0] if rest and isinstance(rest[0], int) else kw.get("dim", -1)
    values = _select_values(ctx, u, idx, dim)
    values.cs[0] = values0
    return Parts([values, Const(idx)])


def rule_max_dim(ctx, node, args, kwargs):  # max.dim(x, dim, keepdim=False) -> (values, indices)
    """max.dim / min.dim: (values, indices) chosen at the center, like `rule_topk`."""
    u = args[0]
    if not is_series(u) or any(is_series(a) for a in args[1:]):
        raise Unsupported
    B = ctx.b
    dim = cval(args[1]) if len(args) > 1 else cval(kwargs.get("dim"))
    keep = bool(cval(args[2]) if len(args) > 2 else cval(kwargs.get("keepdim", False)))
    pair = B.call(node.target, (u[0], dim, True), name=ctx.base + "_center")
    idx = B.call(operator.getitem, (pair, 1), name=ctx.base + "_index")
    values = _select_values(ctx, u, idx, dim, keepdim=keep)
    v0 = B.call(operator.getitem, (pair, 0), name=B.cname(ctx.base, 0))
    values.cs[0] = v0 if keep else B.call(aten.squeeze.dim, (v0, dim), name=B.cname(ctx.base, 0))
    out_idx = idx if keep else B.call(aten.squeeze.dim, (idx, dim), name=ctx.base + "_index")
    return Parts([values, Const(out_idx)])


def rule_amax(ctx, node, args, kwargs):  # amax(x, dim=[], keepdim=False) along one dim
    """amax / amin along one dimension: the coefficients at the center's argmax / argmin."""
    u = args[0]
    dims = cval(args[1]) if len(args) > 1 else cval(kwargs.get("dim", []))
    keep = bool(cval(args[2]) if len(args) > 2 else cval(kwargs.get("keepdim", False)))
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not is_series(u) or len(dims) != 1:
        raise Unsupported
    B = ctx.b
    pick = aten.argmax.default if "amax" in str(node.target) else aten.argmin.default
    idx = B.call(pick, (u[0], dims[0], True), name=ctx.base + "_index")
    values = _select_values(ctx, u, idx, dims[0], keepdim=keep)
    values.cs[0] = B.call(node.target, (u[0], *[cval(a) for a in args[1:]]), {k_: cval(v) for k_, v in kwargs.items()},
                          name=B.cname(ctx.base, 0))
    return values
