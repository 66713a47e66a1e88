"""Symbolic terms of a jet expansion: what `jet_expand` returns and `compile` lowers to a graph.

A `Terms` object stands for N functions of the tokens, all of the same shape — stream vectors
(B, T, d) or logits (B, T, V) — which compile to one stacked tensor (N, B, T, ·). Each term has a
name; names of jet terms record the path they come from ("h.0.attn>h.2.mlp").

Terms form a DAG (a jet's centers are earlier terms), so terms shared by several paths are
computed once. Nothing here computes anything: see `jetfx.passes.materialize` for the lowering and
`jetfx.symbolic` for the sympy view.
"""

from __future__ import annotations

from functools import cached_property
from dataclasses import dataclass, field

import torch

from .paths import ENCODER
from .structure import Block

STREAM, LOGITS = "stream", "logits"


class JetWeights(tuple):
    """The jet weights of one application of Algorithm 1 (a *site*: a block step or the decoder).

    One weight per center, shared by the site's jet terms and (k = 0) identity terms. As a tuple it
    holds floats (what the symbolic view and the pictures read); `tensor`, when given, is what a
    compiled module uses, and may require grad (differentiable expansions). `total` counts the
    centers that share the constraint Σ w = 1: more than `len(self)` when only some terms of an
    expansion are compiled — the others' terms are in the remainder, and their weights are one
    number, the *slack* 1 − Σ (weights that compiled terms use). `site` names the site ("step3",
    "decoder") in compiled modules (`ExpandedModule.jet_weights`).
    """

    site: str
    tensor: torch.Tensor | None
    total: int
    centers: tuple[str, ...]

    def __new__(cls, values, *, site: str, tensor: torch.Tensor | None = None, total: int | None = None,
                centers: tuple[str, ...] = ()):
        self = super().__new__(cls, (float(v) for v in values))
        self.site = site
        self.tensor = tensor
        self.total = len(self) if total is None else int(total)
        self.centers = tuple(centers)
        return self

    def __reduce__(self):  # deepcopy/pickle keep the attributes
        return (_jet_weights, (tuple(self), self.site, self.tensor, self.total, self.centers))


def _jet_weights(values, site, tensor, total, centers):
    return JetWeights(values, site=site, tensor=tensor, total=total, centers=centers)


def site_name(site) -> str:
    """"step3" for block step 3, "decoder" for the decoder: the key of a site's jet weights."""
    return "decoder" if site == "decoder" else f"step{site}"


class Terms:
    """N named terms of one space ("stream": vectors in R^d, "logits": vectors in R^V)."""

    names: tuple[str, ...]
    space: str

    def __len__(self) -> int:
        return len(self.names)

    def __add__(self, other: Terms) -> Terms:
        return Concat((self, other))

    def __getitem__(self, index) -> Terms:
        if isinstance(index, str):
            index = [self.names.index(index)]
        elif isinstance(index, int):
            index = [range(len(self))[index]]
        elif isinstance(index, slice):
            index = list(range(len(self)))[index]
        return Select(self, tuple(index))

    def __repr__(self) -> str:
        shown = ", ".join(self.names[:4]) + (", …" if len(self) > 4 else "")
        return f"{type(self).__name__}({len(self)} {self.space} terms: {shown})"


@dataclass(frozen=True, eq=False, repr=False)
class Stream(Terms):
    """The model's own stream node h_s (s = 0: the encoder output η, named "embed")."""

    index: int
    label: str = ""
    space: str = STREAM

    @cached_property
    def names(self):
        return (self.label or (ENCODER if self.index == 0 else f"h{self.index}"),)


@dataclass(frozen=True, eq=False, repr=False)
class Branch(Terms):
    """The model's own block output γ_b(h_s), named after the block."""

    block: Block
    space: str = STREAM

    @cached_property
    def names(self):
        return (self.block.name,)


@dataclass(frozen=True, eq=False, repr=False)
class Logits(Terms):
    """The model's logits q(z)."""

    space: str = LOGITS

    @cached_property
    def names(self):
        return ("logits",)


@dataclass(frozen=True, eq=False, repr=False)
class Constant(Terms):
    """User-given centers: a tensor (N, …, d) broadcast to (N, B, T, d) at run time."""

    value: torch.Tensor
    labels: tuple[str, ...]
    space: str = STREAM

    @cached_property
    def names(self):
        return self.labels


@dataclass(frozen=True, eq=False, repr=False)
class Concat(Terms):
    parts: tuple[Terms, ...]

    @cached_property
    def names(self):
        return tuple(n for p in self.parts for n in p.names)

    @property
    def space(self):
        return self.parts[0].space


@dataclass(frozen=True, eq=False, repr=False)
class Select(Terms):
    source: Terms
    indices: tuple[int, ...]

    @cached_property
    def names(self):
        return tuple(self.source.names[i] for i in self.indices)

    @property
    def space(self):
        return self.source.space


@dataclass(frozen=True, eq=False, repr=False)
class Scaled(Terms):
    """w_i · x_i: the identity terms of a k = 0 jet expansion."""

    source: Terms
    weights: tuple[float, ...]
    weight_symbols: tuple[str, ...] = ()

    @cached_property
    def names(self):
        return self.source.names

    @property
    def space(self):
        return self.source.space


@dataclass(frozen=True, eq=False, repr=False)
class Jet(Terms):
    """w_i · J^k f(x_i)(y) for the blocks f of a step (or the decoder υ), at centers x_i.

    `pairs` lists the (center index, function index) pairs computed, in output order; the
    function index counts the step's blocks (0 for the decoder). The variate y is the true input
    of the step (h_s) or of the decoder (h_S).
    """

    site: int | str  # step index, or "decoder"
    functions: tuple[Block | None, ...]  # the step's blocks, or (None,) for the decoder
    centers: Terms
    k: int
    weights: tuple[float, ...]  # one per center (a JetWeights when made by jet_expand)
    pairs: tuple[tuple[int, int], ...]
    weight_symbols: tuple[str, ...] = ()  # names of the weights in the symbolic view
    name_style: str = "path"  # "path": center>block; "center": keep the center's name
    space: str = field(default=STREAM)
    recenter: bool = True  # False: the variate y is the direction (jets of f(x_i + t·y)), not y − x_i

    @cached_property
    def names(self):
        out = []
        for i, j in self.pairs:
            center = self.centers.names[i]
            f = self.functions[j]
            if f is None or self.name_style == "center":
                out.append(center)
            else:
                out.append(f.name if center == ENCODER else f"{center}>{f.name}")
        return tuple(out)


@dataclass(frozen=True, eq=False, repr=False)
class SplitJet(Terms):
    """Parts of jet terms split by degree and by the other centers that enter them.

    Each part (i, j, others) is w_i · D^d f_j(x_i)[x_o1, …, x_od] / (m_1!…m_s!): the coefficient of
    t^m in f_j(x_i + Σ_o t_o·x_o), where `others` is the sorted multiset of d center indices
    (multiplicities m). Summed over all multisets of the centers other than i, for d ≤ k, the
    parts give back w_i · J^k f_j(x_i)(Σ x): the unsplit term (`jetfx.split`).
    """

    site: int | str
    functions: tuple[Block | None, ...]
    centers: Terms
    k: int
    weights: tuple[float, ...]
    parts: tuple[tuple[int, int, tuple[int, ...]], ...]
    labels: tuple[str, ...]
    space: str = field(default=STREAM)

    @cached_property
    def names(self):
        return self.labels


@dataclass(frozen=True, eq=False, repr=False)
class Grouped(Terms):
    """Sums of groups of terms (regrouping split terms into coarser paths): one term per group."""

    source: Terms
    groups: tuple[tuple[int, ...], ...]
    labels: tuple[str, ...]

    @cached_property
    def names(self):
        return self.labels

    @property
    def space(self):
        return self.source.space


@dataclass(frozen=True, eq=False, repr=False)
class Remainder(Terms):
    """target − Σ terms (the exact remainder δ)."""

    target: Terms
    terms: Terms
    space: str = STREAM

    @cached_property
    def names(self):
        return ("remainder",)


def walk(terms: Terms):
    """Every Terms node reachable from `terms`, each once, dependencies first."""
    seen: set[int] = set()
    order: list[Terms] = []

    def visit(t: Terms):
        if id(t) in seen:
            return
        seen.add(id(t))
        for child in children(t):
            visit(child)
        order.append(t)

    visit(terms)
    return order


def needed_rows(root: Terms) -> dict[int, set[int]]:
    """For every Terms node under `root` (by id), the rows that `root`'s values depend on.

    Rows that no output uses are computed by some lowerings (a k = 0 identity term whose path is not
    selected) but carry nothing: their weights are not parameters of the expansion.
    """
    need: dict[int, set[int]] = {id(root): set(range(len(root)))}
    for t in reversed(walk(root)):  # consumers before what they consume
        rows = need.get(id(t), set())
        if not rows:
            continue
        if isinstance(t, Concat):
            offset = 0
            for p in t.parts:
                _add(need, p, {r - offset for r in rows if offset <= r < offset + len(p)})
                offset += len(p)
        elif isinstance(t, Select):
            _add(need, t.source, {t.indices[r] for r in rows})
        elif isinstance(t, Scaled):
            _add(need, t.source, rows)
        elif isinstance(t, Jet):
            _add(need, t.centers, {t.pairs[r][0] for r in rows})
        elif isinstance(t, SplitJet):
            _add(need, t.centers, {i for r in rows for i in (t.parts[r][0], *t.parts[r][2])})
        elif isinstance(t, Grouped):
            _add(need, t.source, {m for r in rows for m in t.groups[r]})
        elif isinstance(t, Remainder):
            _add(need, t.target, set(range(len(t.target))))
            _add(need, t.terms, set(range(len(t.terms))))
    return need


def used_weights(root: Terms) -> dict[int, tuple[object, set[int]]]:
    """{id(weights): (weights, indices of the centers whose weight some needed row uses)}."""
    need = needed_rows(root)
    out: dict[int, tuple[object, set[int]]] = {}
    for t in walk(root):
        rows = need.get(id(t), set())
        if isinstance(t, Scaled):
            used = set(rows)
        elif isinstance(t, Jet):
            used = {t.pairs[r][0] for r in rows}
        elif isinstance(t, SplitJet):
            used = {t.parts[r][0] for r in rows}
        else:
            continue
        out.setdefault(id(t.weights), (t.weights, set()))[1].update(used)
    return out


def _add(need: dict[int, set[int]], t: Terms, rows) -> None:
    if rows:
        need.setdefault(id(t), set()).update(rows)


def children(t: Terms) -> tuple[Terms, ...]:
    if isinstance(t, Concat):
        return t.parts
    if isinstance(t, (Select, Scaled, Grouped)):
        return (t.source,)
    if isinstance(t, (Jet, SplitJet)):
        return (t.centers,)
    if isinstance(t, Remainder):
        return (t.target, t.terms)
    return ()
