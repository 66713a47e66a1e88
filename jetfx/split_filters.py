"""Filters of split paths: bottom-up tree automata, combined with `&`, `|` and `~`.

A split path is a tree (the center it carries, the block, the terms it interacts with), so a
filter is an automaton read from the leaves up: `leaf(block)` is a leaf's state, `split(center,
block, others)` the state of a split from its parts' states, `accept(state)` whether a finished
path is selected. States are small and hashable, which is what lets `SplitPathGraph` count
selected paths by dynamic programming over (level, state) instead of enumerating them.

    max_degree(1) & within("h.0.*", "h.1.*")      paths of layers 0-1 with splits of degree ≤ 1
    total_degree(max=1) & interacts_with("*.attn")

Importable from `jetfx.split` as well.
"""

from __future__ import annotations

from . import paths as P
from .errors import ExpansionError
from .structure import Block


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
