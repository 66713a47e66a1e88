"""The nested-AD fall-back: an op without a Taylor rule, computed by nested forward AD alone.

`nested_derivatives` is also the reference implementation's core (`jetfx.jets` imports it from
here, so that this package never imports `jetfx.jets`): k nested `torch.func.jvp` calls in one
scalar t, O(2^k) evaluations, exact.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import fx

from ...errors import ExpansionError
from .builder import Ctx
from .series import Series, cval, is_series


def nested_derivatives(g: Callable[[torch.Tensor], torch.Tensor], t0: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """(g(t0), g'(t0), …, g^(k)(t0)) by k nested jvps (`jetfx.jets` re-exports it as `_derivatives`)."""

    def make(n: int):
        if n == 0:
            return lambda t: (g(t),)
        prev = make(n - 1)

        def h(t):
            primal, tangent = torch.func.jvp(prev, (t,), (torch.ones_like(t),))
            return (*primal, tangent[-1])

        return h

    return make(k)(t0)


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
    derivs = nested_derivatives(f, t0, k)
    return tuple(d / math.factorial(j) for j, d in enumerate(derivs))


class _Method:
    """A Tensor method call (`call_method` node) as a function, for the fallback."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, obj, *args, **kwargs):
        """getattr(obj, name)(*args, **kwargs)."""
        return getattr(obj, self.name)(*args, **kwargs)

    def __repr__(self):
        return f"Tensor.{self.name}"


def emit_fallback(ctx: Ctx, node, args, kwargs):
    """One `_fallback_coefficients` node computing the op's k + 1 coefficients from the
    coefficients of its arguments, and a getitem per coefficient: the Series of the op."""
    flat: list = []

    def spec_of(a):
        if is_series(a):
            i0 = len(flat)
            flat.extend(a.cs)
            return ("series", i0, len(a.cs))
        if isinstance(a, (list, tuple)):
            return ("list", [spec_of(e) for e in a])
        v = cval(a)
        if isinstance(v, fx.Node):
            flat.append(v)
            return ("const", len(flat) - 1)
        return ("lit", v)

    spec = ([spec_of(a) for a in args], tuple((key, spec_of(v)) for key, v in kwargs.items()))
    B = ctx.b
    op = node.target if node.op == "call_function" else _Method(node.target)
    out = B.call(_fallback_coefficients, (op, ctx.k, spec, *flat), name=ctx.base + "_fallback")
    return Series([B.call(operator.getitem, (out, j), name=B.cname(ctx.base, j)) for j in range(ctx.k + 1)])
