"""`TaylorJet`, the module face of the pass, and `clear_errors`, the error wrapping that every jet
module's forward shares (Taylor, nested and mixed jets alike)."""

from __future__ import annotations

import functools
import warnings

import torch
from torch import fx

from ...errors import ExpansionError, JetfxError, check_order
from ..batching import BatchedGraph
from ..decompose import data_dependent
from .interpreter import taylor_graph_module


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
        """J^k f(center_i)(variate) stacked over i, or its coefficients (k+1, N, …)."""
        coefficients = self.coefficients if coefficients is None else coefficients
        cs = list(self.batched(centers, variate, *side))
        if coefficients:
            return torch.stack(cs)
        out = cs[0]
        for c in cs[1:]:
            out = out + c
        return out
