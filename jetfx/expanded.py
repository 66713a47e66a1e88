"""The compiled expansion: an ordinary GraphModule whose output is every path's logits + remainder."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import fx

from .errors import ExactnessWarning, InputError


@dataclass
class ExpansionOutput:
    """Path logits and the exact remainder: Σ paths + remainder = the model's logits."""

    names: tuple[str, ...]
    stacked: torch.Tensor  # (paths, batch, seq, vocab), in the order of `names`
    remainder: torch.Tensor  # (batch, seq, vocab)
    logits: torch.Tensor  # the model's own logits (batch, seq, vocab)

    @property
    def paths(self) -> dict[str, torch.Tensor]:
        return {n: self.stacked[i] for i, n in enumerate(self.names)}

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.stacked[self.names.index(name)]
        except ValueError:
            raise KeyError(f"no path named {name!r}; paths are {', '.join(self.names[:6])}…") from None

    def total(self) -> torch.Tensor:
        """Σ paths + remainder (equals `logits` up to rounding)."""
        return self.stacked.sum(0) + self.remainder

    def max_error(self) -> float:
        """max |Σ paths + remainder − logits|: the exactness of the rewriting."""
        return float((self.total() - self.logits).abs().max())

    def relative_error(self) -> float:
        """max |Σ paths + remainder − logits| / max(1, max |logits|) (nan if any term is not finite)."""
        with torch.no_grad():
            err = (self.total() - self.logits).abs().max()
            return float(err / self.logits.abs().max().clamp(min=1))

    def check(self) -> float:
        """Warn (ExactnessWarning) when the identity fails beyond the dtype's rounding; returns the relative error.

        The remainder is computed as logits − Σ paths, so the identity only fails by rounding: when the
        path terms are far larger than the logits (high-order jets outside their radius of convergence)
        or not finite. Tolerance: √eps of the dtype (3.5e-4 in float32, 1.5e-8 in float64).
        """
        rel = self.relative_error()
        tol = exactness_tolerance(self.logits.dtype)
        if not rel <= tol:  # also catches nan
            with torch.no_grad():
                biggest = float(self.stacked.abs().amax()) if self.stacked.numel() else 0.0
            warnings.warn(
                f"the expansion is not exact in {str(self.logits.dtype).replace('torch.', '')}: "
                f"max |Σ paths + remainder − logits| is {rel:.3g} of the logits' scale (tolerance {tol:.1e}); "
                f"the path terms reach {biggest:.3g}, so their sum loses the logits to rounding. Use a lower order k, "
                "or trace in float64: jetfx.trace(model, tokens, dtype=torch.float64)", ExactnessWarning, stacklevel=3)
        return rel


def exactness_tolerance(dtype: torch.dtype) -> float:
    """Largest relative error of Σ paths + remainder that rounding in `dtype` explains: √eps."""
    return float(torch.finfo(dtype).eps) ** 0.5 if dtype.is_floating_point else 0.0


class ExpandedModule(fx.GraphModule):
    """A jet expansion compiled into one GraphModule.

    `ex(tokens)` returns an `ExpansionOutput`; `ex.forward(tokens)` (what hooks and exporters see)
    returns the plain tuple (stacked path logits, remainder, logits). It moves with `.to()`,
    prints its code with `print(ex.code)`, and keeps what it was built from: `ex.path_names`,
    `ex.structure`, `ex.path_graph`, `ex.terms` (the symbolic plan), `ex.k`.
    """

    path_names: tuple[str, ...]

    def __call__(self, tokens, *args, **kwargs):
        from .tracing import as_tokens, check_padding

        if not isinstance(tokens, torch.Tensor):
            tokens = as_tokens(tokens, getattr(self, "tokenizer", None))
        elif getattr(self, "tokenizer", None) is not None and tokens.device.type != "meta":
            check_padding(tokens, self.tokenizer)
        raw = super().__call__(tokens, *args, **kwargs)
        if not isinstance(raw, tuple) or len(raw) != 3:
            raise InputError("the expanded module returned an unexpected value (was its graph edited?)")
        out = ExpansionOutput(self.path_names, *raw)
        if getattr(self, "check_exactness", True):
            out.check()
        return out

    def symbolic(self, **kw):
        """The expansion as a sympy expression (see jetfx.symbolic.symbolic_view)."""
        from .symbolic import symbolic_view

        return symbolic_view(self, **kw)

    def render(self, path: str | None = None, **kw) -> str:
        """SVG of the path graph with this module's paths highlighted; written to `path` if given."""
        from .pictures import render_path_graph

        graph = getattr(self, "split_graph", None) or self.path_graph  # split expansions: carry + interaction edges
        svg = render_path_graph(graph, selected=self.selected, **kw)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(svg)
        return svg
