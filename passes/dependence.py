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


def _floating(node: fx.Node) -> bool:
    v = val(node)
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


_SHAPE_OF_SECOND = {torch.ops.aten.expand_as.default, torch.ops.aten.view_as.default, torch.ops.aten.reshape_as.default,
                    torch.ops.aten.type_as.default}


def stream_dependent(graph: fx.Graph, source: fx.Node) -> set[fx.Node]:
    """Nodes computed from the token values through the residual stream.

    The stream starts where token ids read a parameter (embedding lookups). Integer and boolean
    values computed from the ids alone — padding masks (`ids != pad`), position ids — and their
    float casts are side inputs, like masks computed from the shape: constants for the jets.
    Integer values computed from the stream (expert routing) stay dependent. A floating input
    (a model of float features: a ViT, a residual MLP) is the stream's start itself.
    """
    tokens = value_dependent(graph, source)
    if _floating(source):
        return tokens
    dep = {source}
    stream: set[fx.Node] = set()
    for node in graph.nodes:
        if node not in tokens or node is source:
            continue
        inputs = node.all_input_nodes
        if node.op == "call_function" and node.target in _SHAPE_OF_SECOND and node.args:
            inputs = [node.args[0]] if isinstance(node.args[0], fx.Node) else []  # the second is read for its shape
        if any(a in stream for a in inputs):
            stream.add(node)
        elif _floating(node) and any(a in tokens and not _floating(a) for a in inputs) \
                and any(a not in tokens and (a.op == "get_attr" or _floating(a)) for a in inputs):
            stream.add(node)  # a lookup of token values into a floating parameter: the encoder
            frontier = [a for a in inputs if a in tokens]
            while frontier:  # the ids' views and slices that lead to the lookup
                a = frontier.pop()
                if a not in dep:
                    dep.add(a)
                    frontier.extend(b for b in a.all_input_nodes if b in tokens)
    return dep | stream
