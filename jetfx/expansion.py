"""Jet expansions: Algorithm 1 (`jet_expand`) and Algorithm 2 (`expand`, exponential) of the paper.

`jet_expand(gm, l, centers, k, weights)` expands step l (the blocks reading h_l; l counts from 0,
so the paper's "block l+1") or, for l = L (or "decoder"), the decoder:

    ξ = { w_i · J^k γ(x_i)(y) }            y: the true input of the step (h_l) or decoder (h_L)
    l < L:  ξ ∪= identity terms             k ≥ 1: the centers x_i;  k = 0: w_i · x_i
    δ = h_{l+1} − Σ ξ   (decoder: q − Σ ξ, in logit space)

Terms of one expansion are centers of the next, which is how expansions compose into
input-to-output paths. `expand(gm, k)` is the exponential expansion (Algorithm 2): start from
{η, γ_1(η)}, expand every step with uniform weights 1/|ξ|, then the decoder; the result has one
term per path, 2^L for a sequential network. `paths=` selects which paths are compiled (through
`jetfx.paths` filters), without changing the terms selected paths get.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from . import paths as P
from .errors import ExpansionError, check_order
from .structure import Block, ResidualStructure
from .terms import LOGITS, STREAM, Branch, Concat, Constant, Jet, Logits, Remainder, Scaled, Select, SplitJet, Stream, Terms
from .tracing import as_traced, info_of, residual_of

DEFAULT_MAX_PATHS = 512
MAX_SPLIT_TERMS = 100_000
SIMPLEX_TOLERANCE = 1e-6


@dataclass(frozen=True)
class JetExpansion:
    """The result of `jet_expand`: the terms ξ and the exact remainder δ."""

    gm: fx.GraphModule
    terms: Terms
    remainder: Remainder

    def compile(self, jets: str = "auto"):
        """Compile the terms (which must be logits, i.e. expanded at the decoder) into a module."""
        from .passes.materialize import compile_expansion

        return compile_expansion(self.gm, self.terms, jets=jets)

    def evaluate(self, tokens, jets: str = "auto"):
        """(stacked terms, remainder) at these tokens, in any space: stream terms of a block step too."""
        from .passes.materialize import compile_terms
        from .tracing import as_tokens

        from .functions import device_of

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


def _check_weights(weights, n: int) -> tuple[float, ...]:
    if weights is None or (isinstance(weights, str) and weights == "uniform"):
        return tuple([1.0 / n] * n)
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().flatten().tolist()
    try:
        w = tuple(float(x) for x in weights)
    except (TypeError, ValueError):
        raise ExpansionError(f"weights must be a sequence of {n} numbers, got {weights!r}") from None
    if len(w) != n:
        raise ExpansionError(f"got {len(w)} jet weights for {n} centers; give one weight per center")
    if any(not math.isfinite(x) for x in w):
        raise ExpansionError(f"jet weights must be finite, got {list(w)}")
    if min(w) < -SIMPLEX_TOLERANCE or abs(sum(w) - 1.0) > SIMPLEX_TOLERANCE * max(1, n):
        raise ExpansionError(
            f"jet weights must lie on the simplex (non-negative, summing to 1), got {list(w)} "
            f"(sum {sum(w):.6g}); use weights=None for uniform weights"
        )
    return w


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
               degrees=None, max_terms: int = MAX_SPLIT_TERMS) -> JetExpansion:
    """Algorithm 1: expand step `l` (or the decoder, l = L) around `centers` with order `k`.

    `centers`: terms of an earlier expansion, `jetfx.stream(gm, i)`, `jetfx.branch(gm, name)`,
    tensors, or a list of these. `weights`: one per center, on the simplex (default uniform).

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
    w = _check_weights(weights, len(c))
    if not split:
        if degrees is not None:
            raise ExpansionError("degrees= selects parts of split jet terms: pass split=True as well")
        return _jet_expand(gm, structure, site, c, k, w)
    kept = check_split_degrees(k, degrees)
    functions = (None,) if site == "decoder" else structure.steps[site].blocks
    n_parts = len(functions) * len(c) * sum(math.comb(len(c) - 2 + d, d) if d else 1 for d in kept)
    if n_parts > max_terms:
        raise ExpansionError(f"the split has {n_parts} parts ({len(c)} centers, degrees {list(kept)}), more than "
                             f"max_terms={max_terms}; keep fewer degrees (degrees=…), fewer centers, or raise max_terms")
    parts = split_parts(len(c), range(len(functions)), kept)
    return _jet_expand(gm, structure, site, c, k, w, split_parts=parts)


def check_split_degrees(k: int, degrees) -> tuple[int, ...]:
    """The degrees a split keeps: all of 0…k by default; clear errors for k = 0 and degrees > k."""
    if k == 0:
        raise ExpansionError("a split needs k ≥ 1: at k = 0 a jet term is the plain evaluation w_i·γ(x_i), "
                             "there is no derivative to split; use k=1 or more, or split=False")
    if degrees is None:
        return tuple(range(k + 1))
    if isinstance(degrees, int) and not isinstance(degrees, bool):
        degrees = (degrees,)
    try:
        kept = tuple(sorted({int(d) for d in degrees}))
    except (TypeError, ValueError):
        raise ExpansionError(f"degrees must be integers between 0 and k={k}, got {degrees!r}") from None
    if not kept:
        raise ExpansionError(f"degrees={degrees!r} keeps no part of the split; give degrees between 0 and k={k}")
    bad = [d for d in kept if not 0 <= d <= k]
    if bad:
        raise ExpansionError(f"degree {bad[0]} is out of range for a jet of order k={k}: a k-jet has parts of "
                             f"degree 0…{k} only; raise k or keep degrees ≤ {k}")
    return kept


def split_parts(n: int, functions, degrees) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
    """Every (center i, function j, multiset of other centers) of the given degrees, grouped by j."""
    out = []
    for j in functions:
        for i in range(n):
            others = [o for o in range(n) if o != i]
            for d in degrees:
                out.extend((i, j, ms) for ms in itertools.combinations_with_replacement(others, d))
    return tuple(out)


def split_name(center: str, function, others: Sequence[str]) -> str:
    """"center>block[o1, o2]": the part of the jet of `function` at `center` along `others`."""
    if function is None:
        base = center if not others else f"{center}>decoder"
    else:
        base = function.name if center == P.ENCODER else f"{center}>{function.name}"
    return f"{base}[{', '.join(others)}]" if others else base


def _jet_expand(gm, structure: ResidualStructure, site, c: Terms, k: int, w: tuple[float, ...],
                pairs=None, keep=None, split_parts=None) -> JetExpansion:
    """Algorithm 1 without argument checks. `pairs` restricts which (center, block) jets are built
    and `keep` which identity terms are kept (to compile selected paths only); the remainder then
    contains what was left out. `split_parts` replaces the jets by these parts of their split."""
    symbols = tuple(f"w{site}_{i}" if site != "decoder" else f"ω_{i}" for i in range(len(c)))
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
                   weight_symbols=symbols, space=LOGITS)
        return JetExpansion(gm, jets, Remainder(Logits(), jets, space=LOGITS))
    functions = structure.steps[site].blocks
    all_pairs = tuple((i, j) for j in range(len(functions)) for i in range(len(c)))
    jets = Jet(site, functions, c, k, w, tuple(pairs) if pairs is not None else all_pairs, weight_symbols=symbols)
    identity = c if k >= 1 else Scaled(c, w, symbols)
    if keep is not None and len(keep) != len(c):
        identity = Select(identity, tuple(keep))
    parts = tuple(p for p in (identity, jets) if len(p))
    terms = parts[0] if len(parts) == 1 else Concat(parts)
    return JetExpansion(gm, terms, Remainder(Stream(site + 1), terms))


# ---------------------------------------------------------------------------------------------
# Algorithm 2


def exponential(gm: fx.GraphModule, k: int, selected: Sequence[P.Path] | None = None) -> JetExpansion:
    """Algorithm 2 with uniform weights, building only the terms the `selected` paths need."""
    k = check_order(k)
    structure = residual_of(gm)
    steps = structure.steps
    if selected is None:
        selected = P.PathGraph(structure).paths()
    wanted = {_choices(structure, p.blocks) for p in selected}
    prefixes = [{c[: s + 1] for c in wanted} for s in range(len(steps))]

    # ξ_0 = {η, γ(η) for the blocks of step 0}: exact, from the model's own graph
    first = [Stream(0)] + [Branch(b) for b in steps[0].blocks]
    first_choices = [(None,)] + [(b.name,) for b in steps[0].blocks]
    keep = [i for i, ch in enumerate(first_choices) if ch in prefixes[0]]
    terms: Terms = Concat(tuple(first[i] for i in keep)) if len(keep) > 1 else first[keep[0]]
    choices = [first_choices[i] for i in keep]
    full = 1 + len(steps[0].blocks)  # |ξ| of the full expansion

    for s in range(1, len(steps)):
        blocks = steps[s].blocks
        keep_ids = [i for i, ch in enumerate(choices) if ch + (None,) in prefixes[s]]
        pairs = [(i, j) for j, b in enumerate(blocks) for i, ch in enumerate(choices) if ch + (b.name,) in prefixes[s]]
        # weights 1/|ξ| of the full expansion (Algorithm 2), whichever centers are selected
        xi = _jet_expand(gm, structure, s, terms, k, (1.0 / full,) * len(choices), pairs=pairs, keep=keep_ids)
        choices = [choices[i] + (None,) for i in keep_ids] + [choices[i] + (blocks[j].name,) for i, j in pairs]
        terms = xi.terms
        full *= 1 + len(blocks)
    return _jet_expand(gm, structure, "decoder", terms, k, (1.0 / full,) * len(choices))


def _choices(structure: ResidualStructure, blocks: tuple[str, ...]) -> tuple:
    """A path as its choice at every step: None (skip) or the block's name."""
    by_step = {}
    for name in blocks:
        b = structure.block(name)
        if b.step in by_step:
            raise ExpansionError(f"path {P.path_name(blocks)} goes through two blocks of step {b.step}")
        by_step[b.step] = b.name
    return tuple(by_step.get(s) for s in range(len(structure.steps)))


def expand(gm: fx.GraphModule, k: int = 1, paths=None, *, max_paths: int = DEFAULT_MAX_PATHS, jets: str = "auto",
           split: bool = False, degrees=None, weights: str | None = None, example_inputs=None):
    """The exponential jet expansion of a traced model, compiled into a runnable GraphModule.

    `paths` selects the compiled paths: a `jetfx.paths` filter, a predicate on `Path`, or path
    names. The module's output holds one logits tensor per selected path and the remainder;
    paths + remainder = the model's logits exactly, whatever the selection.

    `split=True` (k ≥ 1) compiles the super-exponential expansion instead, every jet term split by
    degree and by the terms it interacts with; `paths` is then a `jetfx.split` filter (see there), and
    `weights` "exponential" (default: Algorithm 2's 1/2^s on the paper's paths) or "uniform" (1/N_s on
    every term of the split level); see `jetfx.split.split_terms`.

    `gm` is made by `jetfx.trace`, or is a GraphModule from `torch.fx.symbolic_trace` /
    `torch.export` (or an ExportedProgram), re-exported first (`jetfx.tracing.as_traced`; float
    inputs need `example_inputs` when the graph records no shapes).
    """
    k = check_order(k)
    gm = as_traced(gm, example_inputs)
    if split:
        from .split import expand_split

        return expand_split(gm, k, paths, degrees=degrees, max_paths=max_paths, jets=jets, weights=weights or "exponential")
    if degrees is not None or weights is not None:
        raise ExpansionError("degrees= and weights= apply to split jet terms: pass split=True as well")
    structure = residual_of(gm)
    graph = P.PathGraph(structure)
    filt = P.as_filter(paths)
    n = graph.count(filt)
    if n == 0:
        raise ExpansionError(f"the path filter {filt!r} selects no path of this model "
                             f"({structure.num_blocks} blocks: {', '.join(b.name for b in structure.blocks[:6])}…); "
                             "loosen it")
    if n > max_paths:
        raise ExpansionError(_too_many(graph, filt, n, max_paths))
    selected = list(graph.iter_paths(filt))
    expansion = exponential(gm, k, selected)
    from .passes.materialize import compile_expansion

    return compile_expansion(gm, expansion.terms, jets=jets, path_graph=graph, selected=selected, k=k)


def _too_many(graph: P.PathGraph, filt, n: int, limit: int) -> str:
    total = graph.structure.num_paths
    what = "the exponential expansion has" if isinstance(filt, P._AllPaths) else f"the filter {filt!r} selects"
    hints = []
    for name, f in (("jetfx.paths.max_blocks(1)", P.max_blocks(1)),
                    ("jetfx.paths.only_kinds('mlp') & jetfx.paths.max_blocks(2)", P.only_kinds("mlp") & P.max_blocks(2)),
                    ("jetfx.paths.max_blocks(2)", P.max_blocks(2))):
        try:
            c = graph.count(f & filt if not isinstance(filt, P._AllPaths) else f)
        except ExpansionError:
            continue
        if 0 < c <= limit:
            hints.append(f"{name} ({c} paths)")
    hint = ("; e.g. paths=" + " or paths=".join(hints)) if hints else ""
    return (f"{what} {n} paths ({total} in all for {graph.structure.num_blocks} blocks), more than "
            f"max_paths={limit}. Select fewer with paths=…{hint}, or raise max_paths")
