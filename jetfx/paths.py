"""Input-to-output paths of a residual network, and filters that select some of them.

A path of the exponential expansion chooses, at every residual step, either the skip connection
or one of the step's blocks: for a sequential network it is a subset S of the blocks (2^L paths),
for a parallel-residual one at most one block per step (Π_s (1 + blocks in s) paths). Paths are
named by their blocks joined with ">" ("h.0.attn>h.3.mlp"); the path through no block is "embed".

Filters are small automata read step by step, so that paths can be counted by dynamic
programming (never enumerated) and enumeration prunes whole subtrees. Combine them with
`&`, `|` and `~`:

    only_kinds("mlp") & max_blocks(2)        MLP-only paths through at most two blocks
    through("h.3.*") & ~avoid("*.attn")       …
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import networkx as nx

from .errors import ExpansionError
from .structure import Block, ResidualStructure, Step

ENCODER = "embed"
DECODER = "logits"
DEFAULT_MAX_PATHS = 512  # the most paths `expand` compiles unless told otherwise (max_paths=)


@dataclass(frozen=True)
class Path:
    """A path of the exponential expansion: the blocks it goes through, in order."""

    blocks: tuple[str, ...]

    @property
    def name(self) -> str:
        return path_name(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __str__(self) -> str:
        return self.name


def path_name(blocks: Iterable[str]) -> str:
    blocks = tuple(blocks)
    return ">".join(blocks) if blocks else ENCODER


def parse_path(path) -> tuple[str, ...]:
    """Accept a Path, a name like "h.0.attn>h.1.mlp" (or "embed"), or a sequence of block names."""
    if isinstance(path, Path):
        return path.blocks
    if isinstance(path, str):
        return () if path in (ENCODER, "") else tuple(p.strip() for p in path.split(">"))
    return tuple(path)


# ---------------------------------------------------------------------------------------------
# Filters


class _Special:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


REJECT = _Special("REJECT")  # no extension of this prefix is selected
ACCEPT_ALL = _Special("ACCEPT_ALL")  # every extension of this prefix is selected


class PathFilter:
    """A selection of paths, read as an automaton over the choices at each step.

    `patterns` are the block-name patterns a filter was built with and `parts` the filters it combines:
    `check(structure)` refuses a pattern that matches no block of the model (a typo would otherwise
    select nothing, or everything, silently).
    """

    description = "paths"
    patterns: tuple[str, ...] = ()
    parts: tuple = ()

    def check(self, structure: ResidualStructure) -> None:
        """Raise `ExpansionError` if the filter names blocks the model does not have."""
        for part in self.parts:
            part.check(structure)
        check_patterns(self.patterns, structure, self.description)

    def start(self):
        return ()

    def advance(self, state, step: Step, choice: Block | None):
        """State after choosing `choice` (None: the skip connection) at `step`, or REJECT."""
        return state

    def accept(self, state) -> bool:
        return True

    # the automaton of the special states is fixed
    def _advance(self, state, step, choice):
        if state is REJECT or state is ACCEPT_ALL:
            return state
        return self.advance(state, step, choice)

    def _accept(self, state) -> bool:
        if state is REJECT:
            return False
        if state is ACCEPT_ALL:
            return True
        return self.accept(state)

    def __and__(self, other: PathFilter) -> PathFilter:
        return _And(self, _as_filter(other))

    def __or__(self, other: PathFilter) -> PathFilter:
        return _Or(self, _as_filter(other))

    def __invert__(self) -> PathFilter:
        return _Not(self)

    def __repr__(self) -> str:
        return self.description


class _And(PathFilter):
    def __init__(self, a, b):
        self.a, self.b = a, b
        self.parts = (a, b)
        self.description = f"({a!r} & {b!r})"

    @staticmethod
    def _join(sa, sb):
        if sa is REJECT or sb is REJECT:
            return REJECT
        if sa is ACCEPT_ALL and sb is ACCEPT_ALL:
            return ACCEPT_ALL
        return (sa, sb)

    def start(self):
        return self._join(self.a.start(), self.b.start())

    def advance(self, state, step, choice):
        return self._join(self.a._advance(state[0], step, choice), self.b._advance(state[1], step, choice))

    def accept(self, state):
        return self.a._accept(state[0]) and self.b._accept(state[1])


class _Or(PathFilter):
    def __init__(self, a, b):
        self.a, self.b = a, b
        self.parts = (a, b)
        self.description = f"({a!r} | {b!r})"

    @staticmethod
    def _join(sa, sb):
        if sa is ACCEPT_ALL or sb is ACCEPT_ALL:
            return ACCEPT_ALL
        if sa is REJECT and sb is REJECT:
            return REJECT
        return (sa, sb)

    def start(self):
        return self._join(self.a.start(), self.b.start())

    def advance(self, state, step, choice):
        return self._join(self.a._advance(state[0], step, choice), self.b._advance(state[1], step, choice))

    def accept(self, state):
        return self.a._accept(state[0]) or self.b._accept(state[1])


class _Not(PathFilter):
    def __init__(self, a):
        self.a = a
        self.parts = (a,)
        self.description = f"~{a!r}"

    @staticmethod
    def _flip(s):
        if s is REJECT:
            return ACCEPT_ALL
        if s is ACCEPT_ALL:
            return REJECT
        return (s,)  # wrapped, so that the inner state is never mistaken for a special one

    def start(self):
        return self._flip(self.a.start())

    def advance(self, state, step, choice):
        return self._flip(self.a._advance(state[0], step, choice))

    def accept(self, state):
        return not self.a._accept(state[0])


class _AllPaths(PathFilter):
    description = "all_paths()"

    def start(self):
        return ACCEPT_ALL


class _MaxBlocks(PathFilter):
    def __init__(self, n: int):
        self.n = n
        self.description = f"max_blocks({n})"

    def start(self):
        return 0

    def advance(self, state, step, choice):
        if choice is None:
            return state
        return REJECT if state + 1 > self.n else state + 1


class _MinBlocks(PathFilter):
    def __init__(self, n: int):
        self.n = n
        self.description = f"min_blocks({n})"

    def start(self):
        return 0 if self.n > 0 else ACCEPT_ALL

    def advance(self, state, step, choice):
        if choice is None:
            return state
        return ACCEPT_ALL if state + 1 >= self.n else state + 1

    def accept(self, state):
        return state >= self.n


class _BlockPredicate(PathFilter):
    """Every block on the path satisfies `ok` (skip connections always do)."""

    def __init__(self, ok: Callable[[Block], bool], description: str, patterns: tuple[str, ...] = ()):
        self.ok = ok
        self.description = description
        self.patterns = patterns

    def advance(self, state, step, choice):
        if choice is None or self.ok(choice):
            return state
        return REJECT


class _Through(PathFilter):
    """The path goes through a block matching each pattern."""

    def __init__(self, patterns: tuple[str, ...]):
        self.patterns = patterns
        self.description = f"through({', '.join(map(repr, patterns))})"

    def start(self):
        return frozenset()

    def advance(self, state, step, choice):
        if choice is None:
            return state
        hit = {i for i, p in enumerate(self.patterns) if _matches(choice, p)}
        new = state | hit
        return ACCEPT_ALL if len(new) == len(self.patterns) else new

    def accept(self, state):
        return len(state) == len(self.patterns)


class _Prefixes(PathFilter):
    """Exactly the given paths (the state is the prefix read so far)."""

    def __init__(self, paths: Iterable[tuple[str, ...]]):
        given = [tuple(p) for p in paths]
        self.paths = set(given)
        if len(self.paths) != len(given):
            dup = next(p for p in given if given.count(p) > 1)
            raise ExpansionError(f"the path {path_name(dup)!r} is given twice; name each path once")
        self.prefixes = {p[:i] for p in self.paths for i in range(len(p) + 1)}
        self.description = f"paths({len(self.paths)} given)"

    def check(self, structure: ResidualStructure) -> None:
        steps = {b.name: b.step for b in structure.blocks}
        for p in sorted(self.paths):
            unknown = [b for b in p if b not in steps]
            if unknown:
                raise ExpansionError(f"the path {path_name(p)!r} names {unknown[0]!r}, which is not a block of this "
                                     f"model; blocks are {_some_blocks(structure)}")
            order = [steps[b] for b in p]
            if any(b <= a for a, b in zip(order, order[1:])):
                raise ExpansionError(f"the path {path_name(p)!r} is not a path of this model: its blocks must "
                                     "follow the residual steps in order, one block per step")

    def advance(self, state, step, choice):
        if choice is None:
            return state
        new = state + (choice.name,)
        return new if new in self.prefixes else REJECT

    def accept(self, state):
        return state in self.paths


class _Where(PathFilter):
    def __init__(self, predicate: Callable[[Path], bool]):
        self.predicate = predicate
        self.description = f"where({getattr(predicate, '__name__', 'predicate')})"

    def advance(self, state, step, choice):
        return state if choice is None else state + (choice.name,)

    def accept(self, state):
        return bool(self.predicate(Path(state)))


def _matches(block: Block, pattern: str) -> bool:
    return fnmatch.fnmatchcase(block.name, pattern) or fnmatch.fnmatchcase(block.qualname, pattern)


def _some_blocks(structure: ResidualStructure) -> str:
    names = [b.name for b in structure.blocks]
    return ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:4])}, …, {names[-1]}"


def check_patterns(patterns: Iterable[str], structure: ResidualStructure, where: str) -> None:
    """Every pattern must match some block (shell-style, on the block's name or module path)."""
    for p in patterns:
        if not any(_matches(b, p) for b in structure.blocks):
            raise ExpansionError(f"the pattern {p!r} in {where} matches no block of this model; blocks are "
                                 f"{_some_blocks(structure)} (patterns are shell-style: 'layers.3.*', '*.mlp')")


def as_patterns(patterns, what: str) -> tuple[str, ...]:
    """Validate the block-name patterns given to a filter: at least one, each a non-empty string."""
    if len(patterns) == 1 and isinstance(patterns[0], (list, tuple)):
        patterns = tuple(patterns[0])
    if not patterns:
        raise ExpansionError(f"{what}() needs at least one block name or pattern, e.g. {what}('layers.3.*')")
    bad = [p for p in patterns if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ExpansionError(f"{what}() takes block names or shell-style patterns (non-empty strings), got {bad[0]!r}")
    return tuple(patterns)


def _count_arg(n, what: str) -> int:
    """A number of blocks: a non-negative integer (numpy integers too; bools and floats refused)."""
    if not isinstance(n, bool):
        try:
            import numpy as np

            if isinstance(n, np.integer):
                n = int(n)
        except ImportError:  # pragma: no cover - numpy comes with torch
            pass
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ExpansionError(f"{what}(n) needs a non-negative integer number of blocks, got {n!r}")
    return n


def all_paths() -> PathFilter:
    """Every path (the default)."""
    return _AllPaths()


def max_blocks(n: int) -> PathFilter:
    """Paths through at most n blocks (n = 0: the encoder→decoder path only)."""
    return _MaxBlocks(_count_arg(n, "max_blocks"))


def min_blocks(n: int) -> PathFilter:
    """Paths through at least n blocks."""
    return _MinBlocks(_count_arg(n, "min_blocks"))


def only_kinds(*kinds: str) -> PathFilter:
    """Paths whose blocks are all of the given kinds ("attn", "mlp", "moe", "mixer", "other")."""
    kinds = _check_kinds(kinds)
    return _BlockPredicate(lambda b: b.kind in kinds, f"only_kinds({', '.join(map(repr, kinds))})")


def no_kind(*kinds: str) -> PathFilter:
    """Paths through no block of the given kinds, e.g. no_kind("attn") for bigram paths."""
    kinds = _check_kinds(kinds)
    return _BlockPredicate(lambda b: b.kind not in kinds, f"no_kind({', '.join(map(repr, kinds))})")


def no_attention() -> PathFilter:
    """Paths through no token-mixing block (attention or state-space/convolutional mixer)."""
    return no_kind("attn", "mixer")


def avoid(*patterns: str) -> PathFilter:
    """Paths through no block whose name matches a pattern (shell-style: "h.*.attn")."""
    patterns = as_patterns(patterns, "avoid")
    return _BlockPredicate(lambda b: not any(_matches(b, p) for p in patterns), f"avoid({', '.join(map(repr, patterns))})",
                           patterns)


def within(*patterns: str) -> PathFilter:
    """Paths whose blocks all match one of the patterns."""
    patterns = as_patterns(patterns, "within")
    return _BlockPredicate(lambda b: any(_matches(b, p) for p in patterns), f"within({', '.join(map(repr, patterns))})",
                           patterns)


def through(*patterns: str) -> PathFilter:
    """Paths through a block matching each pattern (all of them)."""
    return _Through(as_patterns(patterns, "through"))


def paths(*given) -> PathFilter:
    """Exactly the given paths: names ("h.0.attn>h.1.mlp", "embed") or sequences of block names."""
    if len(given) == 1 and isinstance(given[0], (list, tuple, set, frozenset, Iterator)) and not _is_name_sequence(given[0]):
        given = tuple(given[0])
    if not given:
        raise ExpansionError("paths() needs at least one path name, e.g. paths('embed', 'layers.0.mlp')")
    for p in given:
        if not isinstance(p, (str, Path)) and not _is_name_sequence(tuple(p) if isinstance(p, list) else p):
            raise ExpansionError(f"a path is a name like 'layers.0.mlp>layers.3.mlp' or 'embed', a jetfx.paths.Path "
                                 f"or a sequence of block names; got {p!r}")
    return _Prefixes(parse_path(p) for p in given)


def _is_name_sequence(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, str) for i in x)


def where(predicate: Callable[[Path], bool]) -> PathFilter:
    """Paths for which `predicate(Path)` is true (counting these enumerates them)."""
    return _Where(predicate)


def _check_kinds(kinds) -> set[str]:
    from .structure import BLOCK_KINDS

    bad = [k for k in kinds if k not in BLOCK_KINDS]
    if bad or not kinds:
        raise ExpansionError(f"block kinds are {', '.join(map(repr, BLOCK_KINDS))}, got {list(kinds)}")
    return set(kinds)


def _as_filter(x) -> PathFilter:
    if x is None:
        return all_paths()
    if isinstance(x, PathFilter):
        return x
    if callable(x):
        return where(x)
    if isinstance(x, (str, Path)):
        return paths(x)
    if isinstance(x, (list, tuple, set, frozenset, Iterator)):
        return paths(*x)
    raise ExpansionError(f"paths= takes a jetfx.paths filter (e.g. jetfx.paths.max_blocks(1)), a predicate on Path, "
                         f"a path name or a list of path names; got {type(x).__name__}")


as_filter = _as_filter


def _filter_parts(f: PathFilter) -> Iterator[PathFilter]:
    for part in f.parts:
        yield part
        yield from _filter_parts(part)


# ---------------------------------------------------------------------------------------------
# The path graph


class PathGraph:
    """The residual computation as a DAG: encoder → blocks → logits, with every skip edge.

    Its encoder-to-logits paths are the paths of the exponential expansion.
    """

    def __init__(self, structure: ResidualStructure):
        self.structure = structure
        g = nx.DiGraph()
        g.add_node(ENCODER, kind="encoder", step=-1)
        for b in structure.blocks:
            g.add_node(b.name, kind=b.kind, step=b.step, qualname=b.qualname)
        g.add_node(DECODER, kind="decoder", step=len(structure.steps))
        blocks = structure.blocks
        for b in blocks:
            g.add_edge(ENCODER, b.name)
            g.add_edge(b.name, DECODER)
            for c in blocks:
                if c.step > b.step:
                    g.add_edge(b.name, c.name)
        g.add_edge(ENCODER, DECODER)
        self.graph = g

    def filter(self, filter=None) -> PathFilter:
        """`filter` as a PathFilter checked against this model (names and patterns must exist)."""
        f = _as_filter(filter)
        f.check(self.structure)
        return f

    def _state_counts(self, f: PathFilter) -> list[Counter]:
        """Paths reaching each filter state after 0…S steps (the dynamic program of `count`)."""
        states: Counter = Counter({f.start(): 1})
        levels = [states]
        for step in self.structure.steps:
            new: Counter = Counter()
            for state, n in states.items():
                for choice in (None, *step.blocks):
                    s2 = f._advance(state, step, choice)
                    if s2 is not REJECT:
                        new[s2] += n
            states = new
            levels.append(states)
        return levels

    def count(self, filter=None) -> int:
        """Number of selected paths, by dynamic programming over the filter's states."""
        f = self.filter(filter)
        return sum(n for s, n in self._state_counts(f)[-1].items() if f._accept(s))

    def _live(self, f: PathFilter) -> list[set] | None:
        """States after each step from which some selected path can still be completed, or None where
        the filter has too many states to tabulate (`where` filters keep the whole prefix)."""
        if isinstance(f, _Where) or any(isinstance(p, _Where) for p in _filter_parts(f)):
            return None
        levels = self._state_counts(f)
        steps = self.structure.steps
        live = [set() for _ in levels]
        live[-1] = {s for s in levels[-1] if f._accept(s)}
        for i in range(len(steps) - 1, -1, -1):
            live[i] = {s for s in levels[i]
                       if any(f._advance(s, steps[i], c) in live[i + 1] for c in (None, *steps[i].blocks))}
        return live

    def iter_paths(self, filter=None) -> Iterator[Path]:
        """Selected paths in a fixed order (depth-first, skip before blocks). Only prefixes that can still
        be completed into a selected path are followed, so listing n paths costs O(n · depth)."""
        f = self.filter(filter)
        steps = self.structure.steps
        live = self._live(f)

        def walk(i, state, prefix):
            if i == len(steps):
                if f._accept(state):
                    yield Path(prefix)
                return
            for choice in (None, *steps[i].blocks):
                s2 = f._advance(state, steps[i], choice)
                if s2 is REJECT or (live is not None and s2 not in live[i + 1]):
                    continue
                yield from walk(i + 1, s2, prefix if choice is None else prefix + (choice.name,))

        if live is None or f.start() in live[0]:
            yield from walk(0, f.start(), ())

    def paths(self, filter=None, limit: int | None = None) -> list[Path]:
        """The selected paths; with `limit`, an error if there are more (counted, not enumerated)."""
        if limit is not None:
            n = self.count(filter)
            if n > limit:
                raise ExpansionError(f"the filter selects {n} paths, more than the limit of {limit}")
        return list(self.iter_paths(filter))

    def __len__(self) -> int:
        return self.count()

    def __repr__(self) -> str:
        return f"PathGraph({self.structure.num_blocks} blocks, {self.count()} paths)"

    def render(self, selected=None, **kw) -> str:
        """SVG of the residual computation, the selected paths highlighted (drawn by jetfx.pictures)."""
        if _drawing is None:
            raise ExpansionError("no drawing registered: `import jetfx.pictures` (which `import jetfx` does) draws path graphs")
        return _drawing(self, selected=selected, **kw)


# Drawing is a layer above path data: jetfx.pictures imports this module and registers how a path
# graph is drawn (`draw_with`), so that `PathGraph.render` works without paths importing pictures.
_drawing: Callable | None = None


def draw_with(render: Callable) -> None:
    """Register `render(graph, selected=…, **kw) -> SVG text` as what `PathGraph.render` calls."""
    global _drawing
    _drawing = render
