"""The values of a Taylor graph and the runtime helpers its generated code calls.

A value that depends on the expansion point is a `Series`: its normalized Taylor coefficients
u_0 … u_k as FX nodes of the new graph, `None` where a coefficient is known to be zero (structural
zeros save whole products). A value that does not is a `Const` (one node, or a Python constant); a
tuple whose elements differ in kind (topk: smooth values, constant indices) is `Parts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Const:
    """A value that does not depend on x: one node (or a Python constant) of the new graph."""

    value: object


class Series:
    """Normalized Taylor coefficients of a value that depends on x: nodes, or None (zero)."""

    __slots__ = ("cs",)

    def __init__(self, cs):
        self.cs = list(cs)

    def __getitem__(self, j):
        return self.cs[j] if j < len(self.cs) else None

    def nonzero(self, start=0):
        """Indices j ≥ start of the coefficients that are not known zeros."""
        return [j for j in range(start, len(self.cs)) if self.cs[j] is not None]


class Parts:
    """A tuple-valued node whose elements differ in kind (topk: smooth values, constant indices)."""

    __slots__ = ("items",)

    def __init__(self, items):
        self.items = list(items)


class Unsupported(Exception):
    """Raised by a rule that cannot handle these arguments: the op falls back on nested AD."""


def is_series(a) -> bool:
    """Whether a mapped argument depends on x (a `Series`)."""
    return isinstance(a, Series)


def cval(a):
    """The node or Python value of a constant argument (a `Const` unwrapped, anything else as is)."""
    return a.value if isinstance(a, Const) else a


def map_structure(x, fn):
    """fn applied to every leaf of nested lists and tuples."""
    if isinstance(x, (list, tuple)):
        return type(x)(map_structure(e, fn) for e in x)
    return fn(x)


def series_args(args, kwargs):
    """The Series among the (nested) arguments of a node."""
    found = []

    def visit(x):
        if is_series(x):
            found.append(x)
        return x

    map_structure(list(args), visit)
    map_structure(list(kwargs.values()), visit)
    return found


def stack_coefficients(cs):
    """torch.stack of coefficients, broadcast to one shape first (a coefficient may be smaller
    than the value it belongs to: c + x for a constant c keeps x's shape from c_1 on)."""
    return torch.stack(torch.broadcast_tensors(*cs))


def add_to_first(stack, value):
    """`value` added to the first entry of a stack of coefficients only (c_0: a bias)."""
    return torch.cat([(stack[0] + value).unsqueeze(0), stack[1:]])


def cat_coefficient_rows(cs):
    """The coefficients (2-D) broadcast to one shape and concatenated along the rows."""
    return torch.cat(torch.broadcast_tensors(*cs))


def pieces_of(stacked_pieces, i):
    """Coefficient i of every piece of a split stack: the split of that coefficient."""
    return tuple(p[i] for p in stacked_pieces)
