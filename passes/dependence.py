"""Which nodes of a graph depend on the *values* of the token input.

Masks, rotary tables and position ids are computed from the token tensor's shape only: they are
constants for the jets (side inputs). Only value dependence puts a node on the residual path.
"""

from __future__ import annotations

import torch
from torch import fx

from ._graph import reads_values, val


def _is_symbolic_scalar(node: fx.Node) -> bool:
    v = val(node)
    return isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def value_dependent(graph: fx.Graph, source: fx.Node) -> set[fx.Node]:
    """Nodes whose value changes when the values (not the shape) of `source` change."""
    dep = {source}
    for node in graph.nodes:
        if node is source or node.op in ("placeholder", "get_attr", "output"):
            continue
        if not reads_values(node) or _is_symbolic_scalar(node):
            continue
        if any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return dep
