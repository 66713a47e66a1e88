"""The compiled expansion: an ordinary GraphModule whose output is every path's logits + remainder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .errors import InputError


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


class ExpandedModule(fx.GraphModule):
    """A jet expansion compiled into one GraphModule.

    `ex(tokens)` returns an `ExpansionOutput`; `ex.forward(tokens)` (what hooks and exporters see)
    returns the plain tuple (stacked path logits, remainder, logits). It moves with `.to()`,
    prints its code with `print(ex.code)`, and keeps what it was built from: `ex.path_names`,
    `ex.structure`, `ex.path_graph`, `ex.terms` (the symbolic plan), `ex.k`.

    Jet weights are buffers, one vector per site (`ex.jet_weights`: {"step1": …, "decoder": …});
    `ex(tokens, weights={...})` runs with other weights (differentiably), `ex.set_jet_weights`
    keeps them (see `jetfx.weights`).
    """

    path_names: tuple[str, ...]
    weight_sites: tuple = ()

    def __call__(self, tokens, *args, weights: dict | None = None, **kwargs):
        if not isinstance(tokens, torch.Tensor):
            from .tracing import as_tokens

            tokens = as_tokens(tokens, getattr(self, "tokenizer", None))
        if weights is not None:
            from .weights import weight_overrides

            overrides = weight_overrides(self, weights)
            return torch.func.functional_call(self, overrides, (tokens, *args), kwargs, strict=False)
        raw = super().__call__(tokens, *args, **kwargs)
        if not isinstance(raw, tuple) or len(raw) != 3:
            raise InputError("the expanded module returned an unexpected value (was its graph edited?)")
        return ExpansionOutput(self.path_names, *raw)

    @property
    def jet_weights(self) -> dict[str, torch.Tensor]:
        """{site: weights} ("step1", …, "decoder"), one per center of the site; see `jetfx.weights`."""
        return {site.name: self.get_buffer(site.target) for site in self.weight_sites}

    def set_jet_weights(self, weights: dict, constraint: str = "simplex") -> None:
        """Keep these weights ({site: tensor or numbers}): a tensor is kept as it is, so when it requires
        grad, gradients of later outputs reach it. Checked against `constraint` ("simplex"/"affine")."""
        from .weights import weight_overrides

        for target, value in weight_overrides(self, weights, constraint).items():
            old = self.get_buffer(target)
            if isinstance(value, torch.Tensor) and value.device != old.device:
                raise InputError(f"weights for {target!r} are on {value.device}, the module on {old.device}")
            owner, _, leaf = target.rpartition(".")
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=old.dtype)
            self.get_submodule(owner).register_buffer(leaf, value)

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
