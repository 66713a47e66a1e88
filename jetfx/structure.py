"""The residual structure of a traced model: encoder, residual steps with their blocks, decoder.

It is what residual analysis (`jetfx.passes.residual`) finds in a graph, and what every expansion
is built on. It refers to graph nodes by name, so it stays valid for copies of the graph.

Notation (DESIGN.md §1): h_0 = η(z) is the encoder output; step s reads the stream node h_s and
adds the outputs of its blocks: h_{s+1} = h_s + Σ_b γ_b(h_s). Sequential transformers have one
block per step (attention, then MLP); parallel-residual ones (GPT-NeoX, GPT-J) have two blocks
reading the same h_s. The decoder is υ = U ∘ γ_{L+1}, from the last stream node to the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


# attn: attention; mlp: a feed-forward block; moe: routed experts (with shared experts and dense
# fall-backs); mixer: token mixing without softmax attention (state-space scans, convolutions,
# linear attention); other: anything else
BLOCK_KINDS = ("attn", "mlp", "moe", "mixer", "other")


@dataclass(frozen=True)
class Block:
    """One residual branch γ_b: a subgraph from a stream node to a summand of the next one."""

    name: str  # short readable name, e.g. "h.3.attn" or "layers.3.mlp"
    qualname: str  # full module path in the model, e.g. "transformer.h.3.attn"
    kind: str  # one of BLOCK_KINDS
    index: int  # position among all blocks, 0-based
    step: int  # the residual step whose stream node the block reads
    input: str  # FX node name of the stream node h_step (the block's input)
    output: str  # FX node name of the block's output γ_b(h_step)
    nodes: tuple[str, ...] = field(repr=False)  # FX node names of the block's own subgraph
    linear: bool = field(default=False, repr=False)  # γ_b is linear in its input (no bias)

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"


@dataclass(frozen=True)
class Step:
    """A residual step: h_{s+1} = h_s + Σ of the outputs of its blocks."""

    index: int
    input: str  # stream node h_s
    output: str  # the residual add producing h_{s+1}
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Encoder:
    """η: tokens → h_0 (token embedding, maybe plus positions)."""

    input: str  # the token placeholder
    output: str  # h_0
    nodes: tuple[str, ...] = field(repr=False)
    linear: bool = field(default=False, repr=False)  # a plain embedding lookup (linear in one-hot z)


@dataclass(frozen=True)
class Decoder:
    """υ = U ∘ γ_{L+1}: last stream node → logits."""

    input: str  # h_S, the last stream node
    output: str  # the logits node
    nodes: tuple[str, ...] = field(repr=False)
    has_norm: bool  # γ_{L+1} is not the identity (a final layer/RMS norm)
    unembedding: str | None  # parameter target of U, if the decoder ends in a linear map
    norm_output: str | None = None  # node name of γ_{L+1}(h) when U could be split off


@dataclass(frozen=True)
class ResidualStructure:
    encoder: Encoder
    steps: tuple[Step, ...]
    decoder: Decoder
    side_inputs: tuple[str, ...] = field(default=(), repr=False)
    rewrites: tuple[str, ...] = field(default=(), repr=False)  # what passes.residual_form changed

    @property
    def blocks(self) -> tuple[Block, ...]:
        return tuple(b for s in self.steps for b in s.blocks)

    @property
    def stream(self) -> tuple[str, ...]:
        """Node names of the stream h_0, …, h_S (h_S is the decoder's input)."""
        return tuple(s.input for s in self.steps) + (self.decoder.input,)

    @property
    def num_blocks(self) -> int:
        return sum(len(s.blocks) for s in self.steps)

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name or b.qualname == name:
                return b
        names = ", ".join(b.name for b in self.blocks[:8])
        more = "…" if self.num_blocks > 8 else ""
        from .errors import ExpansionError

        raise ExpansionError(f"no block named {name!r}; blocks are {names}{more}")

    @property
    def num_paths(self) -> int:
        """Paths of the exponential expansion: Π_s (1 + blocks in step s); 2^L when sequential."""
        return math.prod(1 + len(s.blocks) for s in self.steps)

    def __str__(self) -> str:
        kinds = {}
        for b in self.blocks:
            kinds[b.kind] = kinds.get(b.kind, 0) + 1
        kind_text = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        parallel = any(len(s.blocks) > 1 for s in self.steps)
        lines = [
            f"ResidualStructure: {self.num_blocks} blocks ({kind_text}) in {len(self.steps)} steps"
            + (" (parallel residual)" if parallel else ""),
            f"  encoder  {self.encoder.input} -> h_0 [{self.encoder.output}]",
        ]
        for s in self.steps:
            names = " + ".join(str(b) for b in s.blocks)
            lines.append(f"  step {s.index:<3} h_{s.index} [{s.input}] -> {names}")
        norm = "final norm, then " if self.decoder.has_norm else "no final norm, "
        unemb = f"unembedding {self.decoder.unembedding}" if self.decoder.unembedding else "no linear unembedding"
        lines.append(f"  decoder  h_{len(self.steps)} [{self.decoder.input}] -> logits ({norm}{unemb})")
        count = self.num_paths
        exp = "2^%d" % self.num_blocks if count == 2**self.num_blocks else "prod(1+blocks per step)"
        lines.append(f"  exponential expansion: {count} paths ({exp})")
        if self.rewrites:
            lines.append(f"  rewritten into residual form ({len(self.rewrites)}): {self.rewrites[0]}"
                         + (" …" if len(self.rewrites) > 1 else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:  # printing the structure should read well in a REPL too
        return self.__str__()
