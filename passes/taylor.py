"""Taylor-mode jets: a compiler pass from a region graph f(x, *side) to its Taylor coefficients.

For a center x and variate y the input is the polynomial x(t) = x + t·(y − x); every value u of
the region becomes the list of its normalized Taylor coefficients u_0 … u_k in t, and every node
of the region becomes explicit nodes of a new graph, one (or a few) per coefficient:

    linear ops (views, sums, casts, linear/addmm on a constant weight)  u_j ↦ op(u_j)
    bilinear ops (mul, matmul, …, both sides dependent)                  Cauchy product
    exp, log, pow, rsqrt, tanh, sigmoid, erf, div, softmax, …            the classic recurrences

so J^k costs O(k²) evaluations of cheap elementwise ops plus O(k) of each linear op, instead of
the O(2^k) of nested forward AD (`jetfx.jets.NestedJet`, the reference this is tested against).

Structural zeros are tracked: a coefficient is an FX node or `None` (known zero). The input has
u_0 = x, u_1 = y − x and zeros above; linear ops keep them zero, a square makes a degree-2
polynomial (u_3 = u_4 = 0), and so on — a linear layer after a norm costs k+1 matmuls, but the
first linear layer of a block costs two. Values that do not depend on x are computed once, as
constants (their own node, nothing per coefficient).

An op with no rule falls back on nested forward AD for that op alone (`_fallback_coefficients`),
with one warning naming the ops; `TaylorJet(..., strict=True)` raises instead.

    tj = TaylorJet(region, k=3)
    tj(centers, variate, *side)            # Σ_j c_j, stacked over centers: J^k f(center_i)(variate)
    tj(centers, variate, *side, coefficients=True)   # (k+1, N, …)
    print(tj.graph_module.code)            # x_c0, x_c1, linear_c0, linear_c1, … one line each
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from ..errors import ExpansionError, check_order
from ._graph import aten
from .batching import BatchedGraph
from .decompose import data_dependent, grouped_mm

__all__ = ["TaylorJet", "taylor_graph_module", "RULES", "supported_ops"]


# --------------------------------------------------------------------------------------------
# values of the Taylor graph


@dataclass
class Const:
    """A value that does not depend on x: one node (or a Python constant) of the new graph."""

    value: object


class Series:
    """Normalized Taylor coefficients of a value that depends on x: nodes, or None (zero)."""

    __slots__ = ("cs",)

    def __init__(self, cs):
        self.cs = list(cs)

    def __getitem__(self, j):
        return self.cs[j] if j < len(self.cs) else None

    def nonzero(self, start=0):
        return [j for j in range(start, len(self.cs)) if self.cs[j] is not None]


class Parts:
    """A tuple-valued node whose elements differ in kind (topk: smooth values, constant indices)."""

    __slots__ = ("items",)

    def __init__(self, items):
        self.items = list(items)


class _Unsupported(Exception):
    pass


def stack_coefficients(cs):
    """torch.stack of coefficients, broadcast to one shape first (a coefficient may be smaller
    than the value it belongs to: c + x for a constant c keeps x's shape from c_1 on)."""
    return torch.stack(torch.broadcast_tensors(*cs))


def add_to_first(stack, value):
    """`value` added to the first entry of a stack of coefficients only (c_0: a bias)."""
    return torch.cat([(stack[0] + value).unsqueeze(0), stack[1:]])


def cat_coefficient_rows(cs):
    """The coefficients (2-D) broadcast to one shape and concatenated along the rows."""
    return torch.cat(torch.broadcast_tensors(*cs))


# --------------------------------------------------------------------------------------------
# the builder: coefficient-level algebra that emits nodes


class Builder:
    def __init__(self, graph: fx.Graph, k: int):
        self.g = graph
        self.k = k
        # series whose nonzero coefficients are also one stacked node (leading dimension), so
        # that later linear ops can act on all of them in one call: coefficients → stack node
        self.stacks: dict[tuple, fx.Node] = {}

    def stack_of(self, a: Series):
        return self.stacks.get(tuple(a.cs)) if isinstance(a, Series) else None

    def from_stack(self, stack, js, length: int, base: str) -> Series:
        """The series whose nonzero coefficients j in `js` are stack[i] (selects, unused ones
        vanish with dead code), remembered as stacked."""
        out: list = [None] * length
        for i, j in enumerate(js):
            out[j] = self.call(aten.select.int, (stack, 0, i), name=self.cname(base, j))
        self.stacks[tuple(out)] = stack
        return Series(out)

    # -- emitting
    def call(self, target, args, kwargs=None, name=None):
        node = self.g.create_node("call_function", target, tuple(args), dict(kwargs or {}), name=name)
        return node

    @staticmethod
    def cname(base, j):
        return f"{base}_c{j}"

    # -- elementary coefficient algebra (a, b are nodes or None; None = 0)
    def add(self, a, b, name):
        if a is None:
            return b
        if b is None:
            return a
        return self.call(aten.add.Tensor, (a, b), name=name)

    def sub(self, a, b, name):
        if b is None:
            return a
        if a is None:
            return self.call(aten.neg.default, (b,), name=name)
        return self.call(aten.sub.Tensor, (a, b), name=name)

    def scale(self, a, s, name):
        if a is None or s == 0:
            return None
        if s == 1:
            return a
        return self.call(aten.mul.Tensor, (a, s), name=name)

    def mul(self, a, b, name):
        if a is None or b is None:
            return None
        return self.call(aten.mul.Tensor, (a, b), name=name)

    def total(self, terms, name):
        terms = [t for t in terms if t is not None]
        if not terms:
            return None
        acc = terms[0]
        for t in terms[1:]:
            acc = self.call(aten.add.Tensor, (acc, t), name=name)
        return acc

    def weighted_total(self, terms, name):
        """Σ w·t for (w, t) pairs, scalar weights grouped to save multiplications."""
        by_w: dict[float, list] = {}
        for w, t in terms:
            if t is None or w == 0:
                continue
            by_w.setdefault(float(w), []).append(t)
        parts = []
        for w, ts in by_w.items():
            parts.append(self.scale(self.total(ts, name), w, name))
        return self.total(parts, name)

    # -- series algebra
    def cauchy(self, a: Series, b: Series, base: str, op=aten.mul.Tensor, upto=None) -> Series:
        """(a·b)_n = Σ_i op(a_i, b_{n−i}) for a bilinear op."""
        k = self.k if upto is None else upto
        out = []
        for n in range(k + 1):
            name = self.cname(base, n)
            terms = []
            for i in range(n + 1):
                ai, bj = a[i], b[n - i]
                if ai is None or bj is None:
                    continue
                terms.append(self.call(op, (ai, bj), name=name))
            out.append(self.total(terms, name))
        return Series(out)

    def square(self, a: Series, base: str) -> Series:
        out = []
        for n in range(self.k + 1):
            name = self.cname(base, n)
            terms = []
            for i in range(n // 2 + 1):
                ai, aj = a[i], a[n - i]
                if ai is None or aj is None:
                    continue
                if i == n - i:
                    terms.append((1, self.call(aten.mul.Tensor, (ai, ai), name=name)))
                else:
                    terms.append((2, self.call(aten.mul.Tensor, (ai, aj), name=name)))
            out.append(self.weighted_total(terms, name))
        return Series(out)

    def linear(self, a: Series, fn: Callable, base: str, c0=None) -> Series:
        """u_j ↦ fn(u_j); c0 (if given) computes the zeroth coefficient instead (bias etc.)."""
        out = []
        for j, c in enumerate(a.cs):
            name = self.cname(base, j)
            if j == 0 and c0 is not None:
                out.append(c0(c, name))
            elif c is None:
                out.append(None)
            else:
                out.append(fn(c, name))
        return Series(out)

    def stacked(self, a: Series, fn: Callable, base: str, rows: bool = False) -> Series:
        """u_j ↦ fn(u_j) for an op that acts on the last dimensions only (linear on a constant
        weight): one call on the nonzero coefficients stacked along a new leading dimension,
        so the weight is read once for all of them instead of once per coefficient. `rows`: the
        op takes 2-D inputs and acts row by row (mm on a constant): the coefficients are
        concatenated along the rows instead, and the result split back."""
        js = a.nonzero()
        if len(js) < 2:
            return self.linear(a, fn, base)
        stack = self.stack_of(a)
        if rows:
            if stack is not None:
                cat = self.call(aten.flatten.using_ints, (stack, 0, 1), name=base + "_stacked_in")
            else:
                cat = self.call(cat_coefficient_rows, ([a[j] for j in js],), name=base + "_stacked_in")
            flat = fn(cat, base + "_stacked")
            both = self.call(aten.unflatten.int, (flat, 0, [len(js), -1]), name=base + "_stacked")
        else:
            if stack is None:
                stack = self.call(stack_coefficients, ([a[j] for j in js],), name=base + "_stacked_in")
            both = fn(stack, base + "_stacked")
        return self.from_stack(both, js, len(a.cs), base)

    def ode(self, u: Series, y0, g: Callable[[int, list], object], base: str) -> Series:
        """y with y' = g(y)·u': y_n = (1/n) Σ_{j=1..n} j u_j g_{n−j}.

        `g(m, ys)` returns the m-th coefficient of g(y) given ys = y_0..y_m (a node or None).
        """
        ys = [y0]
        gs = []
        ju = {j: self.scale(u[j], j, self.cname(base + "_du", j)) for j in u.nonzero(1)}
        for n in range(1, self.k + 1):
            gs.append(g(n - 1, ys))
            name = self.cname(base, n)
            terms = [self.mul(ju[j], gs[n - j], name) for j in ju if j <= n]
            ys.append(self.scale(self.total(terms, name), 1.0 / n, name))
        return Series(ys)

    def exp(self, u: Series, base: str, y0=None) -> Series:
        if y0 is None:
            y0 = self.call(aten.exp.default, (u[0],), name=self.cname(base, 0))
        return self.ode(u, y0, lambda m, ys: ys[m], base)

    def log(self, u: Series, base: str, y0=None) -> Series:
        # l' = u'/u:  u_0 l_n = u_n − (1/n) Σ_{j=1..n−1} j l_j u_{n−j}
        if y0 is None:
            y0 = self.call(aten.log.default, (u[0],), name=self.cname(base, 0))
        ls = [y0]
        inv0 = None
        for n in range(1, self.k + 1):
            name = self.cname(base, n)
            terms = [(j / n, self.mul(ls[j], u[n - j], name)) for j in range(1, n)]
            acc = self.sub(u[n], self.weighted_total(terms, name), name)
            if acc is None:
                ls.append(None)
                continue
            if inv0 is None:
                inv0 = self.call(aten.reciprocal.default, (u[0],), name=base + "_inv")
            ls.append(self.mul(acc, inv0, name))
        return Series(ls)

    def pow(self, u: Series, p: float, base: str, y0=None) -> Series:
        if p == 0:
            return Series([self.call(aten.pow.Tensor_Scalar, (u[0], 0), name=self.cname(base, 0))] + [None] * self.k)
        if p == 1:
            return u
        if p == 2:
            return self.square(u, base)
        if y0 is None:
            y0 = self.call(aten.pow.Tensor_Scalar, (u[0], p), name=self.cname(base, 0))
        # w_n = 1/(n u_0) Σ_{j=1..n} (p j − (n − j)) u_j w_{n−j}
        ws = [y0]
        inv0 = None
        for n in range(1, self.k + 1):
            name = self.cname(base, n)
            terms = [((p * j - (n - j)) / n, self.mul(u[j], ws[n - j], name)) for j in range(1, n + 1)]
            acc = self.weighted_total(terms, name)
            if acc is None:
                ws.append(None)
                continue
            if inv0 is None:
                inv0 = self.call(aten.reciprocal.default, (u[0],), name=base + "_inv")
            ws.append(self.mul(acc, inv0, name))
        return Series(ws)

    def div(self, a: Series, b: Series, base: str) -> Series:
        """a/b with b depending on x: w_n = (a_n − Σ_{j=1..n} b_j w_{n−j}) / b_0."""
        inv0 = self.call(aten.reciprocal.default, (b[0],), name=base + "_inv")
        ws = [self.call(aten.div.Tensor, (a[0], b[0]), name=self.cname(base, 0))]
        for n in range(1, self.k + 1):
            name = self.cname(base, n)
            s = self.total([self.mul(b[j], ws[n - j], name) for j in range(1, n + 1)], name)
            acc = self.sub(a[n], s, name)
            ws.append(self.mul(acc, inv0, name))
        return Series(ws)

    def tanh(self, u: Series, base: str) -> Series:
        y0 = self.call(aten.tanh.default, (u[0],), name=self.cname(base, 0))
        s: list = []

        def g(m, ys):  # (1 − y²)_m
            name = self.cname(base + "_d", m)
            sq = self._sq_coeff(ys, m, name)
            if m == 0:
                v = self.call(aten.rsub.Scalar, (sq, 1), name=name)
            else:
                v = self.scale(sq, -1, name)
            s.append(v)
            return v

        return self.ode(u, y0, g, base)

    def sigmoid(self, u: Series, base: str) -> Series:
        y0 = self.call(aten.sigmoid.default, (u[0],), name=self.cname(base, 0))

        def g(m, ys):  # (y − y²)_m
            name = self.cname(base + "_d", m)
            return self.sub(ys[m], self._sq_coeff(ys, m, name), name)

        return self.ode(u, y0, g, base)

    def _sq_coeff(self, ys, m, name):
        terms = []
        for i in range(m // 2 + 1):
            a, b = ys[i], ys[m - i]
            if a is None or b is None:
                continue
            terms.append((1 if i == m - i else 2, self.call(aten.mul.Tensor, (a, b), name=name)))
        return self.weighted_total(terms, name)

    def erf(self, u: Series, base: str) -> Series:
        y0 = self.call(aten.erf.default, (u[0],), name=self.cname(base, 0))
        if self.k == 0:
            return Series([y0])
        sq = self.square(Series(u.cs[: self.k]), base + "_sq")  # exp(−u²) needed up to k−1
        neg = Series([self.scale(c, -1, self.cname(base + "_negsq", j)) for j, c in enumerate(sq.cs[: self.k])])
        saved_k = self.k
        self.k = saved_k - 1
        e = self.exp(neg, base + "_gauss")
        self.k = saved_k
        ys = [y0]
        c = 2.0 / math.sqrt(math.pi)
        ju = {j: self.scale(u[j], j, self.cname(base + "_du", j)) for j in u.nonzero(1)}
        for n in range(1, self.k + 1):
            name = self.cname(base, n)
            terms = [self.mul(ju[j], e[n - j], name) for j in ju if j <= n]
            ys.append(self.scale(self.total(terms, name), c / n, name))
        return Series(ys)

    def add_series(self, a: Series, b: Series, base: str, alpha=1, expand_a=False, expand_b=False) -> Series:
        """a + alpha·b; expand_a/expand_b: that side broadcasts up, so a coefficient taken from it
        alone is expanded to the shape of the zeroth coefficient of the sum."""
        out = []
        for j in range(self.k + 1):
            name = self.cname(base, j)
            bj = self.scale(b[j], alpha, name) if alpha != 1 else b[j]
            c = self.add(a[j], bj, name)
            if j > 0 and c is not None and ((a[j] is None and expand_b) or (bj is None and expand_a)):
                c = self.call(aten.expand_as.default, (c, out[0]), name=name)
            out.append(c)
        return Series(out)

    def shift_stacked(self, a: Series, s, base: str) -> Series:
        """`shift` that keeps a stacked series stacked (the bias of a linear layer on a stack)."""
        stack = self.stack_of(a)
        if stack is None:
            return self.shift(a, s, base)
        new = self.call(add_to_first, (stack, s), name=base + "_stacked")
        return self.from_stack(new, a.nonzero(), len(a.cs), base)

    def shift(self, a: Series, s, base: str) -> Series:
        """a + s for a constant (node or scalar) s: only the zeroth coefficient changes."""
        c0 = self.call(aten.add.Tensor, (a[0], s), name=self.cname(base, 0))
        return Series([c0] + a.cs[1:])


# --------------------------------------------------------------------------------------------
# rules: rule(ctx, node, args, kwargs) -> Series (or Const), args/kwargs mapped to Const/Series


class Ctx:
    def __init__(self, builder: Builder, node: fx.Node):
        self.b = builder
        self.node = node
        self.base = node.name

    @property
    def k(self):
        return self.b.k


def _is_series(a):
    return isinstance(a, Series)


def _cval(a):
    return a.value if isinstance(a, Const) else a


def _replace(args, i, value):
    return tuple(value if j == i else _cval(a) for j, a in enumerate(args))


def _map_structure(x, fn):
    if isinstance(x, (list, tuple)):
        return type(x)(_map_structure(e, fn) for e in x)
    return fn(x)


def _series_args(args, kwargs):
    found = []

    def visit(x):
        if _is_series(x):
            found.append(x)
        return x

    _map_structure(list(args), visit)
    _map_structure(list(kwargs.values()), visit)
    return found


def rule_linear_first(ctx: Ctx, node, args, kwargs):
    """Ops linear in their first argument, all other arguments constant."""
    if any(_is_series(a) for a in args[1:]) or any(_is_series(v) for v in kwargs.values()):
        raise _Unsupported
    u = args[0]
    rest = tuple(_cval(a) for a in args[1:])
    kw = {key: _cval(v) for key, v in kwargs.items()}
    stack = ctx.b.stack_of(u)
    if stack is not None:
        shifted = _on_stack_args(node.target, rest, kw, len(u.nonzero()))
        if shifted is not None:
            B = ctx.b
            new = B.call(node.target, (stack, *shifted), kw, name=ctx.base + "_stacked")
            if node.target.overloadpacket.__name__ not in _SPLITS:
                return B.from_stack(new, u.nonzero(), len(u.cs), ctx.base)
            # a tuple of stacks: each coefficient's tuple for ops that take it whole, and getitem
            # takes a piece's stack directly (`rule_getitem`)
            out: list = [None] * len(u.cs)
            for i, j in enumerate(u.nonzero()):
                out[j] = B.call(pieces_of, (new, i), name=B.cname(ctx.base, j))
            B.stacks[("pieces", *out)] = new
            return Series(out)
    return ctx.b.linear(u, lambda c, name: ctx.b.call(node.target, (c, *rest), kw, name=name), ctx.base)


def _shift_dim(d):
    """A dimension of one coefficient as a dimension of the stack (one more, leading)."""
    if isinstance(d, bool) or not isinstance(d, int):
        raise _Unsupported
    return d + 1 if d >= 0 else d


# ops linear in their first argument that can act on a stack of coefficients: what becomes of
# their other arguments (a leading dimension of size n added in front)
_ON_STACK = {
    "view": lambda n, shape: ([n, *shape],),
    "_unsafe_view": lambda n, shape: ([n, *shape],),
    "reshape": lambda n, shape: ([n, *shape],),
    "expand": lambda n, sizes, *r: ([n, *sizes], *r),
    "transpose": lambda n, d0, d1: (_shift_dim(d0), _shift_dim(d1)),
    "permute": lambda n, dims: ([0, *(_shift_dim(d) for d in dims)],),
    "slice": lambda n, dim=0, *r: (_shift_dim(dim), *r),
    "select": lambda n, dim, i: (_shift_dim(dim), i),
    "unsqueeze": lambda n, dim: (_shift_dim(dim),),
    "neg": lambda n: (),
    "clone": lambda n: (),
    "contiguous": lambda n: (),
    "alias": lambda n: (),
    "_to_copy": lambda n: (),
    "to": lambda n, *r: r if all(isinstance(a, (torch.dtype, bool)) or a is None for a in r) else _unsupported(),
}


_SPLITS = {"split", "split_with_sizes", "chunk"}
_ON_STACK.update({
    "split": lambda n, size, dim=0: (size, _shift_dim(dim)),
    "split_with_sizes": lambda n, sizes, dim=0: (sizes, _shift_dim(dim)),
    "chunk": lambda n, chunks, dim=0: (chunks, _shift_dim(dim)),
})


def pieces_of(stacked_pieces, i):
    """Coefficient i of every piece of a split stack: the split of that coefficient."""
    return tuple(p[i] for p in stacked_pieces)


def _unsupported():
    raise _Unsupported


def _on_stack_args(target, rest, kw, n):
    """The arguments after the first for `target` acting on a stack of n coefficients, or None."""
    packet = getattr(target, "overloadpacket", None)
    fn = _ON_STACK.get(getattr(packet, "__name__", None))
    if fn is None or (kw and packet.__name__ not in ("_to_copy", "to", "clone")):
        return None
    if packet.__name__ in ("view", "_unsafe_view", "reshape", "expand") and not isinstance(rest[0], (list, tuple)):
        return None
    try:
        return tuple(fn(n, *rest))
    except (_Unsupported, TypeError):
        return None


def rule_linear_list(ctx: Ctx, node, args, kwargs):
    """cat/stack: linear in every element of the list (constants enter the zeroth coefficient)."""
    items = args[0]
    rest = tuple(_cval(a) for a in args[1:])
    kw = {key: _cval(v) for key, v in kwargs.items()}
    stacks = [ctx.b.stack_of(a) for a in items]
    if (node.target == aten.cat.default and not kw and items and all(st is not None for st in stacks)
            and len({tuple(a.nonzero()) for a in items}) == 1):
        try:
            dim = _shift_dim(rest[0] if rest else 0)
        except _Unsupported:
            dim = None
        if dim is not None:
            new = ctx.b.call(aten.cat.default, (stacks, dim), name=ctx.base + "_stacked")
            return ctx.b.from_stack(new, items[0].nonzero(), len(items[0].cs), ctx.base)
    out = []
    for j in range(ctx.k + 1):
        name = ctx.b.cname(ctx.base, j)
        parts = []
        if j > 0 and all((not _is_series(a)) or a[j] is None for a in items):
            out.append(None)
            continue
        zeros = {}
        for a in items:
            if _is_series(a):
                c = a[j]
                if c is None:
                    c = ctx.b.call(aten.zeros_like.default, (a[0],), name=name + "_zero")
            else:
                c = _cval(a) if j == 0 else ctx.b.call(aten.zeros_like.default, (_cval(a),), name=name + "_zero")
            parts.append(c)
        del zeros
        out.append(ctx.b.call(node.target, (parts, *rest), kw, name=name))
    return Series(out)


def rule_add(ctx: Ctx, node, args, kwargs, sign=1):
    a, b = args[0], args[1]
    alpha = _cval(kwargs.get("alpha", 1)) * sign
    B = ctx.b
    if not _is_series(a):  # const ± series
        c0 = B.call(node.target, (_cval(a), b[0]), {k_: _cval(v) for k_, v in kwargs.items()}, name=B.cname(ctx.base, 0))
        rest = [B.scale(b[j], alpha, B.cname(ctx.base, j)) for j in range(1, ctx.k + 1)]
        return Series([c0] + rest)
    if not _is_series(b):
        c0 = B.call(node.target, (a[0], _cval(b)), {k_: _cval(v) for k_, v in kwargs.items()}, name=B.cname(ctx.base, 0))
        return Series([c0] + a.cs[1:])
    shape = _shape(node)
    expand_a, expand_b = _shape(node.args[0]) != shape, _shape(node.args[1]) != shape
    sa, sb = B.stack_of(a), B.stack_of(b)
    if sa is not None and sb is not None and not (expand_a or expand_b) and shape is not None and a.nonzero() == b.nonzero():
        new = B.call(aten.add.Tensor, (sa, sb), {"alpha": alpha} if alpha != 1 else {}, name=ctx.base + "_stacked")
        return B.from_stack(new, a.nonzero(), len(a.cs), ctx.base)
    return B.add_series(a, b, ctx.base, alpha, expand_a=expand_a, expand_b=expand_b)


def _shape(n):
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def rule_sub(ctx, node, args, kwargs):
    return rule_add(ctx, node, args, kwargs, sign=-1)


def rule_rsub(ctx, node, args, kwargs):  # other − alpha·self
    a, b = args[0], args[1]
    alpha = _cval(kwargs.get("alpha", 1))
    B = ctx.b
    if _is_series(b):
        raise _Unsupported
    c0 = B.call(node.target, (a[0], _cval(b)), {k_: _cval(v) for k_, v in kwargs.items()}, name=B.cname(ctx.base, 0))
    return Series([c0] + [B.scale(a[j], -alpha, B.cname(ctx.base, j)) for j in range(1, ctx.k + 1)])


def _bilinear(ctx, node, a, b, rest=(), kw=None):
    """op(a, b, *rest) bilinear in (a, b)."""
    B = ctx.b
    kw = kw or {}

    def op(x, y, name):
        return B.call(node.target, (x, y, *rest), kw, name=name)

    if _is_series(a) and _is_series(b):
        if node.target in _BATCHABLE_PRODUCTS and not rest and not kw:
            pairs = sum(1 for n in range(ctx.k + 1) for i in range(n + 1) if a[i] is not None and b[n - i] is not None)
            if pairs >= 3:
                return _cauchy_in_one_call(ctx, node.target, a, b)
        out = []
        for n in range(ctx.k + 1):
            name = B.cname(ctx.base, n)
            out.append(B.total([op(a[i], b[n - i], name) for i in range(n + 1) if a[i] is not None and b[n - i] is not None], name))
        return Series(out)
    if not rest and not kw:
        on_stack = _elementwise_on_stack(ctx, node, a, b)
        if on_stack is not None:
            return on_stack
    if _is_series(a):
        bc = _cval(b)
        return B.linear(a, lambda c, name: op(c, bc, name), ctx.base)
    ac = _cval(a)
    return B.linear(b, lambda c, name: op(ac, c, name), ctx.base)


_ELEMENTWISE_LINEAR = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}


def _rank(n):
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v.dim() if isinstance(v, torch.Tensor) else None


def _elementwise_on_stack(ctx, node, a, b):
    """series·constant (or series/constant) in one op on the series' stack, when the constant
    broadcasts over the trailing dimensions only (its rank at most the series'); else None."""
    if node.target not in _ELEMENTWISE_LINEAR or (_is_series(b) and node.target in (aten.div.Tensor, aten.div.Scalar)):
        return None
    first = _is_series(a)
    series, const = (a, _cval(b)) if first else (b, _cval(a))
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
    if any(_is_series(a) for a in args[2:]) or any(_is_series(v) for v in kwargs.values()):
        raise _Unsupported
    return _bilinear(ctx, node, args[0], args[1], tuple(_cval(a) for a in args[2:]), {k_: _cval(v) for k_, v in kwargs.items()})


def rule_mul(ctx, node, args, kwargs):
    a, b = args
    if _is_series(a) and _is_series(b) and a is b:
        return ctx.b.square(a, ctx.base)
    return rule_bilinear(ctx, node, args, kwargs)


def rule_div(ctx, node, args, kwargs):
    if kwargs.get("rounding_mode") is not None:
        raise _Unsupported
    a, b = args[0], args[1]
    B = ctx.b
    if not _is_series(b):
        on_stack = _elementwise_on_stack(ctx, node, a, b)
        if on_stack is not None:
            return on_stack
        bc = _cval(b)
        return B.linear(a, lambda c, name: B.call(node.target, (c, bc), name=name), ctx.base)
    if not _is_series(a):
        a = Series([_cval(a)] + [None] * ctx.k)
    return B.div(a, b, ctx.base)


def rule_linear(ctx, node, args, kwargs):  # linear(x, W, b)
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    B = ctx.b
    if _is_series(w) or _is_series(bias):
        # x·Wᵀ bilinear, bias added to every coefficient it has
        core = _bilinear(ctx, node, x, w, (), {})
        if bias is None:
            return core
        return _add_any(ctx, core, bias)
    wc = _cval(w)
    bc = _cval(bias) if bias is not None else None

    def c0(c, name):
        return B.call(aten.linear.default, (c, wc, bc) if bc is not None else (c, wc), name=name)

    if len(x.nonzero()) < 2 or x[0] is None:
        return B.linear(x, lambda c, name: B.call(aten.linear.default, (c, wc), name=name), ctx.base, c0=c0)
    if bc is None:
        return B.stacked(x, lambda c, name: B.call(aten.linear.default, (c, wc), name=name), ctx.base)
    out = B.stacked(x, lambda c, name: B.call(aten.linear.default, (c, wc), name=name), ctx.base + "_xw")
    return B.shift_stacked(out, bc, ctx.base)


def _add_any(ctx, s: Series, other):
    B = ctx.b
    if _is_series(other):
        return B.add_series(s, other, ctx.base + "_bias")
    return B.shift(s, _cval(other), ctx.base + "_bias")


def rule_addmm(ctx, node, args, kwargs):  # beta·input + alpha·(m1 @ m2)
    inp, m1, m2 = args[:3]
    beta = _cval(kwargs.get("beta", 1))
    alpha = _cval(kwargs.get("alpha", 1))
    B = ctx.b
    if not _is_series(inp) and not (_is_series(m1) and _is_series(m2)):
        ic = _cval(inp)
        if _is_series(m1) and m1[0] is not None and len(m1.nonzero()) >= 2 and alpha == 1 and beta == 1:  # x·W + b (GPT-2's Conv1D)
            other = _cval(m2)
            s = B.stacked(m1, lambda c, name: B.call(aten.mm.default, (c, other), name=name), ctx.base + "_xw", rows=True)
            return B.shift_stacked(s, ic, ctx.base)
        if _is_series(m1):
            other = _cval(m2)
            fn = lambda c, name: B.call(aten.mm.default, (c, other), name=name)  # noqa: E731
            c0 = lambda c, name: B.call(node.target, (ic, c, other), dict(kwargs and {"beta": beta, "alpha": alpha}), name=name)  # noqa: E731
            s = B.linear(m1, fn, ctx.base, c0=c0)
        else:
            other = _cval(m1)
            fn = lambda c, name: B.call(aten.mm.default, (other, c), name=name)  # noqa: E731
            c0 = lambda c, name: B.call(node.target, (ic, other, c), dict(kwargs and {"beta": beta, "alpha": alpha}), name=name)  # noqa: E731
            s = B.linear(m2, fn, ctx.base, c0=c0)
        if alpha != 1:
            s = Series([s.cs[0]] + [B.scale(c, alpha, B.cname(ctx.base, j)) for j, c in enumerate(s.cs) if j > 0])
        return s
    prod = _bilinear(ctx, type("N", (), {"target": aten.mm.default}), m1, m2) if (_is_series(m1) or _is_series(m2)) else None
    if prod is None:
        prod = Series([B.call(aten.mm.default, (_cval(m1), _cval(m2)), name=B.cname(ctx.base, 0))] + [None] * ctx.k)
    prod = Series([B.scale(c, alpha, B.cname(ctx.base, j)) for j, c in enumerate(prod.cs)])
    if _is_series(inp):
        inp = Series([B.scale(c, beta, B.cname(ctx.base, j)) for j, c in enumerate(inp.cs)])
        return B.add_series(prod, inp, ctx.base)
    return B.shift(prod, B.scale(_cval(inp), beta, ctx.base + "_in") if isinstance(_cval(inp), fx.Node) else _cval(inp) * beta, ctx.base)


def rule_view(ctx, node, args, kwargs):
    """view(x, shape) as reshape: coefficients made by other rules (gathers, expands) need not have
    the strides a view of the original value had."""
    if any(_is_series(a) for a in args[1:]):
        raise _Unsupported
    u, shape, B = args[0], _cval(args[1]), ctx.b
    stack = B.stack_of(u)
    if stack is not None:  # stacked coefficients stay stacked: one reshape for all of them
        shifted = _on_stack_args(aten.reshape.default, (shape,), {}, len(u.nonzero()))
        if shifted is not None:
            new = B.call(aten.reshape.default, (stack, *shifted), name=ctx.base + "_stacked")
            return B.from_stack(new, u.nonzero(), len(u.cs), ctx.base)
    return B.linear(u, lambda c, name: B.call(aten.reshape.default, (c, shape), name=name), ctx.base)


def rule_convolution(ctx, node, args, kwargs):
    """conv1d(x, w, b, …) / convolution(x, w, b, …): linear in x for a constant kernel; the bias
    enters the zeroth coefficient only (state-space mixers convolve over positions)."""
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if _is_series(w) or _is_series(bias) or kwargs:
        raise _Unsupported
    rest = tuple(_cval(a) for a in args[3:])
    wc, bc = _cval(w), _cval(bias)
    B = ctx.b
    return B.linear(x, lambda c, name: B.call(node.target, (c, wc, None, *rest), name=name), ctx.base,
                    c0=lambda c, name: B.call(node.target, (c, wc, bc, *rest), name=name))


def _joint_linear(*positions):
    """Ops linear in several arguments together, all others constant: slice_scatter(base, src),
    select_scatter, copy(dst, src), index_put(base, indices, values). A coefficient takes every
    such argument's coefficient, zeros where one has none."""

    def rule(ctx, node, args, kwargs):
        if any(_is_series(a) for i, a in enumerate(args) if i not in positions) or \
                any(_is_series(v) for v in kwargs.values()):
            raise _Unsupported
        B = ctx.b
        kw = {key: _cval(v) for key, v in kwargs.items()}
        out = []
        for j in range(ctx.k + 1):
            name = B.cname(ctx.base, j)
            if j > 0 and all(not _is_series(args[i]) or args[i][j] is None for i in positions):
                out.append(None)
                continue
            call_args = []
            for i, a in enumerate(args):
                if i not in positions:
                    call_args.append(_cval(a))
                elif j == 0:
                    call_args.append(a[0] if _is_series(a) else _cval(a))
                elif _is_series(a) and a[j] is not None:
                    call_args.append(a[j])
                else:
                    zero_of = a[0] if _is_series(a) else _cval(a)
                    call_args.append(B.call(aten.zeros_like.default, (zero_of,), name=name + "_zero"))
            out.append(B.call(node.target, tuple(call_args), kw, name=name))
        return Series(out)

    return rule


def rule_neg(ctx, node, args, kwargs):
    return rule_linear_first(ctx, node, args, kwargs)


def rule_exp(ctx, node, args, kwargs):
    return ctx.b.exp(args[0], ctx.base)


def rule_log(ctx, node, args, kwargs):
    return ctx.b.log(args[0], ctx.base)


def rule_pow(ctx, node, args, kwargs):
    u, p = args[0], args[1]
    if not _is_series(u) or _is_series(p):
        raise _Unsupported
    p = _cval(p)
    if not isinstance(p, (int, float)):
        raise _Unsupported
    return ctx.b.pow(u, p, ctx.base)


def _pow_rule(p):
    def rule(ctx, node, args, kwargs):
        y0 = ctx.b.call(node.target, (args[0][0],), name=ctx.b.cname(ctx.base, 0))
        return ctx.b.pow(args[0], p, ctx.base, y0=y0)

    return rule


def rule_reciprocal(ctx, node, args, kwargs):
    B = ctx.b
    y0 = B.call(aten.reciprocal.default, (args[0][0],), name=B.cname(ctx.base, 0))
    return B.pow(args[0], -1, ctx.base, y0=y0)


def rule_tanh(ctx, node, args, kwargs):
    return ctx.b.tanh(args[0], ctx.base)


def rule_sigmoid(ctx, node, args, kwargs):
    return ctx.b.sigmoid(args[0], ctx.base)


def rule_erf(ctx, node, args, kwargs):
    return ctx.b.erf(args[0], ctx.base)


def rule_gelu(ctx, node, args, kwargs):
    u = args[0]
    approx = _cval(kwargs.get("approximate", args[1] if len(args) > 1 else "none"))
    B = ctx.b
    base = ctx.base
    if approx == "tanh":
        c = math.sqrt(2.0 / math.pi)
        cube = B.cauchy(B.square(u, base + "_sq"), u, base + "_cube")
        inner = B.add_series(Series([B.scale(x, c, B.cname(base + "_in", j)) for j, x in enumerate(u.cs)]),
                             Series([B.scale(x, c * 0.044715, B.cname(base + "_in3", j)) for j, x in enumerate(cube.cs)]), base + "_inner")
        g = B.tanh(inner, base + "_tanh")
    else:
        g = B.erf(Series([B.scale(x, 1 / math.sqrt(2.0), B.cname(base + "_in", j)) for j, x in enumerate(u.cs)]), base + "_erf")
    # gelu = 0.5·u·(1 + g)
    half = Series([B.scale(x, 0.5, B.cname(base + "_half", j)) for j, x in enumerate(u.cs)])
    one_g = B.shift(g, 1.0, base + "_1p")
    return B.cauchy(half, one_g, base)


def rule_silu(ctx, node, args, kwargs):
    u = args[0]
    return ctx.b.cauchy(u, ctx.b.sigmoid(u, ctx.base + "_sigmoid"), ctx.base)


def _softplus(B, u, base, beta=1.0, threshold=20.0):
    # softplus(u) = log(1 + exp(u)); derivative sigmoid(u)·u'  (threshold branch ignored beyond c0)
    y0 = B.call(aten.softplus.default, (u[0], beta, threshold), name=B.cname(base, 0))
    ub = Series([B.scale(c, beta, B.cname(base + "_b", j)) for j, c in enumerate(u.cs)]) if beta != 1 else u
    sig = B.sigmoid(ub, base + "_sigmoid")
    return B.ode(u, y0, lambda m, ys: sig[m], base)


def rule_softplus(ctx, node, args, kwargs):
    beta = _cval(args[1]) if len(args) > 1 else _cval(kwargs.get("beta", 1.0))
    threshold = _cval(args[2]) if len(args) > 2 else _cval(kwargs.get("threshold", 20.0))
    return _softplus(ctx.b, args[0], ctx.base, beta, threshold)


def rule_mish(ctx, node, args, kwargs):
    u = args[0]
    B = ctx.b
    t = B.tanh(_softplus(B, u, ctx.base + "_softplus"), ctx.base + "_tanh")
    return B.cauchy(u, t, ctx.base)


def _dim_args(args, kwargs, i):
    return _cval(args[i]) if len(args) > i else _cval(kwargs.get("dim"))


def _softmax_parts(ctx, u, dim, base):
    B = ctx.b
    m = B.call(aten.amax.default, (u[0], [dim], True), name=base + "_max")
    m = B.call(aten.detach.default, (m,), name=base + "_max")
    shifted = Series([B.call(aten.sub.Tensor, (u[0], m), name=B.cname(base + "_shift", 0))] + u.cs[1:])
    e = B.exp(shifted, base + "_exp")
    s = B.linear(e, lambda c, name: B.call(aten.sum.dim_IntList, (c, [dim], True), name=name), base + "_sum")
    return shifted, e, s


def rule_softmax(ctx, node, args, kwargs):
    u = args[0]
    dim = _dim_args(args, kwargs, 1)
    B = ctx.b
    _, e, s = _softmax_parts(ctx, u, dim, ctx.base)
    out = B.div(e, s, ctx.base)
    return _cast_like(ctx, out, node)


def rule_log_softmax(ctx, node, args, kwargs):
    u = args[0]
    dim = _dim_args(args, kwargs, 1)
    B = ctx.b
    shifted, e, s = _softmax_parts(ctx, u, dim, ctx.base)
    ls = B.log(s, ctx.base + "_logsum")
    out = B.add_series(shifted, ls, ctx.base, alpha=-1, expand_b=True)
    return _cast_like(ctx, out, node)


def _cast_like(ctx, s: Series, node):
    v = node.meta.get("val")
    if v is None or not isinstance(v, torch.Tensor):
        return s
    return Series([c if c is None else ctx.b.call(aten._to_copy.default, (c,), {"dtype": v.dtype}, name=ctx.b.cname(ctx.base, j))
                   for j, c in enumerate(s.cs)]) if _needs_cast(node) else s


def _needs_cast(node):
    a = node.args[0]
    av, v = a.meta.get("val") if isinstance(a, fx.Node) else None, node.meta.get("val")
    return av is not None and v is not None and getattr(av, "dtype", None) != getattr(v, "dtype", None)


def rule_var(ctx, node, args, kwargs):
    """var(u) = Σ_{i+j=n} mean(d_i·d_j)·N/(N − correction), d = u − mean(u)."""
    u = args[0]
    dims = _cval(args[1]) if len(args) > 1 else _cval(kwargs.get("dim"))
    if node.target == aten.var.correction:
        corr = _cval(kwargs.get("correction", 1))
        corr = 1 if corr is None else corr
        keep = bool(_cval(kwargs.get("keepdim", False)))
    else:  # var.dim(self, dim, unbiased, keepdim)
        unbiased = _cval(args[2]) if len(args) > 2 else _cval(kwargs.get("unbiased", True))
        corr = 1 if unbiased else 0
        keep = bool(_cval(args[3]) if len(args) > 3 else _cval(kwargs.get("keepdim", False)))
    v = node.args[0].meta.get("val")
    if v is None:
        raise _Unsupported
    shape = v.shape
    rdims = range(len(shape)) if dims is None else [d % len(shape) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    count = 1
    for d in rdims:
        if not isinstance(shape[d], int):
            raise _Unsupported
        count *= shape[d]
    dims_l = list(rdims)
    B = ctx.b
    base = ctx.base
    d = B.linear(u, lambda c, name: B.call(aten.sub.Tensor, (c, B.call(aten.mean.dim, (c, dims_l, True), name=name + "_mean")), name=name), base + "_centered")
    sq = B.square(d, base + "_sq")
    factor = count / max(count - corr, 1e-300) if count - corr > 0 else float("nan")
    return B.linear(sq, lambda c, name: B.scale(B.call(aten.mean.dim, (c, dims_l, keep), name=name), factor, name), base)


def rule_where(ctx, node, args, kwargs):
    cond, a, b = args[0], args[1], args[2]
    if _is_series(cond) and (cond[0] is None or cond.nonzero(1)):
        raise _Unsupported
    B = ctx.b
    cc = cond[0] if _is_series(cond) else _cval(cond)  # a piecewise-constant condition (isnan(x)): its value
    out = [B.call(node.target, (cc, a[0] if _is_series(a) else _cval(a), b[0] if _is_series(b) else _cval(b)), name=B.cname(ctx.base, 0))]
    for j in range(1, ctx.k + 1):
        aj = a[j] if _is_series(a) else None
        bj = b[j] if _is_series(b) else None
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
        if _is_series(a):
            if a[0] is None:
                raise _Unsupported
            return a[0]
        if isinstance(a, (list, tuple)):
            return type(a)(at0(e) for e in a)
        return _cval(a)

    B = ctx.b
    value = B.call(node.target, tuple(at0(a) for a in args), {key: at0(v) for key, v in kwargs.items()},
                   name=B.cname(ctx.base, 0))
    return Series([value] + [None] * ctx.k)


def rule_masked_fill(ctx, node, args, kwargs):
    a, mask, value = args[0], args[1], args[2]
    if _is_series(mask) or _is_series(value) or not _is_series(a):
        raise _Unsupported
    B = ctx.b
    mc, vc = _cval(mask), _cval(value)
    zero = 0.0 if node.target == aten.masked_fill.Scalar else None

    def fn(c, name):
        if zero is None:
            return B.call(aten.masked_fill.Scalar, (c, mc, 0.0), name=name)
        return B.call(node.target, (c, mc, zero), name=name)

    return B.linear(a, fn, ctx.base, c0=lambda c, name: B.call(node.target, (c, mc, vc), name=name))


def rule_constant_pad(ctx, node, args, kwargs):
    a = args[0]
    pad = _cval(args[1])
    value = _cval(args[2]) if len(args) > 2 else 0.0
    B = ctx.b
    return B.linear(a, lambda c, name: B.call(node.target, (c, pad, 0.0), name=name), ctx.base,
                    c0=lambda c, name: B.call(node.target, (c, pad, value), name=name))


# -- selections: piecewise smooth, the choice is made at the center --------------------------------
#
# topk, sort, max/min along a dim and amax/amin select entries of their input. Which entries is
# piecewise constant in x: the jet keeps the center's choice (indices from c_0) and carries every
# coefficient through the same gather; the remainder of an expansion absorbs what changes when
# the variate selects otherwise (mixture-of-experts routing, max-pooling, …).


def _select_values(ctx, u: Series, idx, dim, keepdim=True):
    B = ctx.b

    def fn(c, name):
        out = B.call(aten.gather.default, (c, dim, idx), name=name)
        return out if keepdim else B.call(aten.squeeze.dim, (out, dim), name=name)

    return Series([None] + [None if c is None else fn(c, B.cname(ctx.base, j)) for j, c in enumerate(u.cs) if j > 0])


def rule_topk(ctx, node, args, kwargs):  # topk(x, k, dim=-1, largest=True, sorted=True) / sort(x, dim, descending)
    u = args[0]
    if not _is_series(u) or any(_is_series(a) for a in args[1:]):
        raise _Unsupported
    B = ctx.b
    rest = tuple(_cval(a) for a in args[1:])
    kw = {key: _cval(v) for key, v in kwargs.items()}
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
    u = args[0]
    if not _is_series(u) or any(_is_series(a) for a in args[1:]):
        raise _Unsupported
    B = ctx.b
    dim = _cval(args[1]) if len(args) > 1 else _cval(kwargs.get("dim"))
    keep = bool(_cval(args[2]) if len(args) > 2 else _cval(kwargs.get("keepdim", False)))
    pair = B.call(node.target, (u[0], dim, True), name=ctx.base + "_center")
    idx = B.call(operator.getitem, (pair, 1), name=ctx.base + "_index")
    values = _select_values(ctx, u, idx, dim, keepdim=keep)
    v0 = B.call(operator.getitem, (pair, 0), name=B.cname(ctx.base, 0))
    values.cs[0] = v0 if keep else B.call(aten.squeeze.dim, (v0, dim), name=B.cname(ctx.base, 0))
    out_idx = idx if keep else B.call(aten.squeeze.dim, (idx, dim), name=ctx.base + "_index")
    return Parts([values, Const(out_idx)])


def rule_amax(ctx, node, args, kwargs):  # amax(x, dim=[], keepdim=False) along one dim
    u = args[0]
    dims = _cval(args[1]) if len(args) > 1 else _cval(kwargs.get("dim", []))
    keep = bool(_cval(args[2]) if len(args) > 2 else _cval(kwargs.get("keepdim", False)))
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not _is_series(u) or len(dims) != 1:
        raise _Unsupported
    B = ctx.b
    pick = aten.argmax.default if "amax" in str(node.target) else aten.argmin.default
    idx = B.call(pick, (u[0], dims[0], True), name=ctx.base + "_index")
    values = _select_values(ctx, u, idx, dims[0], keepdim=keep)
    values.cs[0] = B.call(node.target, (u[0], *[_cval(a) for a in args[1:]]), {k_: _cval(v) for k_, v in kwargs.items()},
                          name=B.cname(ctx.base, 0))
    return values


def rule_identity(ctx, node, args, kwargs):
    return args[0]


def rule_cast(ctx, node, args, kwargs):
    return rule_linear_first(ctx, node, args, kwargs)


def rule_sdpa(ctx, node, args, kwargs):
    raise _Unsupported  # decomposed by passes.decompose before jets; otherwise fall back


def rule_getitem(ctx, node, args, kwargs):
    u, i = args
    B = ctx.b
    pieces = B.stacks.get(("pieces", *u.cs))
    if pieces is not None and isinstance(i, int):
        piece = B.call(operator.getitem, (pieces, i), name=ctx.base + "_stacked")
        return B.from_stack(piece, u.nonzero(), len(u.cs), ctx.base)
    return B.linear(u, lambda c, name: B.call(operator.getitem, (c, i), name=name), ctx.base)


def rule_multi_out_linear(ctx, node, args, kwargs):
    """split/chunk/unbind: each coefficient a tuple node; a None coefficient stays None."""
    return rule_linear_first(ctx, node, args, kwargs)


def rule_rms_norm(ctx, node, args, kwargs):
    u = args[0]
    shape = _cval(args[1])
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    eps = _cval(args[3]) if len(args) > 3 else _cval(kwargs.get("eps"))
    if eps is None:
        v = node.args[0].meta.get("val")
        eps = torch.finfo(v.dtype).eps if v is not None else 1e-6
    if _is_series(weight):
        raise _Unsupported
    B = ctx.b
    base = ctx.base
    dims = list(range(-len(shape), 0))
    sq = B.square(u, base + "_sq")
    ms = B.linear(sq, lambda c, name: B.call(aten.mean.dim, (c, dims, True), name=name), base + "_ms")
    r = B.pow(B.shift(ms, eps, base + "_eps"), -0.5, base + "_rsqrt")
    out = B.cauchy(u, r, base + ("_normed" if weight is not None else ""))
    if weight is not None:
        wc = _cval(weight)
        out = B.linear(out, lambda c, name: B.call(aten.mul.Tensor, (c, wc), name=name), base)
    return out


def rule_layer_norm(ctx, node, args, kwargs):
    u = args[0]
    shape = _cval(args[1])
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    eps = _cval(args[4]) if len(args) > 4 else _cval(kwargs.get("eps", 1e-5))
    if _is_series(weight) or _is_series(bias):
        raise _Unsupported
    B = ctx.b
    base = ctx.base
    dims = list(range(-len(shape), 0))
    d = B.linear(u, lambda c, name: B.call(aten.sub.Tensor, (c, B.call(aten.mean.dim, (c, dims, True), name=name + "_mean")), name=name), base + "_centered")
    var = B.linear(B.square(d, base + "_sq"), lambda c, name: B.call(aten.mean.dim, (c, dims, True), name=name), base + "_var")
    r = B.pow(B.shift(var, eps, base + "_eps"), -0.5, base + "_rstd")
    out = B.cauchy(d, r, base + "_normed")
    if weight is not None:
        wc = _cval(weight)
        out = B.linear(out, lambda c, name: B.call(aten.mul.Tensor, (c, wc), name=name), base + "_scaled")
    if bias is not None:
        out = B.shift(out, _cval(bias), base)
    return out


# ops linear in their first argument
_LINEAR_FIRST = [
    "view", "_unsafe_view", "reshape", "transpose", "permute", "t", "slice", "select", "unsqueeze", "squeeze",
    "expand", "clone", "contiguous", "alias", "neg", "sum", "mean", "flatten", "unflatten", "repeat_interleave",
    "repeat", "narrow", "roll", "flip", "index_select", "gather", "index", "split", "split_with_sizes", "chunk",
    "unbind", "tril", "triu", "diagonal", "movedim", "swapaxes", "transpose_copy", "view_copy", "expand_copy",
    "permute_copy", "squeeze_copy", "unsqueeze_copy", "slice_copy", "select_copy", "lift_fresh_copy", "detach_",
    "_to_copy", "to", "type_as", "as_strided", "cumsum", "trace", "view_as_real", "view_as_complex",
]

RULES: dict = {}


def _register(names, rule):
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            RULES[packet] = rule


_register(_LINEAR_FIRST, rule_linear_first)
_register(["slice_scatter", "select_scatter", "copy", "diagonal_scatter"], _joint_linear(0, 1))
RULES[aten.index_put.default] = _joint_linear(0, 2)
RULES[aten.conv1d.default] = rule_convolution
RULES[aten.convolution.default] = rule_convolution
RULES[aten.view.default] = rule_view
RULES[aten._unsafe_view.default] = rule_view
_register(["cat", "stack", "hstack", "vstack", "concat", "concatenate"], rule_linear_list)
_register(["add"], rule_add)
_register(["sub"], rule_sub)
_register(["rsub"], rule_rsub)
_register(["mul"], rule_mul)
_register(["div"], rule_div)
_register(["mm", "bmm", "matmul", "einsum_placeholder", "outer", "dot", "vdot", "mv", "baddbmm_placeholder"], rule_bilinear)
_register(["linear"], rule_linear)
_register(["addmm"], rule_addmm)
_register(["exp"], rule_exp)
_register(["log"], rule_log)
_register(["pow"], rule_pow)
_register(["rsqrt"], _pow_rule(-0.5))
_register(["sqrt"], _pow_rule(0.5))
_register(["reciprocal"], rule_reciprocal)
_register(["tanh"], rule_tanh)
_register(["sigmoid"], rule_sigmoid)
_register(["erf"], rule_erf)
_register(["gelu"], rule_gelu)
_register(["silu"], rule_silu)
_register(["mish"], rule_mish)
_register(["softplus"], rule_softplus)
_register(["softmax", "_softmax", "special_softmax"], rule_softmax)
_register(["log_softmax", "_log_softmax"], rule_log_softmax)
_register(["var"], rule_var)
_register(["where"], rule_where)
_register(["isnan", "isinf", "isfinite", "isposinf", "isneginf", "eq", "ne", "gt", "ge", "lt", "le", "logical_not",
           "logical_and", "logical_or", "logical_xor", "argmax", "argmin"], rule_piecewise_constant)
_register(["masked_fill"], rule_masked_fill)
_register(["constant_pad_nd"], rule_constant_pad)
_register(["detach"], rule_identity)  # detach in an inference graph only cuts autograd
_register(["topk", "sort"], rule_topk)
RULES[aten.max.dim] = rule_max_dim
RULES[aten.min.dim] = rule_max_dim
_register(["amax", "amin"], rule_amax)
_register(["rms_norm"], rule_rms_norm)
_register(["layer_norm"], rule_layer_norm)
RULES[operator.getitem] = rule_getitem
# grouped expert products (passes.decompose.grouped_mm): linear in the routed rows, offsets constant
RULES[grouped_mm] = rule_linear_first
# `aten.embedding(weight, ids)`: ids never depend on x and weights are parameters, so it is a
# constant; if the weight depended on x it would be linear in it:
RULES[aten.embedding] = rule_linear_first


def supported_ops() -> list[str]:
    return sorted(str(p) for p in RULES)


def _rule_for(target):
    rule = RULES.get(target)
    if rule is not None:
        return rule
    packet = getattr(target, "overloadpacket", None)
    return RULES.get(packet) if packet is not None else None


# --------------------------------------------------------------------------------------------
# fallback: nested forward AD for one op


def _fallback_coefficients(op, k: int, spec, *flat):
    """Coefficients of t ↦ op(args(t)) where each dependent tensor argument is Σ_j c_j t^j.

    `spec` rebuilds (args, kwargs) from `flat`: a tuple of ("const", i) / ("series", i0, n)
    entries; series coefficients that are None are zero.
    """
    args_spec, kwargs_spec = spec

    def poly(cs, t):
        acc = None
        for j, c in enumerate(cs):
            if c is None:
                continue
            term = c if j == 0 else c * t**j
            acc = term if acc is None else acc + term
        return acc

    def build(t):
        def one(s):
            if s[0] == "const":
                return flat[s[1]]
            if s[0] == "series":
                return poly(flat[s[1]:s[1] + s[2]], t)
            if s[0] == "list":
                return [one(e) for e in s[1]]
            return s[1]

        return [one(s) for s in args_spec], {key: one(s) for key, s in kwargs_spec}

    def f(t):
        a, kw = build(t)
        return op(*a, **kw)

    ref = next((c for c in flat if isinstance(c, torch.Tensor) and c.is_floating_point()), None)
    if ref is None:
        raise ExpansionError(f"{op} has no floating input to take a Taylor expansion in")
    t0 = torch.zeros((), dtype=ref.dtype, device=ref.device)
    from ..jets import _derivatives

    derivs = _derivatives(f, t0, k)
    return tuple(d / math.factorial(j) for j, d in enumerate(derivs))


class _Method:
    """A Tensor method call (`call_method` node) as a function, for the fallback."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, obj, *args, **kwargs):
        return getattr(obj, self.name)(*args, **kwargs)

    def __repr__(self):
        return f"Tensor.{self.name}"


def _emit_fallback(ctx: Ctx, node, args, kwargs):
    flat: list = []

    def spec_of(a):
        if _is_series(a):
            i0 = len(flat)
            flat.extend(a.cs)
            return ("series", i0, len(a.cs))
        if isinstance(a, (list, tuple)):
            return ("list", [spec_of(e) for e in a])
        v = _cval(a)
        if isinstance(v, fx.Node):
            flat.append(v)
            return ("const", len(flat) - 1)
        return ("lit", v)

    spec = ([spec_of(a) for a in args], tuple((key, spec_of(v)) for key, v in kwargs.items()))
    B = ctx.b
    op = node.target if node.op == "call_function" else _Method(node.target)
    out = B.call(_fallback_coefficients, (op, ctx.k, spec, *flat), name=ctx.base + "_fallback")
    return Series([B.call(operator.getitem, (out, j), name=B.cname(ctx.base, j)) for j in range(ctx.k + 1)])


# --------------------------------------------------------------------------------------------
# the pass


def _dependent_nodes(graph: fx.Graph, x: fx.Node) -> set:
    from .dependence import value_dependent

    return value_dependent(graph, x)


def taylor_graph_module(region: fx.GraphModule, k: int, strict: bool = False, direction: bool = False):
    """The Taylor-mode GraphModule of `region`: forward(x, y, *side) → (c_0, …, c_k).

    With `direction=True` the second input is the direction v itself, forward(x, v, *side), the
    coefficients of t ↦ f(x + t·v): mixed derivatives (`jetfx.passes.mixed`) need arbitrary
    directions, and forming y = x + v only to subtract x again would cost precision.
    Returns (graph_module, fallback_ops): the ops computed by nested-AD fallback.
    """
    k = check_order(k)
    src = region.graph
    placeholders = [n for n in src.nodes if n.op == "placeholder"]
    if not placeholders:
        raise ExpansionError("the region has no input placeholder")
    x_src = placeholders[0]
    dep = _dependent_nodes(src, x_src)

    g = fx.Graph()
    B = Builder(g, k)
    env: dict[fx.Node, object] = {}
    x0 = g.placeholder("x")
    y = g.placeholder("v" if direction else "y")
    for p in placeholders[1:]:
        ph = g.placeholder(p.name)
        ph.meta = dict(p.meta)
        env[p] = Const(ph)
    x_c0 = x0
    x_c1 = y if direction else B.call(aten.sub.Tensor, (y, x0), name="x_c1")
    env[x_src] = Series([x_c0, x_c1] + [None] * (k - 1)) if k >= 1 else Series([x_c0])
    fallback: list[str] = []

    def as_const_arg(a):
        """Argument for a constant node: series → their zeroth coefficient."""
        v = env[a]
        if isinstance(v, Series):
            return v[0]
        if isinstance(v, Parts):
            raise ExpansionError(f"'{a.name}' ({a.target}{_where(a)}) is used as a whole tuple; jetfx jets "
                                 "can only read its elements")
        return v.value

    for node in src.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            if fallback and strict:
                break
            result = env[node.args[0]] if isinstance(node.args[0], fx.Node) else Const(node.args[0])
            if isinstance(result, Const):
                c0 = result.value
                cs = [c0] + [B.call(aten.zeros_like.default, (c0,), name=B.cname("out", j)) for j in range(1, k + 1)]
            else:
                c0 = result[0]
                cs = [result[j] if result[j] is not None else B.call(aten.zeros_like.default, (c0,), name=B.cname("out", j)) for j in range(k + 1)]
            g.output(tuple(cs))
            break
        if node.op == "get_attr":
            new = g.get_attr(node.target)
            new.meta = dict(node.meta)
            env[node] = Const(new)
            continue
        if node not in dep or node.op not in ("call_function", "call_method"):
            new = g.node_copy(node, as_const_arg)
            env[node] = Const(new)
            continue
        if node.target is operator.getitem and isinstance(env.get(node.args[0]), Parts):
            env[node] = env[node.args[0]].items[node.args[1]]
            continue
        if _piecewise_constant(node):  # routing indices, masks, comparisons: taken at the center
            new = g.node_copy(node, as_const_arg)
            env[node] = Const(new)
            continue
        unwrap = lambda a: env[a] if isinstance(env[a], (Series, Parts)) else env[a].value  # noqa: E731
        args = fx.node.map_arg(node.args, unwrap)
        kwargs = fx.node.map_arg(node.kwargs, unwrap)
        if not _series_args(args, kwargs):
            new = g.node_copy(node, as_const_arg)
            env[node] = Const(new)
            continue
        rule = _rule_for(node.target) if node.op == "call_function" else None
        ctx = Ctx(B, node)
        result = None
        if rule is not None:
            try:
                result = rule(ctx, node, args, kwargs)
            except _Unsupported:
                result = None
            except Exception as e:  # noqa: BLE001 - a rule that cannot handle these arguments
                raise ExpansionError(
                    f"the Taylor-mode rule for {node.target} (node '{node.name}'{_where(node)}) failed: "
                    f"{type(e).__name__}: {e}; use jets='nested' for this model") from e
        if result is None and any(isinstance(env.get(a), Parts) for a in node.all_input_nodes):
            raise ExpansionError(f"{node.target} (node '{node.name}'{_where(node)}) reads a multi-output value "
                                 "as a whole; jetfx jets cannot go through it")
        if result is None:
            fallback.append(str(node.target) if node.op == "call_function" else f"Tensor.{node.target}")
            if strict:
                env[node] = Series([None] * (k + 1))
                continue
            result = _emit_fallback(ctx, node, args, kwargs)
        env[node] = result

    if fallback and strict:
        names = sorted(set(fallback))
        raise ExpansionError(
            f"no Taylor-mode rule for {', '.join(names)}; use strict=False to compute these ops by "
            "nested forward AD, or jets='nested' for the whole expansion"
        )
    try:
        gm = fx.GraphModule(region, g, class_name="TaylorJetGraph")
        gm.graph.eliminate_dead_code()
        gm.recompile()
    except Exception as e:  # noqa: BLE001 - generated code that does not compile is jetfx's bug, said clearly
        raise ExpansionError(f"the Taylor-mode graph of this block could not be generated ({type(e).__name__}: "
                             f"{e}); ops without rules: {', '.join(sorted(set(fallback))) or 'none'}. "
                             "Use jets='nested' for this model") from e
    return gm, sorted(set(fallback))


# Ops whose value is piecewise constant in their floating inputs (zero derivative almost everywhere).
PIECEWISE_CONSTANT = {aten.sign.default, aten.floor.default, aten.ceil.default, aten.round.default,
                      aten.trunc.default, aten.heaviside.default}


def _piecewise_constant(node: fx.Node) -> bool:
    """Integer or boolean outputs (indices, masks, comparisons) and step functions: their jets are
    their value at the center. The jet of a routed computation thus keeps the center's routing."""
    if node.op == "call_function" and node.target in PIECEWISE_CONSTANT:
        return True
    v = node.meta.get("val")
    values = v if isinstance(v, (tuple, list)) else (v,)
    tensors = [t for t in values if isinstance(t, torch.Tensor)]
    return bool(tensors) and len(tensors) == len(values) and not any(t.is_floating_point() or t.is_complex() for t in tensors)


def _where(node: fx.Node) -> str:
    from ._graph import module_path

    path = module_path(node)
    return f", in module {path}" if path else ""


from ..jets import clear_errors  # noqa: E402 - jets imports this module lazily


class TaylorJet(torch.nn.Module):
    """Jets of a region `f(x, *side)` at a batch of centers, by Taylor mode.

    forward(centers, variate, *side, coefficients=False): `centers` has a leading dimension N.
    Returns J^k f(center_i)(variate) stacked over i, or the coefficients as (k+1, N, …).
    `graph_module` is the generated Taylor graph: forward(x, y, *side) → (c_0, …, c_k) for one
    center x.
    """

    def __init__(self, region: fx.GraphModule, k: int, strict: bool = False, coefficients: bool = False,
                 direction: bool = False):
        super().__init__()
        self.k = check_order(k)
        self.coefficients = coefficients
        self.direction = direction  # True: forward's second input is the direction v, not the variate y
        gm, fallback = taylor_graph_module(region, self.k, strict=strict, direction=direction)
        self.graph_module = gm
        self.fallback_ops = fallback
        self._jetfx_loop = data_dependent(gm)  # routed experts: one center at a time
        self.batched = BatchedGraph(gm, owner=self)  # gm over the centers: vmap, then a graph traced once
        self.block_name = getattr(region, "block_name", None)
        if fallback:
            warnings.warn(
                f"Taylor-mode jets: no rule for {', '.join(fallback)}; these ops are computed by "
                "nested forward AD (slower, exact)",
                stacklevel=2,
            )

    @clear_errors("Taylor-mode jets")
    def forward(self, centers: torch.Tensor, variate: torch.Tensor, *side, coefficients: bool | None = None):
        coefficients = self.coefficients if coefficients is None else coefficients
        cs = list(self.batched(centers, variate, *side))
        if coefficients:
            return torch.stack(cs)
        out = cs[0]
        for c in cs[1:]:
            out = out + c
        return out
