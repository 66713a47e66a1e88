"""Jets by nested forward-mode AD: the reference implementation.

For a smooth f, center x and variate y (v = y − x), the k-jet is the truncated Taylor polynomial

    J^k f(x)(y) = Σ_{j=0..k} c_j,   c_j = (1/j!) dʲ/dtʲ f(x + t·v) at t = 0.

Here the c_j come from k nested `torch.func.jvp` calls in the scalar t, which costs O(2^k)
evaluations of f. The Taylor-mode compiler pass (`jetfx.passes.taylor`) computes the same
coefficients in O(k²) and is what expansions use by default; these functions stay as the reference
it is tested against, and as the fallback for ops without a Taylor rule.

`jet_coefficients_double_backward` is the method of the paper authors' code (nested
`torch.autograd.functional.jvp`, the double-backward trick); it is kept for benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import check_order


def _derivatives(g: Callable[[torch.Tensor], torch.Tensor], t0: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """(g(t0), g'(t0), …, g^(k)(t0)) by k nested jvps."""

    def make(n: int):
        if n == 0:
            return lambda t: (g(t),)
        prev = make(n - 1)

        def h(t):
            primal, tangent = torch.func.jvp(prev, (t,), (torch.ones_like(t),))
            return (*primal, tangent[-1])

        return h

    return make(k)(t0)


def jet_coefficients(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, k: int,
                     recenter: bool = True) -> list[torch.Tensor]:
    """Normalized Taylor coefficients c_0…c_k of t ↦ f(x + t(y − x)) at t = 0 (nested jvp);
    with `recenter=False` of t ↦ f(x + t·y): the variate is the direction."""
    k = check_order(k)
    v = y - x if recenter else y
    t0 = torch.zeros((), dtype=x.dtype, device=x.device)
    derivs = _derivatives(lambda t: f(x + t * v), t0, k)
    return [d / math.factorial(j) for j, d in enumerate(derivs)]


def jet(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, k: int,
        recenter: bool = True) -> torch.Tensor:
    """J^k f(x)(y): the k-th order Taylor polynomial of f at x, evaluated at y (`recenter=False`:
    at x + y, i.e. the polynomial in the direction y, expanded around y = 0)."""
    return sum(jet_coefficients(f, x, y, k, recenter))


def jet_coefficients_double_backward(f, x: torch.Tensor, y: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The same coefficients by nested `torch.autograd.functional.jvp` (double-backward trick)."""
    k = check_order(k)
    v = y - x
    t0 = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)

    def g(t):
        return f(x + t * v)

    funcs = [g]
    for _ in range(k):
        prev = funcs[-1]

        def nxt(t, prev=prev):
            return torch.autograd.functional.jvp(prev, t, torch.ones_like(t), create_graph=True)[1]

        funcs.append(nxt)
    with torch.enable_grad():
        return [fn(t0).detach() / math.factorial(j) for j, fn in enumerate(funcs)]


class NestedJet(torch.nn.Module):
    """Jets of a region `f(x, *side)` at a batch of centers, by nested forward-mode AD.

    forward(centers, variate, *side): `centers` has a leading dimension N (one center per row),
    `variate` is shared. Returns J^k f(center_i)(variate) stacked over i, or, with
    `coefficients=True`, the coefficients stacked as (k+1, N, …).
    """

    def __init__(self, region: torch.nn.Module, k: int, coefficients: bool = False, recenter: bool = True):
        super().__init__()
        self.region = region
        self.k = check_order(k)
        self.coefficients = coefficients
        self.recenter = recenter

    def forward(self, centers: torch.Tensor, variate: torch.Tensor, *side):
        def f(x):
            return self.region(x, *side)

        def one(x):
            cs = jet_coefficients(f, x, variate, self.k, self.recenter)
            return torch.stack(cs) if self.coefficients else sum(cs)

        # a loop, not vmap: nested forward AD under vmap has gaps (silu_backward has no
        # forward derivative), and the reference should depend on as little as possible
        out = torch.stack([one(x) for x in centers.unbind(0)])
        return out.movedim(1, 0) if self.coefficients else out


class Evaluate(torch.nn.Module):
    """J^0 f(x) = f(x) at a batch of centers (the variate plays no role at order 0)."""

    k = 0

    def __init__(self, region: torch.nn.Module):
        super().__init__()
        self.region = region

    def forward(self, centers: torch.Tensor, variate: torch.Tensor, *side):
        return torch.func.vmap(lambda x: self.region(x, *side))(centers)


def jet_module(region: torch.nn.Module, k: int, method: str = "auto", recenter: bool = True) -> torch.nn.Module:
    """A module computing J^k f at a batch of centers: forward(centers, variate, *side).

    `method`: "taylor" (the Taylor-mode compiler pass), "nested" (nested forward AD, the
    reference) or "auto" (Taylor mode when available). `recenter=False`: the variate is the
    direction (jets of t ↦ f(x_i + t·y), the expansion of y ↦ f(x_i + y) around the origin).
    Built once per region, order, method and centering (compiling the Taylor graph is not free)
    and kept on the region module.
    """
    k = check_order(k)
    recenter = bool(recenter) or k == 0  # J^0 f(x) = f(x) either way
    cache = region.__dict__.setdefault("_jetfx_jet_modules", {})
    key = (k, method) if recenter else (k, method, "origin")
    if key not in cache:
        cache[key] = _build_jet_module(region, k, method, recenter)
    return cache[key]


def _build_jet_module(region: torch.nn.Module, k: int, method: str, recenter: bool = True) -> torch.nn.Module:
    if k == 0:
        return Evaluate(region)
    if method in ("auto", "taylor"):
        try:
            from .passes.taylor import TaylorJet
        except ImportError:
            if method == "taylor":
                raise
        else:
            return TaylorJet(region, k, direction=not recenter)
    if method in ("auto", "nested"):
        return NestedJet(region, k, recenter=recenter)
    from .errors import ExpansionError

    raise ExpansionError(f"unknown jet method {method!r}: use 'auto', 'taylor' or 'nested'")
