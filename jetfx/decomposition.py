"""The residual stream as a sum of per-block parts: TransformerLens's `decompose_resid` and
`accumulated_resid`, read off the graph of any traced model.

Algorithm 1 at every step s, around the single center h_s (the true stream) with k = 0 and weight 1,
gives ξ = {h_s} ∪ {γ_b(h_s) : b in step s} with remainder 0; unrolled from h_0 = η:

    h_L = η + Σ_b γ_b(h_{s(b)})

— the per-block decomposition of the final stream that TransformerLens builds from its hook
points (`decompose_resid`: embed + pos_embed, then every attention and MLP output). Here the parts
are computed by jetfx's compiled jets, for any residual network jetfx can trace, and the remainder
h_L − Σ parts is returned so that exactness can be checked (it is rounding only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .step_expansion import jet_expand, stream
from .paths import ENCODER
from .terms import Concat, Remainder, Stream
from .tracing import as_tokens, info_of, residual_of


@dataclass
class ResidDecomposition:
    """`parts[i]` (labels[i]: "embed" or a block name) sum to the final stream `stream` up to `remainder`."""

    labels: tuple[str, ...]
    parts: torch.Tensor  # (1 + blocks, *stream shape), in the order of `labels`
    remainder: torch.Tensor  # h_L − Σ parts: rounding only
    steps: tuple[int, ...]  # number of blocks of each residual step

    def __getitem__(self, label: str) -> torch.Tensor:
        try:
            return self.parts[self.labels.index(label)]
        except ValueError:
            raise KeyError(f"no part named {label!r}; parts are {', '.join(self.labels[:6])}…") from None

    @property
    def stream(self) -> torch.Tensor:
        """Σ parts + remainder: the final stream h_L (the decoder's input)."""
        return self.parts.sum(0) + self.remainder

    def accumulated(self) -> torch.Tensor:
        """h_0, h_1, …, h_L stacked (TransformerLens's `accumulated_resid(incl_mid=True)` for a
        sequential model): running sums of the parts, step by step."""
        rows = [self.parts[0]]
        i = 1
        for n in self.steps:
            rows.append(rows[-1] + self.parts[i:i + n].sum(0))
            i += n
        return torch.stack(rows)


def decompose_resid(gm: fx.GraphModule, inputs, *, jets: str = "auto") -> ResidDecomposition:
    """The final stream of `gm` (made by `jetfx.trace`) at `inputs`, split into its encoder and
    block parts by k = 0 jets around the true stream at every step (see the module docstring)."""
    structure = residual_of(gm)
    parts = [Stream(0)]
    for s in range(len(structure.steps)):
        xi = jet_expand(gm, s, stream(gm, s), k=0)  # ξ = {h_s, γ_b(h_s)…}, δ = 0
        parts.append(xi.terms[1:])  # the block terms γ_b(h_s); h_s itself is the previous parts' sum
    terms = Concat(tuple(parts))
    from .passes.materialize import compile_terms

    module = compile_terms(gm, terms, Remainder(Stream(len(structure.steps)), terms), jets=jets)
    info = info_of(gm)
    if info.input_kind == "tokens":
        from .functions import device_of

        inputs = as_tokens(inputs, info.tokenizer, vocab_size=info.embedding_size or info.vocab_size,
                           max_length=info.max_length).to(device_of(gm))
    with torch.no_grad():
        stacked, remainder = module(inputs)
    labels = (ENCODER,) + tuple(b.name for b in structure.blocks)
    return ResidDecomposition(labels, stacked, remainder[0], tuple(len(s.blocks) for s in structure.steps))
