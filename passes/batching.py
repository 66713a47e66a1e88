"""Map a function over a leading batch of centers: `vmap`, a traced batched graph, or a loop.

Jets evaluate a region at N centers at once. `torch.func.vmap` does that, but on the small
blocks of a jet (9 tokens: tens of microseconds per op) its per-op cost is a large share of the
time: every op goes through the batching rules, at every call. `BatchedGraph` pays that once:
the mapped function is traced through vmap (`make_fx`) into a plain ATen graph with the center
dimension in every tensor, identity views are dropped, and later calls with the same input
signature run that graph (once vmap has cost about as much as tracing: see `BatchedGraph`).

A Python loop over the centers replaces vmap where vmap cannot be used:

- under torch.export vmap's batching rules ask for concrete sizes (aten.cat's, for one), which
  specializes the exported program to the example's batch and length. While exporting, the N
  centers (a static count) are mapped by a loop, which export traces into N copies of the region
  with dynamic batch and sequence sizes;
- mixture-of-experts routing has data-dependent shapes (each center routes its own rows), which
  vmap cannot batch. The loop is taken then, and `owner` remembers it so vmap is not tried again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import fx

from ._graph import aten
from .peephole import peephole


def map_centers(fn: Callable, *batched: torch.Tensor, owner=None):
    """fn applied to every row of the tensors in `batched` (leading dimensions equal), results stacked.

    `fn` returns a tensor or a tuple of tensors; so does `map_centers`. `owner` (a module) records
    in `_jetfx_loop` that vmap failed on it, or starts with it set where routing is known.
    """
    exporting = torch.compiler.is_exporting()
    if not exporting and (owner is None or not owner.__dict__.get("_jetfx_loop", False)):
        try:
            return torch.func.vmap(fn)(*batched)
        except Exception:  # noqa: BLE001 - vmap has no batching rule for some op; the loop needs none
            if owner is not None:
                owner.__dict__["_jetfx_loop"] = True
    rows = [fn(*row) for row in zip(*(b.unbind(0) for b in batched))]
    if isinstance(rows[0], (tuple, list)):
        return type(rows[0])(torch.stack(parts) for parts in zip(*rows))
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------
# a graph traced once through vmap


def _signature(values) -> tuple | None:
    """What a traced graph is specialized on: shapes, strides, dtypes and devices of the tensors,
    the values of everything else. None when a value cannot be keyed (then nothing is cached)."""
    key = []
    for v in values:
        if isinstance(v, torch.Tensor):
            key.append(("T", tuple(v.shape), v.stride(), v.dtype, v.device))
        elif v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
            key.append((type(v).__name__, v))
        else:
            return None
    return tuple(key)


_RESHAPES = {aten.view.default, aten._unsafe_view.default}


def _is_view(node: fx.Node) -> bool:
    """An ATen op whose result aliases its first argument (view, permute, slice, expand, …)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if target in _RESHAPES:  # _unsafe_view: a view that autograd does not track as one
        return True
    schema = target._schema
    if len(schema.returns) != 1 or not schema.arguments:
        return False
    ret, first = schema.returns[0].alias_info, schema.arguments[0].alias_info
    return ret is not None and not ret.is_write and first is not None and ret.before_set == first.before_set


def drop_identity_views(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop views whose result has the input's shape, strides and offset, and shorten chains of
    reshapes of a contiguous tensor to one.

    make_fx of a vmapped graph is full of them (a matmul's batching rule reshapes to 3-D and back,
    a permute by the identity, the region's views written for one center); each costs a dispatch.
    """
    def meta(n):
        v = n.meta.get("val") if isinstance(n, fx.Node) else None
        return v if isinstance(v, torch.Tensor) else None

    if any(isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable for n in gm.graph.nodes):
        return gm  # in-place ops: aliasing matters, leave the graph as traced
    for node in list(gm.graph.nodes):
        if not _is_view(node) or not isinstance(node.args[0], fx.Node):
            continue
        src, out, inp = node.args[0], meta(node), meta(node.args[0])
        if out is None or inp is None:
            continue
        if (out.shape == inp.shape and out.stride() == inp.stride() and out.dtype == inp.dtype
                and out.storage_offset() == inp.storage_offset()):
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
        elif node.target in _RESHAPES and src.op == "call_function" and src.target in _RESHAPES:
            first = meta(src.args[0])
            if first is not None and first.is_contiguous() and out.is_contiguous():
                node.args = (src.args[0], *node.args[1:])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def trace_batched(module: torch.nn.Module, centers: torch.Tensor, *shared) -> fx.GraphModule:
    """`module(x, *shared)` mapped over the rows x of `centers`, as one traced ATen graph.

    The graph is called as graph(params, centers, *shared), `params` the module's named parameters
    and buffers, so it reads the module's current weights (not copies taken at trace time). It is
    specialized on the shapes, strides, dtypes and devices it was traced with, and on the values
    of non-tensor inputs.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    def mapped(params, centers, *shared):
        def one(x):
            out = torch.func.functional_call(module, params, (x, *shared))
            return tuple(out) if isinstance(out, (tuple, list)) else out

        return torch.func.vmap(one)(centers)

    with torch.no_grad():
        gm = make_fx(mapped)(_params(module), centers, *shared)
    return peephole(drop_identity_views(gm))


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to rounding (a batched matmul may sum in another order); NaN and ±inf where `want` has them."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if not want.is_floating_point():
        return torch.equal(got, want)
    finite = want.isfinite()
    scale = float(want[finite].abs().max()) if bool(finite.any()) else 0.0
    tol = 64 * torch.finfo(want.dtype).eps * max(scale, 1e-30)
    close = (got - want).abs() <= tol
    return bool((close | (got == want) | (got.isnan() & want.isnan())).all())


def _params(module: torch.nn.Module) -> dict:
    return {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}


class BatchedGraph:
    """Calls `module(x, *shared)` for every row x of `centers`, results stacked (a tuple when the
    module returns one).

    Calls map by vmap until the time they took with an input signature reaches the estimated cost
    of tracing (`trace_batched`, about `TRACE_S_PER_NODE` per node of the module's graph): then
    that signature is traced once and its later calls run the traced graph. So one-off calls (an
    iterative lens visits each block once) pay no tracing, and repeated calls never pay more than
    twice what tracing first would have cost; `trace(centers, *shared)` traces at once (a
    benchmark, or a loop known to be long). While exporting, or when an input requires grad, calls
    map by `map_centers` (the traced graph is only ever used for inference).
    """

    TRACE_S_PER_NODE = 1e-3  # tracing cost per node of the module's graph, in seconds (measured: 0.5–3 ms)
    MAX_GRAPHS = 8  # signatures kept (oldest dropped)

    def __init__(self, module: torch.nn.Module, owner: torch.nn.Module | None = None):
        self.module, self.owner = module, owner  # owner: the jet module that records routing (map_centers)
        self.graphs: dict = {}
        self.spent: dict = {}  # seconds spent by vmap, per signature not traced yet
        graph = getattr(module, "graph", None)
        nodes = sum(1 for n in graph.nodes if n.op == "call_function") if isinstance(graph, fx.Graph) else 200
        self.trace_estimate_s = self.TRACE_S_PER_NODE * max(nodes, 1)

    def trace(self, centers: torch.Tensor, *shared) -> BatchedGraph:
        """Trace the graph for this input signature now (if it can be): later calls run it."""
        key = self._key(centers, shared, _params(self.module))
        if key is not None and key not in self.graphs:
            with torch.no_grad():
                self._store(key, self._trace(centers, shared, self._plain(centers, shared), _params(self.module)))
        return self

    def _plain(self, centers, shared):
        module = self.module
        if centers.shape[0] == 1 and not torch.compiler.is_exporting():
            out = module(centers[0], *shared)
            if isinstance(out, (tuple, list)):
                return tuple(o.unsqueeze(0) for o in out)
            return out.unsqueeze(0)
        return map_centers(lambda x: module(x, *shared), centers, owner=self.owner)

    def _key(self, centers, shared, params):
        looping = self.owner is not None and self.owner.__dict__.get("_jetfx_loop", False)
        if looping or torch.compiler.is_exporting() or (torch.is_grad_enabled() and (
                centers.requires_grad or any(isinstance(s, torch.Tensor) and s.requires_grad for s in shared)
                or any(p.requires_grad for p in params.values()))):
            return None
        return _signature((centers, *shared, *params.values()))

    def _store(self, key, graph):
        if len(self.graphs) >= self.MAX_GRAPHS:
            self.graphs.pop(next(iter(self.graphs)))
        self.graphs[key] = graph  # None: not traceable, this signature stays on vmap
        self.spent.pop(key, None)

    def __call__(self, centers: torch.Tensor, *shared):
        params = _params(self.module)
        key = self._key(centers, shared, params)
        if key is None:
            return self._plain(centers, shared)
        if key in self.graphs:
            graph = self.graphs[key]
            return self._plain(centers, shared) if graph is None else graph(params, centers, *shared)
        spent = self.spent.get(key, 0.0)
        if spent < self.trace_estimate_s:
            t = time.perf_counter()
            out = self._plain(centers, shared)
            self.spent[key] = spent + time.perf_counter() - t
            return out
        want = self._plain(centers, shared)
        self._store(key, self._trace(centers, shared, want, params))
        return want

    def _trace(self, centers, shared, want, params):
        """The traced graph, if tracing works and it reproduces `want` (what vmap gave) to rounding."""
        try:
            graph = trace_batched(self.module, centers, *shared)
            got = graph(params, centers, *shared)
        except Exception:  # an op vmap runs but make_fx cannot trace: keep vmap
            return None
        gots = tuple(got) if isinstance(got, (tuple, list)) else (got,)
        wants = want if isinstance(want, tuple) else (want,)
        if len(gots) != len(wants) or not all(_same(g, w) for g, w in zip(gots, wants)):
            return None
        return graph
