"""Elementwise functions of one series: exp, log, powers, tanh, sigmoid, erf and the activations
built from them (gelu, silu, softplus, mish), and division by a series.

Most follow from one recurrence (`ode`): if y = φ(u) and φ' = g(φ), then y' = g(y)·u' and, matching
coefficients, y_n = (1/n) Σ_{j=1..n} j·u_j·g(y)_{n−j}. exp (g(y) = y), tanh (1 − y²), sigmoid
(y − y²), softplus (σ(u)) and erf (2/√π·exp(−u²)) are this one helper with a different g — the role
Faà di Bruno's formula plays in torch-jet, at O(k²) products instead of a sum over partitions. log,
powers and division use their own classic recurrences (one reciprocal of u_0, then products).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .._graph import aten
from .series import Series, Unsupported, cval, is_series


def ode(B, u: Series, y0, g: Callable[[int, list], object], base: str, factor: float = 1.0,
        order: int | None = None) -> Series:
    """y = φ(u) where φ' = factor·g(φ): y_n = (factor/n) Σ_{j=1..n} j u_j g_{n−j}.

    The one recurrence behind every elementwise rule whose derivative is a function of its value
    (or of another series already known).
    Args:
        u: the argument's series; y0: the node of φ(u_0).
        g: g(m, ys) returns the m-th coefficient of g(y) given ys = y_0..y_m (a node or None).
        factor: a constant in front of g (erf's 2/√π), applied once per coefficient.
        order: the last coefficient computed (B.k by default).
    Returns: the Series y_0 … y_order.
    """
    order = B.k if order is None else order
    ys = [y0]
    gs = []
    ju = {j: B.scale(u[j], j, B.cname(base + "_du", j)) for j in u.nonzero(1)}
    for n in range(1, order + 1):
        gs.append(g(n - 1, ys))
        name = B.cname(base, n)
        terms = [B.mul(ju[j], gs[n - j], name) for j in ju if j <= n]
        ys.append(B.scale(B.total(terms, name), factor / n, name))
    return Series(ys)


def exp_series(B, u: Series, base: str, y0=None, order: int | None = None) -> Series:
    """exp(u): exp' = exp."""
    if y0 is None:
        y0 = B.call(aten.exp.default, (u[0],), name=B.cname(base, 0))
    return ode(B, u, y0, lambda m, ys: ys[m], base, order=order)


def log_series(B, u: Series, base: str, y0=None) -> Series:
    """log(u): u_0·l_n = u_n − (1/n) Σ_{j=1..n−1} j l_j u_{n−j} (one reciprocal of u_0)."""
    if y0 is None:
        y0 = B.call(aten.log.default, (u[0],), name=B.cname(base, 0))
    ls = [y0]
    inv0 = None
    for n in range(1, B.k + 1):
        name = B.cname(base, n)
        terms = [(j / n, B.mul(ls[j], u[n - j], name)) for j in range(1, n)]
        acc = B.sub(u[n], B.weighted_total(terms, name), name)
        if acc is None:
            ls.append(None)
            continue
        if inv0 is None:
            inv0 = B.call(aten.reciprocal.default, (u[0],), name=base + "_inv")
        ls.append(B.mul(acc, inv0, name))
    return Series(ls)


def pow_series(B, u: Series, p: float, base: str, y0=None) -> Series:
    """u^p for a Python number p: squares and identities directly, else the classic recurrence
    w_n = 1/(n u_0) Σ_{j=1..n} (p j − (n − j)) u_j w_{n−j}."""
    if p == 0:
        return Series([B.call(aten.pow.Tensor_Scalar, (u[0], 0), name=B.cname(base, 0))] + [None] * B.k)
    if p == 1:
        return u
    if p == 2:
        return B.square(u, base)
    if y0 is None:
        y0 = B.call(aten.pow.Tensor_Scalar, (u[0], p), name=B.cname(base, 0))
    ws = [y0]
    inv0 = None
    for n in range(1, B.k + 1):
        name = B.cname(base, n)
        terms = [((p * j - (n - j)) / n, B.mul(u[j], ws[n - j], name)) for j in range(1, n + 1)]
        acc = B.weighted_total(terms, name)
        if acc is None:
            ws.append(None)
            continue
        if inv0 is None:
            inv0 = B.call(aten.reciprocal.default, (u[0],), name=base + "_inv")
        ws.append(B.mul(acc, inv0, name))
    return Series(ws)


def div_series(B, a: Series, b: Series, base: str) -> Series:
    """a/b with b depending on x: w_n = (a_n − Σ_{j=1..n} b_j w_{n−j}) / b_0."""
    inv0 = B.call(aten.reciprocal.default, (b[0],), name=base + "_inv")
    ws = [B.call(aten.div.Tensor, (a[0], b[0]), name=B.cname(base, 0))]
    for n in range(1, B.k + 1):
        name = B.cname(base, n)
        s = B.total([B.mul(b[j], ws[n - j], name) for j in range(1, n + 1)], name)
        acc = B.sub(a[n], s, name)
        ws.append(B.mul(acc, inv0, name))
    return Series(ws)


def tanh_series(B, u: Series, base: str) -> Series:
    """tanh(u): tanh' = 1 − tanh²."""
    y0 = B.call(aten.tanh.default, (u[0],), name=B.cname(base, 0))

    def g(m, ys):  # (1 − y²)_m
        name = B.cname(base + "_d", m)
        sq = _sq_coeff(B, ys, m, name)
        if m == 0:
            v = B.call(aten.rsub.Scalar, (sq, 1), name=name)
        else:
            v = B.scale(sq, -1, name)
        return v

    return ode(B, u, y0, g, base)


def sigmoid_series(B, u: Series, base: str) -> Series:
    """sigmoid(u): σ' = σ − σ²."""
    y0 = B.call(aten.sigmoid.default, (u[0],), name=B.cname(base, 0))

    def g(m, ys):  # (y − y²)_m
        name = B.cname(base + "_d", m)
        return B.sub(ys[m], _sq_coeff(B, ys, m, name), name)

    return ode(B, u, y0, g, base)


def _sq_coeff(B, ys, m, name):
    """Coefficient m of y² from ys = y_0..y_m (the pairs i < m − i doubled)."""
    terms = []
    for i in range(m // 2 + 1):
        a, b = ys[i], ys[m - i]
        if a is None or b is None:
            continue
        terms.append((1 if i == m - i else 2, B.call(aten.mul.Tensor, (a, b), name=name)))
    return B.weighted_total(terms, name)


def erf_series(B, u: Series, base: str) -> Series:
    """erf(u): erf'(u) = 2/√π·exp(−u²), exp(−u²) from the square of u up to order k − 1."""
    y0 = B.call(aten.erf.default, (u[0],), name=B.cname(base, 0))
    if B.k == 0:
        return Series([y0])
    sq = B.square(Series(u.cs[: B.k]), base + "_sq")  # exp(−u²) needed up to k−1
    neg = B.scale_series(Series(sq.cs[: B.k]), -1, base + "_negsq")
    e = exp_series(B, neg, base + "_gauss", order=B.k - 1)
    return ode(B, u, y0, lambda m, ys: e[m], base, factor=2.0 / math.sqrt(math.pi))


def rule_exp(ctx, node, args, kwargs):
    """exp."""
    return exp_series(ctx.b, args[0], ctx.base)


def rule_log(ctx, node, args, kwargs):
    """log."""
    return log_series(ctx.b, args[0], ctx.base)


def rule_pow(ctx, node, args, kwargs):
    """pow(u, p) for a constant Python exponent p (a tensor exponent falls back)."""
    u, p = args[0], args[1]
    if not is_series(u) or is_series(p):
        raise Unsupported
    p = cval(p)
    if not isinstance(p, (int, float)):
        raise Unsupported
    return pow_series(ctx.b, u, p, ctx.base)


def _pow_rule(p):
    """A rule for u^p with a fixed p (rsqrt: −½, sqrt: ½, reciprocal: −1), c_0 from the op itself."""
    def rule(ctx, node, args, kwargs):
        y0 = ctx.b.call(node.target, (args[0][0],), name=ctx.b.cname(ctx.base, 0))
        return pow_series(ctx.b, args[0], p, ctx.base, y0=y0)

    return rule


def rule_tanh(ctx, node, args, kwargs):
    """tanh."""
    return tanh_series(ctx.b, args[0], ctx.base)


def rule_sigmoid(ctx, node, args, kwargs):
    """sigmoid."""
    return sigmoid_series(ctx.b, args[0], ctx.base)


def rule_erf(ctx, node, args, kwargs):
    """erf."""
    return erf_series(ctx.b, args[0], ctx.base)


def rule_gelu(ctx, node, args, kwargs):
    """gelu(u) = ½·u·(1 + g), g = erf(u/√2), or (approximate='tanh') tanh(√(2/π)·(u + 0.044715·u³))."""
    u = args[0]
    approx = cval(kwargs.get("approximate", args[1] if len(args) > 1 else "none"))
    B = ctx.b
    base = ctx.base
    if approx == "tanh":
        c = math.sqrt(2.0 / math.pi)
        cube = B.cauchy(B.square(u, base + "_sq"), u, base + "_cube")
        inner = B.add_series(B.scale_series(u, c, base + "_in"), B.scale_series(cube, c * 0.044715, base + "_in3"),
                             base + "_inner")
        g = tanh_series(B, inner, base + "_tanh")
    else:
        g = erf_series(B, B.scale_series(u, 1 / math.sqrt(2.0), base + "_in"), base + "_erf")
    # gelu = 0.5·u·(1 + g)
    half = B.scale_series(u, 0.5, base + "_half")
    one_g = B.shift(g, 1.0, base + "_1p")
    return B.cauchy(half, one_g, base)


def rule_silu(ctx, node, args, kwargs):
    """silu(u) = u·σ(u)."""
    u = args[0]
    return ctx.b.cauchy(u, sigmoid_series(ctx.b, u, ctx.base + "_sigmoid"), ctx.base)


def softplus_series(B, u, base, beta=1.0, threshold=20.0):
    # softplus(u) = log(1 + exp(u)); derivative sigmoid(u)·u'  (threshold branch ignored beyond c0)
    """softplus(u) = log(1 + exp(βu))/β: softplus' = σ(βu). The threshold (linear beyond it) is
    honoured in c_0 only, by the op itself."""
    y0 = B.call(aten.softplus.default, (u[0], beta, threshold), name=B.cname(base, 0))
    ub = B.scale_series(u, beta, base + "_b") if beta != 1 else u
    sig = sigmoid_series(B, ub, base + "_sigmoid")
    return ode(B, u, y0, lambda m, ys: sig[m], base)


def rule_softplus(ctx, node, args, kwargs):
    """softplus(u, beta, threshold)."""
    beta = cval(args[1]) if len(args) > 1 else cval(kwargs.get("beta", 1.0))
    threshold = cval(args[2]) if len(args) > 2 else cval(kwargs.get("threshold", 20.0))
    return softplus_series(ctx.b, args[0], ctx.base, beta, threshold)


def rule_mish(ctx, node, args, kwargs):
    """mish(u) = u·tanh(softplus(u))."""
    u = args[0]
    B = ctx.b
    t = tanh_series(B, softplus_series(B, u, ctx.base + "_softplus"), ctx.base + "_tanh")
    return B.cauchy(u, t, ctx.base)
