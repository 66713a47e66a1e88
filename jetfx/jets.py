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

import functools
import math
from collections.abc import Callable

import torch

from .errors import ExpansionError, JetfxError, check_order
from .passes.batching import map_centers


def clear_errors(what: str):
    """Decorator for a jet module's forward: an error from torch inside it becomes an ExpansionError
    that names the block (`region.block_name`) instead of a stack trace from generated code."""

    def wrap(forward):
        @functools.wraps(forward)
        def run(self, *args, **kwargs):
            try:
                return forward(self, *args, **kwargs)
            except JetfxError:
                raise
            except (RuntimeError, AttributeError, AssertionError, StopIteration, TypeError, IndexError,
                    ValueError, NotImplementedError) as e:
                name = getattr(self, "block_name", None) or getattr(getattr(self, "region", None), "block_name", None)
                text = " ".join(str(e).split())[:300]
                raise ExpansionError(f"{what} of {name or 'a block'} failed: {type(e).__name__}: {text}. "
                                     "jets='nested' computes them by nested forward AD instead") from e

        return run

    return wrap


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


def jet_coefficients(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Normalized Taylor coefficients c_0…c_k of t ↦ f(x + t(y − x)) at t = 0 (nested jvp)."""
    k = check_order(k)
    v = y - x
    t0 = torch.zeros((), dtype=x.dtype, device=x.device)
    derivs = _derivatives(lambda t: f(x + t * v), t0, k)
    return [d / math.factorial(j) for j, d in enumerate(derivs)]


def jet(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """J^k f(x)(y): the k-th order Taylor polynomial of f at x, evaluated at y."""
    return sum(jet_coefficients(f, x, y, k))


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

    def __init__(self, region: torch.nn.Module, k: int, coefficients: bool = False):
        super().__init__()
        self.region = region
        self.k = check_order(k)
        self.coefficients = coefficients

    @clear_errors("nested-AD jets")
    def forward(self, centers: torch.Tensor, variate: torch.Tensor, *side):
        def f(x):
            return self.region(x, *side)

        def one(x):
            cs = jet_coefficients(f, x, variate, self.k)
            return torch.stack(cs) if self.coefficients else sum(cs)

        # a loop, not vmap: nested forward AD under vmap has gaps (silu_backward has no
        # forward derivative), and the reference should depend on as little as possible
        out = torch.stack([one(x) for x in centers.unbind(0)])
        return out.movedim(1, 0) if self.coefficients else out


def _routes(region) -> bool:
    from .passes.decompose import data_dependent

    return isinstance(region, torch.fx.GraphModule) and data_dependent(region)


class Evaluate(torch.nn.Module):
    """J^0 f(x) = f(x) at a batch of centers (the variate plays no role at order 0)."""

    k = 0

    def __init__(self, region: torch.nn.Module):
        super().__init__()
        self.region = region
        self._jetfx_loop = _routes(region)

    @clear_errors("evaluation at the centers")
    def forward(self, centers: torch.Tensor, variate: torch.Tensor, *side):
        return map_centers(lambda x: self.region(x, *side), centers, owner=self)


def jet_module(region: torch.nn.Module, k: int, method: str = "auto") -> torch.nn.Module:
    """A module computing J^k f at a batch of centers: forward(centers, variate, *side).

    `method`: "taylor" (the Taylor-mode compiler pass), "nested" (nested forward AD, the
    reference) or "auto" (Taylor mode when available). Built once per region, order and method
    (compiling the Taylor graph is not free) and kept on the region module.
    """
    k = check_order(k)
    cache = region.__dict__.setdefault("_jetfx_jet_modules", {})
    if (k, method) not in cache:
        cache[(k, method)] = _build_jet_module(region, k, method)
    return cache[(k, method)]


def _build_jet_module(region: torch.nn.Module, k: int, method: str) -> torch.nn.Module:
    if k == 0:
        return Evaluate(region)
    if method in ("auto", "taylor"):
        try:
            from .passes.taylor import TaylorJet
        except ImportError:
            if method == "taylor":
                raise
        else:
            return TaylorJet(region, k)
    if method in ("auto", "nested"):
        return NestedJet(region, k)
    from .errors import ExpansionError

    raise ExpansionError(f"unknown jet method {method!r}: use 'auto', 'taylor' or 'nested'")
