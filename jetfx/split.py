"""The super-exponential path set: Algorithm 2 with every jet term split by degree and partners.

For k ≥ 1 the jet term w_i·J^k γ(x_i)(y), with y − x_i = Σ_{o≠i} x_o, is by multilinearity a sum
of parts w_i·D^dγ(x_i)[x_o1, …, x_od]/(m_1!…m_s!), one per degree d ≤ k and multiset of other
centers (`jet_expand(…, split=True)`). Splitting every step of Algorithm 2 and taking the parts as
the next step's centers gives the super-exponential path set: a path is a tree — the center it
carries, the block, and the paths it interacts with (its "others"), each itself such a tree.

    level 1        η and the blocks of step 0 (exact, as in Algorithm 2)
    level s + 1    level s (skip) ∪ {split(x, b, others) : b in step s, x in level s,
                                      others a multiset of ≤ k terms of level s other than x}
    paths          {split(x, decoder, others) : x in level S}

Counts grow doubly exponentially (N_{s+1} = N_s + |step s|·N_s·Σ_d C(N_s−2+d, d)), so they are
computed, never enumerated: filters are bottom-up tree automata (a state per term, computed from
the states of its center and others), and `SplitPathGraph.count` runs a dynamic program over
(level, state) with exact integers. Enumeration (to compile selected paths) follows the same
states and only materializes terms that can still end in a selected path.

Regrouping (`regroup`) sums split terms into coarser paths: a degree-0 part by the center it is
evaluated at, a degree-1 part by the direction it differentiates along. For a linear residual
network that recovers exactly the paths U·(Π_{j∈S} A_j)·E (the paper's equation 5, Remark 2).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx
from torch import fx

from . import paths as P
from .errors import ExpansionError, check_order
from .expansion import DEFAULT_MAX_PATHS, JetExpansion, _jet_expand, check_split_degrees, split_name
from .structure import Block, ResidualStructure
from .terms import Branch, Concat, Grouped, SplitJet, Stream, Terms
from .tracing import residual_of

MAX_INTERMEDIATE_TERMS = 200_000


# ---------------------------------------------------------------------------------------------
# split paths


@dataclass(frozen=True, eq=False)
class SplitPath:
    """A term of the split expansion: `block` applied at `center`, along `others` (a tree).

    Leaves are η (block None, center None) and the blocks of the first step; at the decoder
    `block` is None and `center` is set.
    """

    block: Block | None
    center: SplitPath | None = None
    others: tuple[SplitPath, ...] = ()
    key: tuple = field(default=(), repr=False)

    @property
    def is_leaf(self) -> bool:
        return self.center is None

    @property
    def degree(self) -> int:
        return len(self.others)

    @cached_property
    def total_degree(self) -> int:
        """Interaction edges in the whole tree; 0 for the exponential expansion's (k = 0) paths."""
        if self.center is None:
            return 0
        return self.degree + self.center.total_degree + sum(o.total_degree for o in self.others)

    @cached_property
    def name(self) -> str:
        if self.center is None:
            return P.ENCODER if self.block is None else self.block.name
        return split_name(self.center.name, self.block, [o.name for o in self.others])

    @cached_property
    def blocks(self) -> frozenset[str]:
        """Every block in the tree (carried and interacting)."""
        own = frozenset() if self.block is None else frozenset({self.block.name})
        inner = [self.center.blocks] if self.center is not None else []
        return own.union(*inner, *(o.blocks for o in self.others))

    @cached_property
    def carrier(self) -> tuple[str, ...]:
        """The blocks along the chain of centers: the Algorithm-2 path this term refines."""
        if self.center is None:
            return () if self.block is None else (self.block.name,)
        return self.center.carrier + ((self.block.name,) if self.block is not None else ())

    def __hash__(self):
        return hash(self.name)

    def __eq__(self, other):
        return isinstance(other, SplitPath) and self.name == other.name

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"SplitPath({self.name!r})"


# ---------------------------------------------------------------------------------------------
# filters: bottom-up tree automata


class SplitFilter:
    """A selection of split paths. `leaf` and `split` compute a term's state from its parts'.

    `patterns` are the block-name patterns it was built with, `parts` the filters it combines;
    `check(structure)` refuses patterns that match no block of the model.
    """

    description = "split paths"
    patterns: tuple[str, ...] = ()
    parts: tuple = ()

    def check(self, structure) -> None:
        for part in self.parts:
            part.check(structure)
        P.check_patterns(self.patterns, structure, self.description)

    def leaf(self, block: Block | None):
        return ()

    def split(self, center, block: Block | None, others: tuple):
        """State of split(center, block, others); `others` are states, in sorted order."""
        return ()

    def accept(self, state) -> bool:
        return True

    def __and__(self, other):
        return _Both(self, as_split_filter(other), all)

    def __or__(self, other):
        return _Both(self, as_split_filter(other), any)

    def __invert__(self):
        return _Not(self)

    def __repr__(self):
        return self.description


class _Both(SplitFilter):
    def __init__(self, a: SplitFilter, b: SplitFilter, how):
        self.a, self.b, self.how = a, b, how
        self.parts = (a, b)
        self.description = f"({a!r} {'&' if how is all else '|'} {b!r})"

    def leaf(self, block):
        return (self.a.leaf(block), self.b.leaf(block))

    def split(self, center, block, others):
        return (self.a.split(center[0], block, _sorted(o[0] for o in others)),
                self.b.split(center[1], block, _sorted(o[1] for o in others)))

    def accept(self, state):
        return self.how((self.a.accept(state[0]), self.b.accept(state[1])))


class _Not(SplitFilter):
    def __init__(self, a: SplitFilter):
        self.a = a
        self.parts = (a,)
        self.description = f"~{a!r}"

    def leaf(self, block):
        return self.a.leaf(block)

    def split(self, center, block, others):
        return self.a.split(center, block, others)

    def accept(self, state):
        return not self.a.accept(state)


class _Every(SplitFilter):
    """Every split and block of the tree passes `ok(block, degree)` (hereditary: state is a bool)."""

    def __init__(self, ok, description: str, patterns: tuple[str, ...] = ()):
        self.ok = ok
        self.description = description
        self.patterns = patterns

    def leaf(self, block):
        return block is None or self.ok(block, 0)

    def split(self, center, block, others):
        return center and all(others) and self.ok(block, len(others))

    def accept(self, state):
        return state


class _TotalDegree(SplitFilter):
    """Σ of degrees over the tree (its number of interaction edges), capped at max + 1."""

    def __init__(self, low: int, high: int | None):
        self.low, self.high = low, high
        self.cap = (high if high is not None else low) + 1
        self.description = f"total_degree(min={low}, max={high})"

    def leaf(self, block):
        return 0

    def split(self, center, block, others):
        return min(self.cap, center + sum(others) + len(others))

    def accept(self, state):
        return state >= self.low and (self.high is None or state <= self.high)


class _InteractsWith(SplitFilter):
    """Some split of the tree goes along a term through a matching block. State: (contains, interacts)."""

    def __init__(self, patterns: tuple[str, ...]):
        self.patterns = patterns
        self.description = f"interacts_with({', '.join(map(repr, patterns))})"

    def _hit(self, block):
        return block is not None and any(P._matches(block, p) for p in self.patterns)

    def leaf(self, block):
        return (self._hit(block), False)

    def split(self, center, block, others):
        contains = center[0] or self._hit(block) or any(o[0] for o in others)
        interacts = center[1] or any(o[0] or o[1] for o in others)
        return (contains, interacts)

    def accept(self, state):
        return state[1]


class _Contains(SplitFilter):
    def __init__(self, patterns: tuple[str, ...]):
        self.patterns = patterns
        self.description = f"contains({', '.join(map(repr, patterns))})"

    def leaf(self, block):
        return block is not None and any(P._matches(block, p) for p in self.patterns)

    def split(self, center, block, others):
        return center or any(others) or self.leaf(block)

    def accept(self, state):
        return state


def all_split_paths() -> SplitFilter:
    return SplitFilter()


def max_degree(d: int) -> SplitFilter:
    """Every split of the tree has degree ≤ d (d = 0: the unsplit carriers' degree-0 parts only)."""
    d = _nonneg(d, "max_degree")
    return _Every(lambda block, degree: degree <= d, f"max_degree({d})")


def total_degree(min: int = 0, max: int | None = None) -> SplitFilter:  # noqa: A002 - reads as in the docs
    """The tree has between `min` and `max` interaction edges (Σ of the degrees of its splits)."""
    low = _nonneg(min, "total_degree(min)")
    high = None if max is None else _nonneg(max, "total_degree(max)")
    if high is not None and high < low:
        raise ExpansionError(f"total_degree: max={high} is below min={low}")
    return _TotalDegree(low, high)


def interacts_with(*patterns: str) -> SplitFilter:
    """Some split of the tree differentiates along a term that went through a matching block."""
    return _InteractsWith(P.as_patterns(patterns, "interacts_with"))


def contains(*patterns: str) -> SplitFilter:
    """The tree (carried or interacting parts) goes through a block matching one of the patterns."""
    return _Contains(P.as_patterns(patterns, "contains"))


def within(*patterns: str) -> SplitFilter:
    """Every block of the tree, carried or interacting, matches one of the patterns: a sub-network's paths."""
    patterns = P.as_patterns(patterns, "within")
    return _Every(lambda block, degree: block is None or any(P._matches(block, p) for p in patterns),
                  f"within({', '.join(map(repr, patterns))})", patterns)


def avoid(*patterns: str) -> SplitFilter:
    """No block of the tree, carried or interacting, matches a pattern."""
    patterns = P.as_patterns(patterns, "avoid")
    return _Every(lambda block, degree: block is None or not any(P._matches(block, p) for p in patterns),
                  f"avoid({', '.join(map(repr, patterns))})", patterns)


def only_kinds(*kinds: str) -> SplitFilter:
    """Every block of the tree, carried or interacting, is of the given kinds."""
    ks = P._check_kinds(kinds)
    return _Every(lambda block, degree: block is None or block.kind in ks, f"only_kinds({', '.join(map(repr, sorted(ks)))})")


def no_kind(*kinds: str) -> SplitFilter:
    """No block of the tree is of the given kinds."""
    ks = P._check_kinds(kinds)
    return _Every(lambda block, degree: block is None or block.kind not in ks, f"no_kind({', '.join(map(repr, sorted(ks)))})")


class _ExponentialCenters(SplitFilter):
    """Every split's center is a path of the exponential expansion (a tree of total degree 0), recursively in
    its others too: the terms that are not identically 0 under weights="exponential". State: (degree 0, ok)."""

    description = "exponential_centers()"

    def leaf(self, block):
        return (True, True)

    def split(self, center, block, others):
        return (center[0] and not others, center[0] and all(o[1] for o in others))

    def accept(self, state):
        return state[1]


def exponential_centers() -> SplitFilter:
    """The split paths whose jets are all taken at paths of the exponential expansion (weights="exponential")."""
    return _ExponentialCenters()


def as_split_filter(x) -> SplitFilter:
    if x is None:
        return all_split_paths()
    if isinstance(x, SplitFilter):
        return x
    if isinstance(x, P.PathFilter):
        raise ExpansionError("this is a filter of the exponential path set (jetfx.paths); split paths take the "
                             "filters of jetfx.split: max_degree, total_degree, interacts_with, contains, within, avoid, "
                             "only_kinds, no_kind")
    raise ExpansionError(f"a split-path filter must be built with jetfx.split (max_degree, total_degree, "
                         f"interacts_with, contains, only_kinds, no_kind), got {type(x).__name__}")


def _nonneg(d, what: str) -> int:
    if isinstance(d, bool) or not isinstance(d, int) or d < 0:
        raise ExpansionError(f"{what} needs a non-negative integer, got {d!r}")
    return d


def _sorted(states) -> tuple:
    return tuple(sorted(states, key=repr))


# ---------------------------------------------------------------------------------------------
# the graph, counting and enumeration


def _multichoose(n: int, c: int) -> int:
    return math.comb(n + c - 1, c) if c else 1


COUNT_CAP = 10**1000  # exact counts stop here: N_s squares at every step, so a deep model's would not fit in memory


class _Saturating:
    """Exact integer arithmetic that clamps at COUNT_CAP: results below it are exact, COUNT_CAP means ≥ COUNT_CAP."""

    zero, one = 0, 1

    @staticmethod
    def add(a, b):
        return min(a + b, COUNT_CAP)

    @staticmethod
    def mul(a, b):
        return min(a * b, COUNT_CAP)

    @staticmethod
    def dec(a):
        return a - 1 if a < COUNT_CAP else a

    @staticmethod
    def multichoose(n, c):
        return min(_multichoose(n, c), COUNT_CAP)

    @staticmethod
    def positive(a):
        return a > 0


class _Log10:
    """The same dynamic program on log10 of the counts (-inf for 0): an estimate for counts beyond COUNT_CAP."""

    zero, one = -math.inf, 0.0

    @staticmethod
    def add(a, b):
        hi, lo = max(a, b), min(a, b)
        return hi if lo == -math.inf else hi + math.log10(1 + 10 ** (lo - hi))

    @staticmethod
    def mul(a, b):
        return a + b

    @staticmethod
    def _int(a):
        return round(10**a) if a < 15 else None

    @classmethod
    def dec(cls, a):
        n = cls._int(a)
        if n is None:
            return a + math.log10(1 - 10 ** -a) if a < 300 else a
        return math.log10(n - 1) if n > 1 else -math.inf

    @classmethod
    def multichoose(cls, a, c):
        if c == 0:
            return 0.0
        if a == -math.inf:
            return -math.inf
        n = cls._int(a)
        if n is not None:
            return math.log10(_multichoose(n, c))
        return c * a - math.log10(math.factorial(c))  # n ≥ 10^15: n + i = n to float precision

    @staticmethod
    def positive(a):
        return a > -math.inf


def format_count(n: int | None, log10: float) -> str:
    """An exact count with thousands separators, or ~10^X where it is too large to read (or to compute)."""
    if n is not None and n < 10**12:
        return f"{n:,}"
    if log10 < 1e6:
        return f"~10^{log10:.1f}" if log10 < 1e4 else f"~10^{log10:,.0f}"
    return f"~10^({log10:.3g})"


class SplitPathGraph:
    """The split expansion's structure: blocks with carry and interaction edges, and its paths.

    `graph` is a networkx DiGraph over η, the blocks and the decoder: a "carry" edge a → b and an
    "interaction" edge a → b (up to multiplicity k) wherever a term through a can enter b's jet.
    """

    def __init__(self, structure: ResidualStructure, k: int, degrees=None):
        self.structure = structure
        self.k = check_order(k)
        self.degrees = check_split_degrees(self.k, degrees)
        g = nx.MultiDiGraph()
        g.add_node(P.ENCODER, step=-1, kind="encoder")
        for b in structure.blocks:
            g.add_node(b.name, step=b.step, kind=b.kind)
        g.add_node(P.DECODER, step=len(structure.steps), kind="decoder")
        nodes = [P.ENCODER, *(b.name for b in structure.blocks)]
        for a in nodes:
            for b in [*structure.blocks, None]:
                target, step = (P.DECODER, len(structure.steps)) if b is None else (b.name, b.step)
                if g.nodes[a]["step"] < step and step >= 1:
                    g.add_edge(a, target, kind="carry")
                    if max(self.degrees) >= 1:
                        g.add_edge(a, target, kind="interaction", max_multiplicity=max(self.degrees))
        for b in structure.steps[0].blocks:
            g.add_edge(P.ENCODER, b.name, kind="carry")
        self.graph = g

    def filter(self, filter=None) -> SplitFilter:
        """`filter` as a SplitFilter checked against this model (its patterns must match blocks)."""
        f = as_split_filter(filter)
        f.check(self.structure)
        return f

    # one split step over level counts: yields (center state, others' states, number of terms)
    def _combinations(self, counts: dict, num=_Saturating) -> Iterator[tuple]:
        states = list(counts)
        for qc in states:
            if not num.positive(counts[qc]):
                continue
            avail = dict(counts)
            avail[qc] = num.dec(avail[qc])
            pool = [q for q in states if num.positive(avail[q])]
            for d in self.degrees:
                for ms in itertools.combinations_with_replacement(pool, d):
                    ways = counts[qc]
                    for q, c in Counter(ms).items():
                        ways = num.mul(ways, num.multichoose(avail[q], c))
                    if num.positive(ways):
                        yield qc, ms, ways

    def _levels(self, f: SplitFilter, num=_Saturating) -> list[dict]:
        """Counts by state at every level 1…S (each level: {state: count})."""
        steps = self.structure.steps
        level: dict = {}
        for q in [f.leaf(None)] + [f.leaf(b) for b in steps[0].blocks]:
            level[q] = num.add(level.get(q, num.zero), num.one)
        levels = [level]
        for step in steps[1:]:
            new = dict(level)
            for b in step.blocks:
                for qc, ms, ways in self._combinations(level, num):
                    q = f.split(qc, b, _sorted(ms))
                    new[q] = num.add(new.get(q, num.zero), ways)
            level = new
            levels.append(level)
        return levels

    def _count(self, f: SplitFilter, num):
        total = num.zero
        for qc, ms, ways in self._combinations(self._levels(f, num)[-1], num):
            if f.accept(f.split(qc, None, _sorted(ms))):
                total = num.add(total, ways)
        return total

    def _log10(self, f: SplitFilter, n: int) -> float:
        """log10 of a count `n` from the saturating program; the log-space program only where it saturated."""
        return math.log10(n) if 0 < n < COUNT_CAP else (-math.inf if n == 0 else self._count(f, _Log10))

    def count(self, filter=None) -> int:
        """Number of selected split paths, by dynamic programming: an exact integer, never enumerated.

        Counts grow doubly exponentially with depth; one of 10^1000 or more raises (see `log10_count`).
        """
        f = self.filter(filter)
        n = self._count(f, _Saturating)
        if n >= COUNT_CAP:
            raise ExpansionError(f"the filter {f!r} selects about 10^{self._log10(f, n):.4g} split paths, too many to "
                                 "count exactly; log10_count() estimates it, describe() prints it")
        return n

    def log10_count(self, filter=None) -> float:
        """log10 of the number of selected split paths (-inf for none), by the same program in log space."""
        f = self.filter(filter)
        return self._log10(f, self._count(f, _Saturating))

    def count_at_most(self, filter, limit: int) -> int | None:
        """The exact count if it is ≤ limit, else None (cheap even where the count is astronomically large)."""
        n = self._count(self.filter(filter), _Saturating)
        return n if n <= limit else None

    def describe(self, filter=None) -> str:
        """The count for people: exact below 10^12, ~10^X above."""
        f = self.filter(filter)
        n = self._count(f, _Saturating)
        return format_count(n if n < COUNT_CAP else None, self._log10(f, n))

    def level_sizes(self) -> list[int]:
        """N_1…N_S: the number of terms after each step of the unfiltered split expansion (COUNT_CAP: ≥ COUNT_CAP)."""
        return [sum(level.values()) if sum(level.values()) < COUNT_CAP else COUNT_CAP
                for level in self._levels(all_split_paths())]

    def __repr__(self) -> str:
        return f"SplitPathGraph({self.structure.num_blocks} blocks, k={self.k}, {self.describe()} paths)"

    def iter_paths(self, filter=None, *, max_intermediate: int = MAX_INTERMEDIATE_TERMS) -> Iterator[SplitPath]:
        """Selected split paths. Only terms whose state can still lead to a selected path are built."""
        f = self.filter(filter)
        levels = self._levels(f)
        steps = self.structure.steps
        useful = self._useful(f, levels)
        # materialize level lists for useful states only
        by_state: dict = defaultdict(list)
        for t in [SplitPath(None)] + [SplitPath(b) for b in steps[0].blocks]:
            q = f.leaf(t.block)
            if q in useful[0]:
                by_state[q].append((t, q))
        made = sum(len(v) for v in by_state.values())
        for s, step in enumerate(steps[1:], start=1):
            new = defaultdict(list, {q: list(v) for q, v in by_state.items() if q in useful[s]})
            for b in step.blocks:
                for t, q, others in self._splits(f, by_state, b):
                    if q in useful[s]:
                        new[q].append((SplitPath(b, t, others), q))
                        made += 1
                        if made > max_intermediate:
                            raise ExpansionError(
                                f"selecting these split paths needs more than {max_intermediate} intermediate terms; "
                                "narrow the filter with hereditary parts (max_degree, only_kinds, no_kind)")
            by_state = new
        for t, q, others in self._splits(f, by_state, None):
            if f.accept(q):
                yield SplitPath(None, t, others)

    def _splits(self, f, by_state, block):
        """Every split(x, block, others) over the terms at hand, with its state."""
        items = [item for v in by_state.values() for item in v]
        index = {item[0]: i for i, item in enumerate(items)}
        for t, qc in items:
            pool = [item for item in items if item[0] is not t]
            for d in self.degrees:
                for combo in itertools.combinations_with_replacement(pool, d):
                    others = tuple(o for o, _ in combo)
                    q = f.split(qc, block, _sorted(oq for _, oq in combo))
                    yield t, q, tuple(sorted(others, key=lambda o: index[o]))

    def _useful(self, f, levels) -> list[set]:
        """States at each level from which some selected path can still be built."""
        steps = self.structure.steps
        last = levels[-1]
        useful = [set() for _ in levels]
        for qc, ms, _ in self._combinations(last):
            if f.accept(f.split(qc, None, _sorted(ms))):
                useful[-1].update((qc, *ms))
        for s in range(len(levels) - 2, -1, -1):
            useful[s] = {q for q in levels[s] if q in useful[s + 1]}
            for b in steps[s + 1].blocks:
                for qc, ms, _ in self._combinations(levels[s]):
                    if f.split(qc, b, _sorted(ms)) in useful[s + 1]:
                        useful[s].update((qc, *ms))
        return useful

    def paths(self, filter=None, limit: int | None = None) -> list[SplitPath]:
        if limit is not None and self.count_at_most(filter, limit) is None:
            raise ExpansionError(f"the filter selects {self.describe(filter)} split paths, more than the limit of {limit}")
        return list(self.iter_paths(filter))


# ---------------------------------------------------------------------------------------------
# the split expansion as terms, and its compilation


WEIGHTS = ("exponential", "uniform")  # the schemes of `split_terms`, default first


def split_terms(gm: fx.GraphModule, k: int, selected: list[SplitPath], degrees=None,
                weights: str = "exponential", *, weight_of=None) -> JetExpansion:
    """Algorithm 2 with every jet split, building only the terms the `selected` paths need.

    `weights` are the convex weights of every step's jets, whichever terms are selected (what is
    not selected is in the remainder). "exponential" (default) takes Algorithm 2's 1/|ξ_s| on the
    level's |ξ_s| paths of the exponential expansion (total degree 0: 2^s for a sequential model)
    and 0 on the other terms: every jet is taken at one of the paper's paths and split by all the
    terms it interacts with. "uniform" takes 1/N_s on each of the level's N_s terms; N_s squares at
    every step, so beyond about ten steps these weights are 0 in float64 (refused: see
    `level_weights`). `weight_of`: those weights as made by `level_weights`, if at hand.
    """
    structure = residual_of(gm)
    steps = structure.steps
    weight_of = weight_of or level_weights(SplitPathGraph(structure, k, degrees), weights)
    # which terms are needed, and the last step that uses each (S: the decoder)
    last_use: dict[SplitPath, int] = {}

    def need(t: SplitPath, step: int):
        if last_use.get(t, -1) >= step:
            return
        first_time = t not in last_use
        last_use[t] = step
        if first_time and t.center is not None:
            own = t.block.step
            for sub in (t.center, *t.others):
                need(sub, own)

    for p in selected:
        for sub in (p.center, *p.others):
            need(sub, len(steps))
    leaves = [SplitPath(None)] + [SplitPath(b) for b in steps[0].blocks]
    current = [t for t in leaves if t in last_use]
    parts_of_leaves = {P.ENCODER: Stream(0), **{b.name: Branch(b) for b in steps[0].blocks}}
    terms: Terms = _concat([parts_of_leaves[t.name] for t in current])
    for s in range(1, len(steps)):
        made = [t for t in last_use if t.center is not None and t.block.step == s]
        keep = [i for i, t in enumerate(current) if last_use[t] > s]
        parts = _parts(current, made, steps[s].blocks)
        w = tuple(weight_of(s - 1, t) for t in current)
        if not parts and len(keep) == len(current):
            continue
        xi = _jet_expand(gm, structure, s, terms, k, w, keep=keep, split_parts=parts)
        terms = xi.terms
        current = [current[i] for i in keep] + made
    parts = _parts(current, selected, (None,))
    return _jet_expand(gm, structure, "decoder", terms, k, tuple(weight_of(len(steps) - 1, t) for t in current),
                       split_parts=parts)


def level_weights(graph: SplitPathGraph, weights: str):
    """weight(level index, term) under the named scheme (see `split_terms`), as float64.

    Uniform weights 1/N_s vanish in float64 once N_s passes ~10^308, and every split path would be
    exactly 0: refused here, where the weights are made.
    """
    if weights not in WEIGHTS:
        raise ExpansionError(f"weights={weights!r}: the split expansion takes weights='uniform' (1/N_s on every "
                             "term) or 'exponential' (1/2^s on the exponential expansion's paths, Algorithm 2's)")
    if weights == "uniform":
        sizes = graph.level_sizes()
        for s, n in enumerate(sizes):
            if 1 / n == 0.0:  # int / int: correctly rounded even where N_s exceeds a float
                shown = format_count(n, math.log10(n)) if n < COUNT_CAP else "10^1000 or more"
                raise ExpansionError(
                    f"under weights='uniform' the split level after step {s} has {shown} terms, so its weight 1/N "
                    "is 0 in float64 and every split path of this model would be exactly 0 (all of the logits in "
                    "the remainder). Use weights='exponential': jets at the exponential expansion's paths, weights 1/2^s")
        return lambda s, t: 1 / sizes[s]
    carriers = [level.get(True, 0) for level in graph._levels(max_degree(0))]
    return lambda s, t: 1 / carriers[s] if t.total_degree == 0 else 0.0


def _parts(current: list[SplitPath], made: list[SplitPath], functions) -> tuple:
    index = {t: i for i, t in enumerate(current)}
    fidx = {(f.name if f is not None else None): j for j, f in enumerate(functions)}
    parts = [(index[t.center], fidx[t.block.name if t.block is not None else None],
              tuple(sorted(index[o] for o in t.others))) for t in made]
    order = sorted(range(len(parts)), key=lambda p: parts[p][1])
    made[:] = [made[p] for p in order]
    return tuple(parts[p] for p in order)


def _concat(parts: list[Terms]) -> Terms:
    return parts[0] if len(parts) == 1 else Concat(tuple(parts))


def expand_split(gm: fx.GraphModule, k: int = 1, paths=None, *, degrees=None, max_paths: int = DEFAULT_MAX_PATHS,
                 jets: str = "auto", weights: str = "exponential"):
    """The split (super-exponential) expansion, compiled: one logits tensor per selected split path.

    weights="exponential" (see `split_terms`) keeps only paths that are not identically 0 under it.
    """
    from .passes.materialize import compile_expansion

    k = check_order(k)
    structure = residual_of(gm)
    graph = SplitPathGraph(structure, k, degrees)
    f = graph.filter(paths)
    weight_of = level_weights(graph, weights)  # a bad name or vanishing weights fail before paths are counted
    if weights == "exponential":
        f = f & exponential_centers()
    n = graph.count_at_most(f, max_paths)
    if n == 0:
        raise ExpansionError(f"the split-path filter {f!r} selects no path of this model at k={k}; loosen it")
    if n is None:
        raise ExpansionError(f"the filter {f!r} selects {graph.describe(f)} split paths, more than max_paths={max_paths}; narrow it "
                             "(e.g. jetfx.split.max_degree(0) & jetfx.split.total_degree(max=1)) or raise max_paths")
    selected = list(graph.iter_paths(f))
    expansion = split_terms(gm, k, selected, degrees, weights, weight_of=weight_of)
    module = compile_expansion(gm, expansion.terms, jets=jets, k=k)
    module.split_graph = graph
    module.selected = selected
    return module


# ---------------------------------------------------------------------------------------------
# regrouping


def regroup(expansion: JetExpansion, labels=None) -> tuple[Terms, tuple]:
    """Sum split terms into coarser paths: degree 0 by center, degree 1 by direction.

    `labels` are the centers' path labels (frozensets of block names; default: η ↦ ∅, a block
    output ↦ {block}, other terms ↦ their name). A degree-0 part of block b at a center labelled S
    goes to S ∪ {b}, a degree-1 part along x_o to label(x_o) ∪ {b}, identity terms keep their
    center's label; parts of degree ≥ 2 stay as they are (labelled by name). Returns the grouped
    terms (names "embed", "h.0.attn>h.2.mlp", …) and their labels, to feed the next step.
    """
    terms = expansion.terms
    split = _split_node(terms)
    if split is None:
        raise ExpansionError("regroup needs a split expansion: jet_expand(…, split=True)")
    centers = split.centers
    if labels is None:
        labels = [_default_label(n) for n in centers.names]
    labels = list(labels)
    if len(labels) != len(centers):
        raise ExpansionError(f"{len(labels)} labels for {len(centers)} centers")
    out_labels = []
    if split is not terms:  # identity terms first (Concat(identity, split))
        identity = terms.parts[0]
        ids = identity.indices if hasattr(identity, "indices") else range(len(identity))
        out_labels.extend(labels[i] for i in ids)
    for (i, j, others), name in zip(split.parts, split.labels):
        f = split.functions[j]
        add = frozenset() if f is None else frozenset({f.name})
        if len(others) == 0:
            out_labels.append(frozenset(labels[i]) | add)
        elif len(others) == 1:
            out_labels.append(frozenset(labels[others[0]]) | add)
        else:
            out_labels.append(name)
    order: dict = {}
    for pos, lab in enumerate(out_labels):
        order.setdefault(lab, []).append(pos)
    group_labels = tuple(order)
    names = tuple(_label_name(lab, expansion.gm) for lab in group_labels)
    return Grouped(terms, tuple(tuple(v) for v in order.values()), names), group_labels


def _split_node(terms: Terms) -> SplitJet | None:
    if isinstance(terms, SplitJet):
        return terms
    if isinstance(terms, Concat) and isinstance(terms.parts[-1], SplitJet):
        return terms.parts[-1]
    return None


def _default_label(name: str):
    if name == P.ENCODER:
        return frozenset()
    return frozenset(P.parse_path(name)) if "[" not in name else name


def _label_name(label, gm) -> str:
    if isinstance(label, str):
        return label
    order = {b.name: i for i, b in enumerate(residual_of(gm).blocks)}
    return P.path_name(sorted(label, key=order.__getitem__))


__all__ = [
    "SplitPath", "SplitFilter", "SplitPathGraph", "all_split_paths", "max_degree", "total_degree", "interacts_with",
    "contains", "within", "avoid", "only_kinds", "no_kind", "exponential_centers", "expand_split", "split_terms", "regroup",
]
