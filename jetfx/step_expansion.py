"""Algorithm 1 of the paper: one step (or the decoder) expanded around centers, as terms.

`jet_expand(gm, l, centers, k, weights)` expands step l (the blocks reading h_l; l counts from 0,
so the paper's "block l+1") or, for l = L (or "decoder"), the decoder:

    ξ = { w_i · J^k γ(x_i)(y) }            y: the true input of the step (h_l) or decoder (h_L)
    l < L:  ξ ∪= identity terms             k ≥ 1: the centers x_i;  k = 0: w_i · x_i
    δ = h_{l+1} − Σ ξ   (decoder: q − Σ ξ, in logit space)

Terms of one expansion are centers of the next, which is how expansions compose into
input-to-output paths: Algorithm 2 (`jetfx.expansion`) and the split expansion (`jetfx.split`)
are built from `_jet_expand`. Centers are made by `stream`, `branch`, `constant`. A
`JetExpansion` compiles or evaluates its terms (`jetfx.passes.materialize`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from .constraints import check_weights
from .errors import ExpansionError, check_order
from .functions import device_of
from .passes.materialize import compile_expansion, compile_terms
from .split_paths import check_split_degrees, split_name
from .structure import Block, ResidualStructure
from .terms import (LOGITS, STREAM, Branch, Concat, Constant, Jet, JetWeights, Logits, Remainder, Scaled, Select,
                    SplitJet, Stream, Terms, site_name)
from .tracing import as_tokens, info_of, residual_of

MAX_SPLIT_TERMS = 100_000


@dataclass(frozen=True)
class JetExpansion:
    """The result of `jet_expand`: the terms ξ and the exact remainder δ."""

    gm: fx.GraphModule
    terms: Terms
    remainder: Remainder

    def compile(self, jets: str = "auto"):
        """Compile the terms (which must be logits, i.e. expanded at the decoder) into a module.

        Its jet weights are buffers (`ex.jet_weights`); weights given as tensors that require grad
        are those buffers, so gradients of its outputs reach them."""
        return compile_expansion(self.gm, self.terms, jets=jets)

    def evaluate(self, tokens, jets: str = "auto"):
        """(stacked terms, remainder) at these tokens, in any space: stream terms of a block step too."""
        module = compile_terms(self.gm, self.terms, self.remainder, jets=jets)
        if not isinstance(tokens, torch.Tensor):
            tokens = as_tokens(tokens, info_of(self.gm).tokenizer).to(device_of(self.gm))
        return module(tokens)

    def __iter__(self):  # (ξ, δ) unpacking, as in the paper
        return iter((self.terms, self.remainder))


# ---------------------------------------------------------------------------------------------
# centers


def stream(gm: fx.GraphModule, index: int, name: str = "") -> Stream:
    """The stream node h_index as a center (h_0 = η, the encoder output, named "embed")."""
    structure = residual_of(gm)
    n = len(structure.steps)
    if isinstance(index, bool) or not isinstance(index, int) or not -n - 1 <= index <= n:
        raise ExpansionError(f"stream index {index!r} is out of range: the model has stream nodes h_0…h_{n}")
    return Stream(index % (n + 1), name)


def encoder(gm: fx.GraphModule) -> Stream:
    return stream(gm, 0)


def branch(gm: fx.GraphModule, block) -> Branch:
    """The model's own block output γ_b(h) as a center: a block name, index or `Block`."""
    structure = residual_of(gm)
    if isinstance(block, Block):
        return Branch(block)
    if isinstance(block, int) and not isinstance(block, bool):
        if not -structure.num_blocks <= block < structure.num_blocks:
            raise ExpansionError(f"block index {block} is out of range: the model has {structure.num_blocks} blocks")
        return Branch(structure.blocks[block])
    if isinstance(block, str):
        return Branch(structure.block(block))
    raise ExpansionError(f"a branch center takes a block name (e.g. {structure.blocks[0].name!r}), an index or a "
                         f"Block, got {type(block).__name__}")


def constant(gm: fx.GraphModule, value: torch.Tensor, names: Sequence[str] | str | None = None) -> Constant:
    """User-given center(s): a tensor (d,), (T, d), (B, T, d), or several stacked as (N, B, T, d)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ExpansionError(f"a constant center must be a floating tensor, got {type(value).__name__}")
    width = _stream_width(gm)
    if value.dim() == 0 or value.shape[-1] != width:
        raise ExpansionError(f"a center must have the stream's width {width} as last dimension, "
                             f"got a tensor of shape {tuple(value.shape)}")
    if value.dim() > 4:
        raise ExpansionError(f"a center has at most 4 dimensions (N, B, T, d), got shape {tuple(value.shape)}")
    stacked = value if value.dim() == 4 else value.unsqueeze(0)
    n = stacked.shape[0]
    if names is None:
        names = tuple(f"c{i}" for i in range(n)) if n > 1 else ("c",)
    elif isinstance(names, str):
        names = (names,)
    if len(names) != n:
        raise ExpansionError(f"{len(names)} names for {n} constant centers")
    return Constant(stacked.detach(), tuple(names))


def _stream_width(gm: fx.GraphModule) -> int:
    structure = residual_of(gm)
    node = next(n for n in gm.graph.nodes if n.name == structure.encoder.output)
    v = node.meta.get("val")
    return int(v.shape[-1])


def _as_terms(gm: fx.GraphModule, centers) -> Terms:
    if isinstance(centers, Terms):
        return centers
    if isinstance(centers, torch.Tensor):
        return constant(gm, centers)
    if isinstance(centers, (list, tuple)):
        if not centers:
            raise ExpansionError("jet_expand needs at least one center")
        parts = [_as_terms(gm, c) for c in centers]
        return parts[0] if len(parts) == 1 else Concat(tuple(parts))
    raise ExpansionError(f"centers must be Terms (jetfx.stream, jetfx.branch, earlier terms) or tensors, "
                         f"got {type(centers).__name__}")


def _site(structure: ResidualStructure, l) -> int | str:
    n = len(structure.steps)
    if l == "decoder" or (isinstance(l, int) and not isinstance(l, bool) and l == n):
        return "decoder"
    if isinstance(l, str):
        return structure.block(l).step
    if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n:
        raise ExpansionError(f"expansion site {l!r} is out of range: steps are 0…{n - 1} and {n} (or "
                             "'decoder') is the decoder")
    return l


# ---------------------------------------------------------------------------------------------
# Algorithm 1


def jet_expand(gm: fx.GraphModule, l, centers, k: int, weights=None, *, split: bool = False,
               degrees=None, max_terms: int = MAX_SPLIT_TERMS, constraint: str = "simplex",
               recenter: bool = True) -> JetExpansion:
    """Algorithm 1: expand step `l` (or the decoder, l = L) around `centers` with order `k`.

    `centers`: terms of an earlier expansion, `jetfx.stream(gm, i)`, `jetfx.branch(gm, name)`,
    tensors, or a list of these. `weights`: one per center, on the simplex (default uniform) or,
    with `constraint="affine"`, summing to 1. A 1-D tensor that requires grad makes the compiled
    expansion differentiable in it (`JetExpansion.compile`, `.evaluate`).

    `recenter=False` expands around the origin of the variate: each jet term is
    w_i·Σ_j D^j f(x_i)[y, …, y]/j!, the Taylor polynomial of y ↦ f(x_i + y) at y = 0, instead of
    w_i·J^k f(x_i)(y) (polynomial in y − x_i). Identity terms are unchanged (the centers, which sum to
    y exactly). The remainder is still exact, but no longer small as the centers approach y: the
    terms approximate f(x_i + y), not f(y) (docs/weights.md).

    `split=True` (k ≥ 1) splits every jet term w_i·J^k γ(x_i)(y) by degree d ≤ k and by the
    multiset of other centers that enter it: parts w_i·D^dγ(x_i)[x_o1…x_od]/(m_1!…m_s!) named
    "center>block[o1, o2]" ("center>decoder[…]" at the decoder; degree 0 keeps the unsplit
    name). `degrees` keeps only some degrees; what is left out goes to the remainder.
    """
    k = check_order(k)
    structure = residual_of(gm)
    site = _site(structure, l)
    c = _as_terms(gm, centers)
    if c.space != STREAM:
        raise ExpansionError("centers must be stream vectors (terms expanded at a block), not logits")
    w = check_weights(weights, len(c), constraint)
    tensor = weights if isinstance(weights, torch.Tensor) else None
    if tensor is not None and not tensor.is_floating_point():
        raise ExpansionError(f"jet weights must be a floating tensor, got dtype {tensor.dtype}")
    if not split:
        if degrees is not None:
            raise ExpansionError("degrees= selects parts of split jet terms: pass split=True as well")
        return _jet_expand(gm, structure, site, c, k, w, tensor=tensor, recenter=recenter)
    if not recenter:
        raise ExpansionError("recenter=False does not apply to split jets: a split part is taken along the other "
                             "centers, which sum to y − x_i; use recenter=True with split=True")
    kept = check_split_degrees(k, degrees)
    functions = (None,) if site == "decoder" else structure.steps[site].blocks
    n_parts = len(functions) * len(c) * sum(math.comb(len(c) - 2 + d, d) if d else 1 for d in kept)
    if n_parts > max_terms:
        raise ExpansionError(f"the split has {n_parts} parts ({len(c)} centers, degrees {list(kept)}), more than "
                             f"max_terms={max_terms}; keep fewer degrees (degrees=…), fewer centers, or raise max_terms")
    parts = split_parts(len(c), range(len(functions)), kept)
    return _jet_expand(gm, structure, site, c, k, w, split_parts=parts, tensor=tensor)


def split_parts(n: int, functions, degrees) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
    """Every (center i, function j, multiset of other centers) of the given degrees, grouped by j."""
    out = []
    for j in functions:
        for i in range(n):
            others = [o for o in range(n) if o != i]
            for d in degrees:
                out.extend((i, j, ms) for ms in itertools.combinations_with_replacement(others, d))
    return tuple(out)


def _jet_expand(gm, structure: ResidualStructure, site, c: Terms, k: int, w: tuple[float, ...],
                pairs=None, keep=None, split_parts=None, *, tensor=None, total=None, recenter: bool = True) -> JetExpansion:
    """Algorithm 1 without argument checks. `pairs` restricts which (center, block) jets are built
    and `keep` which identity terms are kept (to compile selected paths only); the remainder then
    contains what was left out. `split_parts` replaces the jets by these parts of their split.
    `tensor`: the weights as given (compiled modules use it); `total`: the number of centers that
    share the constraint in the whole expansion (default: these)."""
    symbols = tuple(f"w{site}_{i}" if site != "decoder" else f"ω_{i}" for i in range(len(c)))
    w = JetWeights(w, site=site_name(site), tensor=tensor, total=total, centers=c.names)
    if split_parts is not None:
        functions = (None,) if site == "decoder" else structure.steps[site].blocks
        names = c.names
        labels = tuple(split_name(names[i], functions[j], [names[o] for o in ms]) for i, j, ms in split_parts)
        jets = SplitJet(site, functions, c, k, w, tuple(split_parts), labels,
                        space=LOGITS if site == "decoder" else STREAM)
        if site == "decoder":
            return JetExpansion(gm, jets, Remainder(Logits(), jets, space=LOGITS))
        identity = c if keep is None or len(keep) == len(c) else Select(c, tuple(keep))
        parts = tuple(p for p in (identity, jets) if len(p))
        terms = parts[0] if len(parts) == 1 else Concat(parts)
        return JetExpansion(gm, terms, Remainder(Stream(site + 1), terms))
    if site == "decoder":
        all_pairs = tuple((i, 0) for i in range(len(c)))
        jets = Jet("decoder", (None,), c, k, w, tuple(pairs) if pairs is not None else all_pairs,
                   weight_symbols=symbols, space=LOGITS, recenter=recenter)
        return JetExpansion(gm, jets, Remainder(Logits(), jets, space=LOGITS))
    functions = structure.steps[site].blocks
    all_pairs = tuple((i, j) for j in range(len(functions)) for i in range(len(c)))
    jets = Jet(site, functions, c, k, w, tuple(pairs) if pairs is not None else all_pairs, weight_symbols=symbols,
               recenter=recenter)
    identity = c if k >= 1 else Scaled(c, w, symbols)
    if keep is not None and len(keep) != len(c):
        identity = Select(identity, tuple(keep))
    parts = tuple(p for p in (identity, jets) if len(p))
    terms = parts[0] if len(parts) == 1 else Concat(parts)
    return JetExpansion(gm, terms, Remainder(Stream(site + 1), terms))
