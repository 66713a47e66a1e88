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

Here: split paths (`SplitPath`) and the names of split parts, counting and enumeration
(`SplitPathGraph`). The filters are `jetfx.split_filters`, the terms of selected paths and their
compilation `jetfx.split`; all three are importable from `jetfx.split`.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx

from . import paths as P
from .errors import ExpansionError, check_order
from .split_filters import SplitFilter, _sorted, all_split_paths, as_split_filter
from .structure import Block, ResidualStructure

MAX_INTERMEDIATE_TERMS = 200_000


# ---------------------------------------------------------------------------------------------
# split paths and their names


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



def split_name(center: str, function, others: Sequence[str]) -> str:
    """"center>block[o1, o2]": the part of the jet of `function` at `center` along `others`."""
    if function is None:
        base = center if not others else f"{center}>decoder"
    else:
        base = function.name if center == P.ENCODER else f"{center}>{function.name}"
    return f"{base}[{', '.join(others)}]" if others else base



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
