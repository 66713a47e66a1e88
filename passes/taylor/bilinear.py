"""Rules for ops bilinear in two operands: products (mul, mm, bmm, matmul, outer, dot, mv, einsum of
two), linear layers and addmm/baddbmm, and division by a constant.

When both operands depend on x the result is their Cauchy product, (a·b)_n = Σ_i a_i·b_{n−i}; for
matrix products with three or more nonzero pairs every pair is multiplied in one batched call
(`cauchy_products`). When one operand is constant the op is linear in the other (`linear.py`'s
treatment, including the stacked form that reads a weight once for all coefficients).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .._graph import aten
from .builder import Ctx
from .elementwise import div_series
from .series import Series, Unsupported, cval, is_series, stack_coefficients


def bilinear(ctx: Ctx, node: fx.Node, a, b, rest=(), kw=None, target=None) -> Series:
    """target(a, b, *rest, **kw), bilinear in (a, b): a Cauchy product when both depend on x,
    linear in the one that does otherwise.

    Args:
        a, b: the mapped operands (Series or Const/values).
        target: the product op to emit, `node.target` by default (addmm and baddbmm pass mm and
            bmm for their product part).
    """
    B = ctx.b
    kw = kw or {}
    target = node.target if target is None else target

    def op(x, y, name):
        return B.call(target, (x, y, *rest), kw, name=name)

    if is_series(a) and is_series(b):
        if target in _BATCHABLE_PRODUCTS and not rest and not kw:
            pairs = sum(1 for n in range(ctx.k + 1) for i in range(n + 1) if a[i] is not None and b[n - i] is not None)
            if pairs >= 3:
                return _cauchy_in_one_call(ctx, target, a, b)
        out = []
        for n in range(ctx.k + 1):
            name = B.cname(ctx.base, n)
            out.append(B.total([op(a[i], b[n - i], name) for i in range(n + 1) if a[i] is not None and b[n - i] is not None], name))
        return Series(out)
    if not rest and not kw:
        on_stack = elementwise_on_stack(ctx, node, a, b)
        if on_stack is not None:
            return on_stack
    if is_series(a):
        bc = cval(b)
        return B.linear(a, lambda c, name: op(c, bc, name), ctx.base)
    ac = cval(a)
    return B.linear(b, lambda c, name: op(ac, c, name), ctx.base)


_ELEMENTWISE_LINEAR = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}


def _rank(n):
    """The recorded rank of a node's value, or None."""
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v.dim() if isinstance(v, torch.Tensor) else None


def elementwise_on_stack(ctx, node, a, b):
    """series·constant (or series/constant) in one op on the series' stack, when the constant
    broadcasts over the trailing dimensions only (its rank at most the series'); else None."""
    if node.target not in _ELEMENTWISE_LINEAR or (is_series(b) and node.target in (aten.div.Tensor, aten.div.Scalar)):
        return None
    first = is_series(a)
    series, const = (a, cval(b)) if first else (b, cval(a))
    stack = ctx.b.stack_of(series)
    if stack is None:
        return None
    if isinstance(const, fx.Node):
        rs, rc = _rank(node.args[0 if first else 1]), _rank(node.args[1 if first else 0])
        if rs is None or rc is None or rc > rs:
            return None
    elif not isinstance(const, (int, float)) or isinstance(const, bool):
        return None
    new = ctx.b.call(node.target, (stack, const) if first else (const, stack), name=ctx.base + "_stacked")
    return ctx.b.from_stack(new, series.nonzero(), len(series.cs), ctx.base)


_BATCHABLE_PRODUCTS = {aten.matmul.default, aten.bmm.default}


def cauchy_products(op, counts, lhs, rhs):
    """Σ op(lhs[p], rhs[p]) over consecutive runs of `counts[n]` pairs, one sum per run.

    When the operands all have the same rank (≥ 2), every product is taken in one batched matmul
    over the stacked pairs (one dispatch, instead of one per pair); otherwise one op per pair.
    """
    ranks = {t.dim() for t in (*lhs, *rhs)}
    if len(ranks) == 1 and min(ranks) >= 2:
        prods = torch.matmul(stack_coefficients(lhs), stack_coefficients(rhs))
        terms = prods.split(list(counts))
        return tuple(t[0] if len(t) == 1 else t.sum(0) for t in terms)
    out, p = [], 0
    for c in counts:
        acc = None
        for q in range(p, p + c):
            term = op(lhs[q], rhs[q])
            acc = term if acc is None else acc + term
        out.append(acc)
        p += c
    return tuple(out)


def _cauchy_in_one_call(ctx, target, a: Series, b: Series) -> Series:
    """(a·b)_n = Σ_i a_i b_{n−i} for a matrix product: every product a_i b_j (i + j ≤ k) in one
    batched call over the stacked pairs (`cauchy_products`), instead of O(k²) dispatches."""
    B = ctx.b
    pairs = [(n, i) for n in range(ctx.k + 1) for i in range(n + 1) if a[i] is not None and b[n - i] is not None]
    ns = sorted({n for n, _ in pairs})
    counts = [sum(1 for m, _ in pairs if m == n) for n in ns]
    both = B.call(cauchy_products, (target, counts, [a[i] for _, i in pairs], [b[n - i] for n, i in pairs]),
                  name=ctx.base + "_products")
    out: list = [None] * (ctx.k + 1)
    for p, n in enumerate(ns):
        out[n] = B.call(operator.getitem, (both, p), name=B.cname(ctx.base, n))
    return Series(out)


def rule_bilinear(ctx, node, args, kwargs):
    """mm, bmm, matmul, outer, dot, vdot, mv: bilinear in the first two arguments, the rest constant."""
    if any(is_series(a) for a in args[2:]) or any(is_series(v) for v in kwargs.values()):
        raise Unsupported
    return bilinear(ctx, node, args[0], args[1], tuple(cval(a) for a in args[2:]), {k_: cval(v) for k_, v in kwargs.items()})


def rule_mul(ctx, node, args, kwargs):
    """mul: a square (half the products) when both sides are the same series, else bilinear."""
    a, b = args
    if is_series(a) and is_series(b) and a is b:
        return ctx.b.square(a, ctx.base)
    return rule_bilinear(ctx, node, args, kwargs)


def rule_div(ctx, node, args, kwargs):
    """div: linear for a constant divisor (on the stack where possible), else the division recurrence."""
    if kwargs.get("rounding_mode") is not None:
        raise Unsupported
    a, b = args[0], args[1]
    B = ctx.b
    if not is_series(b):
        on_stack = elementwise_on_stack(ctx, node, a, b)
        if on_stack is not None:
            return on_stack
        bc = cval(b)
        return B.linear(a, lambda c, name: B.call(node.target, (c, bc), name=name), ctx.base)
    if not is_series(a):
        a = Series([cval(a)] + [None] * ctx.k)
    return div_series(B, a, b, ctx.base)


def rule_linear(ctx, node, args, kwargs):  # linear(x, W, b)
    """linear(x, W, b): for a constant W, the coefficients stacked through one call (W read once),
    the bias added to the zeroth coefficient only; bilinear when W or b depend on x."""
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    B = ctx.b
    if is_series(w) or is_series(bias):
        # x·Wᵀ bilinear, bias added to every coefficient it has
        core = bilinear(ctx, node, x, w, (), {})
        if bias is None:
            return core
        return _add_any(ctx, core, bias)
    wc = cval(w)
    bc = cval(bias) if bias is not None else None

    def c0(c, name):
        return B.call(aten.linear.default, (c, wc, bc) if bc is not None else (c, wc), name=name)

    if len(x.nonzero()) < 2 or x[0] is None:
        return B.linear(x, lambda c, name: B.call(aten.linear.default, (c, wc), name=name), ctx.base, c0=c0)
    if bc is None:
        return B.stacked(x, lambda c, name: B.call(aten.linear.default, (c, wc), name=name), ctx.base)
    out = B.stacked(x, lambda c, name: B.call(aten.linear.default, (c, wc), name=name), ctx.base + "_xw")
    return B.shift_stacked(out, bc, ctx.base)


def _add_any(ctx, s: Series, other):
    """The series plus a bias that is a series (term by term) or a constant (zeroth coefficient)."""
    B = ctx.b
    if is_series(other):
        return B.add_series(s, other, ctx.base + "_bias")
    return B.shift(s, cval(other), ctx.base + "_bias")


def rule_addmm(ctx, node, args, kwargs):  # beta·input + alpha·(m1 @ m2)
    """addmm(input, m1, m2, beta, alpha) = beta·input + alpha·(m1 @ m2).

    GPT-2's Conv1D (x·W + b, constant W and b) takes the stacked path: every coefficient in one mm."""
    inp, m1, m2 = args[:3]
    beta = cval(kwargs.get("beta", 1))
    alpha = cval(kwargs.get("alpha", 1))
    B = ctx.b
    if not is_series(inp) and not (is_series(m1) and is_series(m2)):
        ic = cval(inp)
        if is_series(m1) and m1[0] is not None and len(m1.nonzero()) >= 2 and alpha == 1 and beta == 1:  # x·W + b (GPT-2's Conv1D)
            other = cval(m2)
            s = B.stacked(m1, lambda c, name: B.call(aten.mm.default, (c, other), name=name), ctx.base + "_xw", rows=True)
            return B.shift_stacked(s, ic, ctx.base)
        if is_series(m1):
            other = cval(m2)
            fn = lambda c, name: B.call(aten.mm.default, (c, other), name=name)  # noqa: E731
            c0 = lambda c, name: B.call(node.target, (ic, c, other), dict(kwargs and {"beta": beta, "alpha": alpha}), name=name)  # noqa: E731
            s = B.linear(m1, fn, ctx.base, c0=c0)
        else:
            other = cval(m1)
            fn = lambda c, name: B.call(aten.mm.default, (other, c), name=name)  # noqa: E731
            c0 = lambda c, name: B.call(node.target, (ic, other, c), dict(kwargs and {"beta": beta, "alpha": alpha}), name=name)  # noqa: E731
            s = B.linear(m2, fn, ctx.base, c0=c0)
        if alpha != 1:
            s = Series([s.cs[0]] + [B.scale(c, alpha, B.cname(ctx.base, j)) for j, c in enumerate(s.cs) if j > 0])
        return s
    return _scaled_product_plus(ctx, node, aten.mm.default, inp, m1, m2, beta, alpha)


def _scaled_product_plus(ctx: Ctx, node: fx.Node, product, inp, m1, m2, beta, alpha) -> Series:
    """beta·inp + alpha·product(m1, m2) term by term (addmm with mm, baddbmm with bmm)."""
    B = ctx.b
    prod = bilinear(ctx, node, m1, m2, target=product) if (is_series(m1) or is_series(m2)) else None
    if prod is None:
        prod = Series([B.call(product, (cval(m1), cval(m2)), name=B.cname(ctx.base, 0))] + [None] * ctx.k)
    prod = B.scale_series(prod, alpha, ctx.base)
    if beta == 0:  # torch ignores the input then, NaNs included (attention code passes torch.empty)
        return prod
    if is_series(inp):
        inp = B.scale_series(inp, beta, ctx.base)
        return B.add_series(prod, inp, ctx.base)
    return B.shift(prod, B.scale(cval(inp), beta, ctx.base + "_in") if isinstance(cval(inp), fx.Node) else cval(inp) * beta, ctx.base)


def rule_baddbmm(ctx: Ctx, node: fx.Node, args, kwargs) -> Series:
    """baddbmm(input, batch1, batch2, beta=1, alpha=1) = beta·input + alpha·(batch1 @ batch2)."""
    inp, m1, m2 = args[:3]
    if any(is_series(v) for v in kwargs.values()):
        raise Unsupported
    return _scaled_product_plus(ctx, node, aten.bmm.default, inp, m1, m2, cval(kwargs.get("beta", 1)),
                                cval(kwargs.get("alpha", 1)))


def rule_einsum(ctx: Ctx, node: fx.Node, args, kwargs) -> Series:
    """einsum(equation, operands): linear in each operand, so a Cauchy product over the (at most
    two) operands that depend on x; three or more dependent operands fall back on nested AD."""
    equation, operands = cval(args[0]), list(args[1])
    if is_series(equation) or any(is_series(v) for v in kwargs.values()):
        raise Unsupported
    moving = [i for i, a in enumerate(operands) if is_series(a)]
    if not moving or len(moving) > 2:
        raise Unsupported
    B = ctx.b
    kw = {key: cval(v) for key, v in kwargs.items()}

    def op(coefficients: dict, name):
        tensors = [coefficients.get(i, cval(a)) for i, a in enumerate(operands)]
        return B.call(node.target, (equation, tensors), kw, name=name)

    if len(moving) == 1:
        (i,) = moving
        return B.linear(operands[i], lambda c, name: op({i: c}, name), ctx.base)
    i, j = moving
    a, b = operands[i], operands[j]
    out = []
    for n in range(ctx.k + 1):
        name = B.cname(ctx.base, n)
        out.append(B.total([op({i: a[m], j: b[n - m]}, name) for m in range(n + 1)
                            if a[m] is not None and b[n - m] is not None], name))
    return Series(out)
