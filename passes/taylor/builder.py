"""The graph builder: coefficient algebra that emits the nodes of a Taylor graph.

`Builder` works on single coefficients (a node, or None for a known zero) and on whole `Series`:
sums, scalings, Cauchy products, maps of linear ops one coefficient at a time or on a stack of all
of them (so a weight is read once for every coefficient). Rules (the family modules) call it;
`Ctx` is what a rule receives besides the node and its mapped arguments.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

from .._graph import aten
from .series import Series, add_to_first, cat_coefficient_rows, stack_coefficients


class Builder:
    """Emits the nodes of a Taylor graph of order `k` into `graph`, one coefficient at a time."""

    def __init__(self, graph: fx.Graph, k: int):
        self.g = graph
        self.k = k
        # series whose nonzero coefficients are also one stacked node (leading dimension), so
        # that later linear ops can act on all of them in one call: coefficients → stack node
        self.stacks: dict[tuple, fx.Node] = {}

    def stack_of(self, a: Series):
        """The stacked node of a series' nonzero coefficients, if it has one."""
        return self.stacks.get(tuple(a.cs)) if isinstance(a, Series) else None

    def from_stack(self, stack, js, length: int, base: str) -> Series:
        """The series whose nonzero coefficients j in `js` are stack[i] (selects, unused ones
        vanish with dead code), remembered as stacked."""
        out: list = [None] * length
        for i, j in enumerate(js):
            out[j] = self.call(aten.select.int, (stack, 0, i), name=self.cname(base, j))
        self.stacks[tuple(out)] = stack
        return Series(out)

    def call(self, target, args, kwargs=None, name=None):
        """Emit a call_function node."""
        node = self.g.create_node("call_function", target, tuple(args), dict(kwargs or {}), name=name)
        return node

    @staticmethod
    def cname(base, j):
        """The node name of coefficient j of a value named `base`: `base_c{j}`."""
        return f"{base}_c{j}"

    def add(self, a, b, name):
        """a + b for coefficients (None is zero)."""
        if a is None:
            return b
        if b is None:
            return a
        return self.call(aten.add.Tensor, (a, b), name=name)

    def sub(self, a, b, name):
        """a − b for coefficients (None is zero)."""
        if b is None:
            return a
        if a is None:
            return self.call(aten.neg.default, (b,), name=name)
        return self.call(aten.sub.Tensor, (a, b), name=name)

    def scale(self, a, s, name):
        """s·a for a coefficient and a Python number (no node for s = 1 or a zero)."""
        if a is None or s == 0:
            return None
        if s == 1:
            return a
        return self.call(aten.mul.Tensor, (a, s), name=name)

    def scale_series(self, a: Series, s, base: str) -> Series:
        """s·a for a series and a Python number, coefficient by coefficient."""
        return Series([self.scale(c, s, self.cname(base, j)) for j, c in enumerate(a.cs)])

    def mul(self, a, b, name):
        """a·b for coefficients (None when either is zero)."""
        if a is None or b is None:
            return None
        return self.call(aten.mul.Tensor, (a, b), name=name)

    def total(self, terms, name):
        """The sum of coefficients, zeros skipped (None when all are zero)."""
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
        """(a²)_n = Σ_{i+j=n} a_i a_j with each off-diagonal pair computed once and doubled."""
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


class Ctx:
    """What a rule receives besides the node and its mapped arguments: the builder and the node's name."""
    def __init__(self, builder: Builder, node: fx.Node):
        self.b = builder
        self.node = node
        self.base = node.name

    @property
    def k(self):
        """The order of the Taylor graph."""
        return self.b.k
