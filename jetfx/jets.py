"""Jets by nested forward-mode AD: the reference implementation.

For a smooth f, center x and variate y (v = y − x), the k-jet is the truncated Taylor polynomial

    J^k f(x)(y) = Σ_{j=0..k} c_j,   c_j = (1/j!) dʲ/dtʲ f(x + t·v) at t = 0.

Here the c_j come from k nested `torch.func.jvp` calls in the scalar t, which costs O(2^k)
evaluations of f. The Taylor-mode compiler pass (`jetfx.passes.taylor`) computes the same
coefficients in O(k²) and is what expansions use by default; these functions stay as the reference
it is tested against, and as the fallback for ops without a Taylor rule.

`jet_coefficients_double_backward` is the method of the paper authors' code (nested
`torch.autograd.functional.jvp`, the double-backward trick); it is kept for benchmarks.

`expand_function(f, centers, variate, k)` is Algorithm 1 for any Python callable of a tensor (what
the authors' `jex.jet_expand` offers): f is traced once per input shape by torch.export and its
jets taken by the Taylor-mode pass; where f cannot be traced, by nested forward AD.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .constraints import check_weights
from .errors import ExpansionError, check_order
from .passes.batching import BatchedGraph
from .passes.taylor import clear_errors  # jet modules' error wrapping, shared with the pass
from .passes.taylor import nested_derivatives as _derivatives  # the reference's nested jvps, shared with the fall-back


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

    @clear_errors("nested-AD jets")
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
        self.batched = BatchedGraph(region, owner=self)

    @clear_errors("evaluation at the centers")
    def forward(self, centers: torch.Tensor, variate: torch.Tensor, *side):
        return self.batched(centers, *side)


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


# ---------------------------------------------------------------------------------------------
# Algorithm 1 for any callable


@dataclass
class FunctionExpansion:
    """Algorithm 1 applied to a callable f: `terms` (N, …) are w_i · J^k f(x_i)(y), `remainder` is
    f(y) − Σ terms (exact), `value` is f(y). `method`: "taylor" (f traced, Taylor mode) or
    "nested" (f could not be traced: nested forward AD)."""

    terms: torch.Tensor
    remainder: torch.Tensor
    value: torch.Tensor
    weights: torch.Tensor
    method: str

    def __iter__(self):  # (ξ, δ) unpacking, as jet_expand
        return iter((self.terms, self.remainder))


class FunctionExpander(torch.nn.Module):
    """Algorithm 1 for a callable f with function-valued centers and variate: `expander(*z)`
    evaluates the centers c_i(*z) and the variate v(*z) (tensors may stand for constants), then
    expands f around them; returns a FunctionExpansion. Made by `expand_function`."""

    def __init__(self, f, centers, variate, k: int, weights=None, *, recenter: bool = True,
                 constraint: str = "simplex", method: str = "auto"):
        super().__init__()
        self.f, self.centers, self.variate = f, list(centers), variate
        self.k, self.weights, self.recenter, self.constraint, self.method = k, weights, recenter, constraint, method

    def forward(self, *z) -> FunctionExpansion:
        def value(c):
            return c(*z) if callable(c) else c

        return _expand_function(self.f, [value(c) for c in self.centers], value(self.variate), self.k, self.weights,
                                recenter=self.recenter, constraint=self.constraint, method=self.method)


def expand_function(f: Callable[[torch.Tensor], torch.Tensor], centers, variate, k: int, weights=None, *,
                    recenter: bool = True, constraint: str = "simplex", method: str = "auto"):
    """Algorithm 1 for any callable f of one tensor: terms w_i · J^k f(x_i)(y) and the exact remainder.

    `centers`: a list of tensors shaped like `variate` (or one tensor stacking them, (N, …));
    `weights`: one per center, uniform by default, on the simplex or (`constraint="affine"`) summing
    to 1; a tensor that requires grad makes the terms differentiable in it. `recenter=False` takes
    the variate as the direction (terms w_i·Σ_j D^j f(x_i)[y,…,y]/j!, see `jetfx.jet_expand`).
    `method`: "auto" (trace f with torch.export and use the Taylor-mode pass; fall back to nested
    forward AD where f cannot be traced), "taylor" (no fallback) or "nested".

    With callables among the centers or as the variate (function-valued centers, as in jex), the
    result is a `FunctionExpander`: call it with the inputs z of those functions.

        ex = expand_function(torch.tanh, [x1, x2], x1 + x2, k=2)
        ex.terms.sum(0) + ex.remainder == torch.tanh(x1 + x2)
    """
    if not callable(f):
        raise ExpansionError(f"expand_function needs a callable f, got {type(f).__name__}")
    if isinstance(centers, torch.Tensor):
        centers = list(centers.unbind(0))
    centers = list(centers)
    if any(callable(c) for c in centers) or callable(variate):
        return FunctionExpander(f, centers, variate, k, weights, recenter=recenter, constraint=constraint, method=method)
    return _expand_function(f, centers, variate, k, weights, recenter=recenter, constraint=constraint, method=method)


def _expand_function(f, centers, variate, k, weights, *, recenter, constraint, method) -> FunctionExpansion:
    k = check_order(k)
    if method not in ("auto", "taylor", "nested"):
        raise ExpansionError(f"unknown jet method {method!r}: use 'auto', 'taylor' or 'nested'")
    if not centers:
        raise ExpansionError("expand_function needs at least one center")
    if not isinstance(variate, torch.Tensor) or not variate.is_floating_point():
        raise ExpansionError(f"the variate must be a floating tensor, got {type(variate).__name__}")
    for c in centers:
        if not isinstance(c, torch.Tensor) or c.shape != variate.shape:
            shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ExpansionError(f"every center must be a tensor shaped like the variate {tuple(variate.shape)}, "
                                 f"got {shape}")
    n = len(centers)
    w_floats = check_weights(weights, n, constraint)
    w = weights if isinstance(weights, torch.Tensor) else torch.tensor(w_floats, dtype=variate.dtype)
    stacked = torch.stack([c.to(variate.dtype) for c in centers])
    module, used = _function_jet(f, variate, k, recenter, method)
    jets = module(stacked, variate)
    terms = w.to(jets.dtype).view(-1, *([1] * (jets.dim() - 1))) * jets
    value = f(variate)
    return FunctionExpansion(terms, value - terms.sum(0), value, w, used)


def _function_jet(f, example: torch.Tensor, k: int, recenter: bool, method: str):
    """(a jet module forward(centers, variate), the method used) for f at inputs shaped like
    `example`; traced modules are cached on f per shape, dtype and device."""
    key = (tuple(example.shape), example.dtype, example.device, k, recenter, method)
    cache = _FUNCTION_JETS.setdefault(f, {}) if _weakrefable(f) else {}
    if key not in cache:
        cache[key] = _build_function_jet(f, example, k, recenter, method)
    return cache[key]


def _build_function_jet(f, example, k, recenter, method):
    if method in ("auto", "taylor"):
        try:
            region = _trace_function(f, example)
        except Exception as e:  # noqa: BLE001 - any tracing failure means: not traceable
            if method == "taylor":
                raise ExpansionError(f"f could not be traced by torch.export ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:300]}); use method='nested' or 'auto'") from None
        else:
            return jet_module(region, k, "taylor", recenter=recenter), "taylor"
    return _CallableJet(f, k, recenter), "nested"


def _trace_function(f, example: torch.Tensor) -> torch.fx.GraphModule:
    """f as an ATen GraphModule region f(x), fused ops decomposed for jets."""
    import contextlib
    import io
    import logging
    import warnings

    from .passes.cleanup import clean
    from .passes.decompose import decompose_for_jets

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f = f if isinstance(f, torch.nn.Module) else None

        def forward(self, x):
            return f(x)

    loggers = [logging.getLogger(name) for name in ("torch.fx.experimental.symbolic_shapes", "torch._dynamo",
                                                      "torch.export", "torch._export", "torch.fx")]
    levels = [lg.level for lg in loggers]
    try:  # an untraceable f is an expected outcome here (we fall back): keep torch's reports of it quiet
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.export.export(Wrapper(), (example.detach(),), strict=False)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    gm = program.module()
    for node in list(gm.graph.nodes):  # shape guards: the jets' inputs are vmapped copies of x
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    clean(gm)
    graph = torch.fx.Graph()  # a plain graph f(x) -> tensor, without export's pytree calling convention
    outputs = graph.graph_copy(gm.graph, {})
    flat = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    if len(flat) != 1 or not isinstance(flat[0], torch.fx.Node):
        raise ExpansionError("f must return one tensor")
    graph.output(flat[0])
    region = torch.fx.GraphModule(gm, graph, class_name="Function")
    decompose_for_jets(region)
    return region


class _CallableJet(torch.nn.Module):
    """Nested forward AD for a callable that could not be traced: forward(centers, variate)."""

    def __init__(self, f, k: int, recenter: bool):
        super().__init__()
        self.f, self.k, self.recenter = f, k, recenter

    def forward(self, centers, variate):
        return torch.stack([jet(self.f, x, variate, self.k, self.recenter) for x in centers.unbind(0)])


def _weakrefable(f) -> bool:
    try:
        weakref.ref(f)
    except TypeError:
        return False
    return True


_FUNCTION_JETS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
