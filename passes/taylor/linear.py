"""Rules for ops linear in x: views and shape ops, sums along dimensions, casts and gathers,
concatenation, addition, scatters into a constant, padding, convolution with a constant kernel.

Each coefficient goes through the op on its own (u_j ↦ op(u_j)), and a constant term (a bias, a
pad value, a constant operand of a sum) enters the zeroth coefficient only. When the coefficients
are already one stacked node (after a linear layer, `Builder.stacked`), the op acts once on the
stack, its dimension arguments shifted by the leading stack dimension (`ON_STACK`).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .._graph import aten
from .builder import Ctx
from .series import Series, Unsupported, cval, is_series, pieces_of


def rule_linear_first(ctx: Ctx, node, args, kwargs):
    """Ops linear in their first argument, all other arguments constant."""
    if any(is_series(a) for a in args[1:]) or any(is_series(v) for v in kwargs.values()):
        raise Unsupported
    u = args[0]
    rest = tuple(cval(a) for a in args[1:])
    kw = {key: cval(v) for key, v in kwargs.items()}
    stack = ctx.b.stack_of(u)
    if stack is not None:
        shifted = on_stack_args(node.target, rest, kw, len(u.nonzero()))
        if shifted is not None:
            B = ctx.b
            new = B.call(node.target, (stack, *shifted), kw, name=ctx.base + "_stacked")
            if node.target.overloadpacket.__name__ not in SPLITS:
                return B.from_stack(new, u.nonzero(), len(u.cs), ctx.base)
            # a tuple of stacks: each coefficient's tuple for ops that take it whole, and getitem
            # takes a piece's stack directly (`rule_getitem`)
            out: list = [None] * len(u.cs)
            for i, j in enumerate(u.nonzero()):
                out[j] = B.call(pieces_of, (new, i), name=B.cname(ctx.base, j))
            B.stacks[("pieces", *out)] = new
            return Series(out)
    return ctx.b.linear(u, lambda c, name: ctx.b.call(node.target, (c, *rest), kw, name=name), ctx.base)


def shift_dim(d):
    """A dimension of one coefficient as a dimension of the stack (one more, leading)."""
    if isinstance(d, bool) or not isinstance(d, int):
        raise Unsupported
    return d + 1 if d >= 0 else d


ON_STACK = {
    "reshape": lambda n, shape: ([n, *shape],),
    "expand": lambda n, sizes, *r: ([n, *sizes], *r),
    "transpose": lambda n, d0, d1: (shift_dim(d0), shift_dim(d1)),
    "permute": lambda n, dims: ([0, *(shift_dim(d) for d in dims)],),
    "slice": lambda n, dim=0, *r: (shift_dim(dim), *r),
    "select": lambda n, dim, i: (shift_dim(dim), i),
    "unsqueeze": lambda n, dim: (shift_dim(dim),),
    "neg": lambda n: (),
    "clone": lambda n: (),
    "contiguous": lambda n: (),
    "alias": lambda n: (),
    "_to_copy": lambda n: (),
    "to": lambda n, *r: r if all(isinstance(a, (torch.dtype, bool)) or a is None for a in r) else unsupported(),
    "split": lambda n, size, dim=0: (size, shift_dim(dim)),
    "split_with_sizes": lambda n, sizes, dim=0: (sizes, shift_dim(dim)),
    "chunk": lambda n, chunks, dim=0: (chunks, shift_dim(dim)),
}


SPLITS = {"split", "split_with_sizes", "chunk"}


def unsupported():
    """Raise `Unsupported` (from inside a lambda of `ON_STACK`)."""
    raise Unsupported


def on_stack_args(target, rest, kw, n):
    """The arguments after the first for `target` acting on a stack of n coefficients, or None."""
    packet = getattr(target, "overloadpacket", None)
    fn = ON_STACK.get(getattr(packet, "__name__", None))
    if fn is None or (kw and packet.__name__ not in ("_to_copy", "to", "clone")):
        return None
    if packet.__name__ in ("reshape", "expand") and not isinstance(rest[0], (list, tuple)):
        return None
    try:
        return tuple(fn(n, *rest))
    except (Unsupported, TypeError):
        return None


def rule_view(ctx, node, args, kwargs):
    """view(x, shape) as reshape: coefficients made by other rules (gathers, expands) need not have
    the strides a view of the original value had."""
    if any(is_series(a) for a in args[1:]):
        raise Unsupported
    u, shape, B = args[0], cval(args[1]), ctx.b
    stack = B.stack_of(u)
    if stack is not None:  # stacked coefficients stay stacked: one reshape for all of them
        shifted = on_stack_args(aten.reshape.default, (shape,), {}, len(u.nonzero()))
        if shifted is not None:
            new = B.call(aten.reshape.default, (stack, *shifted), name=ctx.base + "_stacked")
            return B.from_stack(new, u.nonzero(), len(u.cs), ctx.base)
    return B.linear(u, lambda c, name: B.call(aten.reshape.default, (c, shape), name=name), ctx.base)


def rule_linear_list(ctx: Ctx, node, args, kwargs):
    """cat/stack: linear in every element of the list (constants enter the zeroth coefficient)."""
    items = args[0]
    rest = tuple(cval(a) for a in args[1:])
    kw = {key: cval(v) for key, v in kwargs.items()}
    stacks = [ctx.b.stack_of(a) for a in items]
    if (node.target == aten.cat.default and not kw and items and all(st is not None for st in stacks)
            and len({tuple(a.nonzero()) for a in items}) == 1):
        try:
            dim = shift_dim(rest[0] if rest else 0)
        except Unsupported:
            dim = None
        if dim is not None:
            new = ctx.b.call(aten.cat.default, (stacks, dim), name=ctx.base + "_stacked")
            return ctx.b.from_stack(new, items[0].nonzero(), len(items[0].cs), ctx.base)
    out = []
    for j in range(ctx.k + 1):
        name = ctx.b.cname(ctx.base, j)
        parts = []
        if j > 0 and all((not is_series(a)) or a[j] is None for a in items):
            out.append(None)
            continue
        for a in items:
            if is_series(a):
                c = a[j]
                if c is None:
                    c = ctx.b.call(aten.zeros_like.default, (a[0],), name=name + "_zero")
            else:
                c = cval(a) if j == 0 else ctx.b.call(aten.zeros_like.default, (cval(a),), name=name + "_zero")
            parts.append(c)
        out.append(ctx.b.call(node.target, (parts, *rest), kw, name=name))
    return Series(out)


def rule_add(ctx: Ctx, node, args, kwargs, sign=1):
    """add / sub (sign −1): term by term; a constant enters c_0 only; stacked when both sides are."""
    a, b = args[0], args[1]
    alpha = cval(kwargs.get("alpha", 1)) * sign
    B = ctx.b
    if not is_series(a):  # const ± series
        c0 = B.call(node.target, (cval(a), b[0]), {k_: cval(v) for k_, v in kwargs.items()}, name=B.cname(ctx.base, 0))
        rest = [B.scale(b[j], alpha, B.cname(ctx.base, j)) for j in range(1, ctx.k + 1)]
        return Series([c0] + rest)
    if not is_series(b):
        c0 = B.call(node.target, (a[0], cval(b)), {k_: cval(v) for k_, v in kwargs.items()}, name=B.cname(ctx.base, 0))
        return Series([c0] + a.cs[1:])
    shape = shape_of(node)
    expand_a, expand_b = shape_of(node.args[0]) != shape, shape_of(node.args[1]) != shape
    sa, sb = B.stack_of(a), B.stack_of(b)
    if sa is not None and sb is not None and not (expand_a or expand_b) and shape is not None and a.nonzero() == b.nonzero():
        new = B.call(aten.add.Tensor, (sa, sb), {"alpha": alpha} if alpha != 1 else {}, name=ctx.base + "_stacked")
        return B.from_stack(new, a.nonzero(), len(a.cs), ctx.base)
    return B.add_series(a, b, ctx.base, alpha, expand_a=expand_a, expand_b=expand_b)


def shape_of(n):
    """The recorded shape of a node's value, or None."""
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def rule_sub(ctx, node, args, kwargs):
    """sub: `rule_add` with the sign of alpha flipped."""
    return rule_add(ctx, node, args, kwargs, sign=-1)


def rule_rsub(ctx, node, args, kwargs):  # other − alpha·self
    """rsub(u, other, alpha) = other − alpha·u for a constant `other`."""
    a, b = args[0], args[1]
    alpha = cval(kwargs.get("alpha", 1))
    B = ctx.b
    if is_series(b):
        raise Unsupported
    c0 = B.call(node.target, (a[0], cval(b)), {k_: cval(v) for k_, v in kwargs.items()}, name=B.cname(ctx.base, 0))
    return Series([c0] + [B.scale(a[j], -alpha, B.cname(ctx.base, j)) for j in range(1, ctx.k + 1)])


def rule_convolution(ctx, node, args, kwargs):
    """conv1d(x, w, b, …) / convolution(x, w, b, …): linear in x for a constant kernel; the bias
    enters the zeroth coefficient only (state-space mixers convolve over positions)."""
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if is_series(w) or is_series(bias) or kwargs:
        raise Unsupported
    rest = tuple(cval(a) for a in args[3:])
    wc, bc = cval(w), cval(bias)
    B = ctx.b
    return B.linear(x, lambda c, name: B.call(node.target, (c, wc, None, *rest), name=name), ctx.base,
                    c0=lambda c, name: B.call(node.target, (c, wc, bc, *rest), name=name))


def _joint_linear(*positions):
    """Ops linear in several arguments together, all others constant: slice_scatter(base, src),
    select_scatter, copy(dst, src), index_put(base, indices, values). A coefficient takes every
    such argument's coefficient, zeros where one has none."""

    def rule(ctx, node, args, kwargs):
        if any(is_series(a) for i, a in enumerate(args) if i not in positions) or \
                any(is_series(v) for v in kwargs.values()):
            raise Unsupported
        B = ctx.b
        kw = {key: cval(v) for key, v in kwargs.items()}
        out = []
        for j in range(ctx.k + 1):
            name = B.cname(ctx.base, j)
            if j > 0 and all(not is_series(args[i]) or args[i][j] is None for i in positions):
                out.append(None)
                continue
            call_args = []
            for i, a in enumerate(args):
                if i not in positions:
                    call_args.append(cval(a))
                elif j == 0:
                    call_args.append(a[0] if is_series(a) else cval(a))
                elif is_series(a) and a[j] is not None:
                    call_args.append(a[j])
                else:
                    zero_of = a[0] if is_series(a) else cval(a)
                    call_args.append(B.call(aten.zeros_like.default, (zero_of,), name=name + "_zero"))
            out.append(B.call(node.target, tuple(call_args), kw, name=name))
        return Series(out)

    return rule


def rule_constant_pad(ctx, node, args, kwargs):
    """constant_pad_nd: the pad value enters c_0 only; higher coefficients are padded with 0."""
    a = args[0]
    pad = cval(args[1])
    value = cval(args[2]) if len(args) > 2 else 0.0
    B = ctx.b
    return B.linear(a, lambda c, name: B.call(node.target, (c, pad, 0.0), name=name), ctx.base,
                    c0=lambda c, name: B.call(node.target, (c, pad, value), name=name))


def rule_identity(ctx, node, args, kwargs):
    """The argument's series unchanged (detach in an inference graph)."""
    return args[0]


def rule_getitem(ctx, node, args, kwargs):
    """One element of a tuple-valued series (split, unbind); taken from a split stack where there is one."""
    u, i = args
    B = ctx.b
    pieces = B.stacks.get(("pieces", *u.cs))
    if pieces is not None and isinstance(i, int):
        piece = B.call(operator.getitem, (pieces, i), name=ctx.base + "_stacked")
        return B.from_stack(piece, u.nonzero(), len(u.cs), ctx.base)
    return B.linear(u, lambda c, name: B.call(operator.getitem, (c, i), name=name), ctx.base)
