"""The residual stream of a traced graph: the dominator chain from the tokens to the logits and the
residual additions on it. Shared by residual analysis (`passes.residual`) and the rewrites that
bring a graph into residual form first (`passes.residual_form`).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
from torch import fx

from ._graph import aten, is_identity_like, is_residual_add, val
from .dependence import stream_dependent

# shape-only views of the stream: a chain of them that ends in the shape it started from is the identity
RESHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
               aten.unflatten.int}


@dataclass
class StreamChain:
    dep: set  # nodes depending on the token values
    graph: nx.DiGraph  # data flow among them
    chain: list  # dominators of the logits, tokens first
    adds: list  # (residual add, skip = stream node before it, [branch outputs])

    @property
    def position(self) -> dict:
        return {n: i for i, n in enumerate(self.chain)}

    def segments(self):
        """(add r_i, nodes after r_i up to and including the next stream node) for consecutive adds."""
        pos = self.position
        for (r, _, _), (_, skip, _) in zip(self.adds, self.adds[1:]):
            yield r, self.chain[pos[r] + 1: pos[skip] + 1]


def stream_chain(graph: fx.Graph, source: fx.Node, logits: fx.Node) -> StreamChain:
    dep = stream_dependent(graph, source)
    G = nx.DiGraph()
    G.add_nodes_from(dep)
    for n in dep:
        for u in n.users:
            if u in dep:
                G.add_edge(n, u)
    chain = dominator_chain(G, source, logits) if logits in dep else [source]
    adds = []
    for i, n in enumerate(chain[1:], start=1):
        if not is_residual_add(n):
            continue
        prev = chain[i - 1]
        same = {prev}  # chain nodes equal to prev: the casts leading to it (Mamba adds a cast of the stream)
        j = i - 1
        while j > 0 and is_identity_like(chain[j]) and chain[j].args[0] is chain[j - 1]:
            same.add(chain[j - 1])
            j -= 1
        leaves = sum_leaves(n, same, dep)
        skips = [x for x in leaves if is_cast_of(x, same, dep)]
        if len(skips) == 1 and len(leaves) > 1 and all(x in dep for x in leaves):
            adds.append((n, prev, [x for x in leaves if x is not skips[0]]))
    return StreamChain(dep, G, chain, adds)


def dominator_chain(G: nx.DiGraph, source: fx.Node, sink: fx.Node) -> list[fx.Node]:
    idom = nx.immediate_dominators(G, source)
    chain = [sink]
    node = sink
    while node is not source:
        parent = idom.get(node)
        if parent is None or parent is node:
            break
        chain.append(parent)
        node = parent
    chain.reverse()
    return chain


def is_cast_of(node: fx.Node, targets: set[fx.Node], dep: set[fx.Node]) -> bool:
    """`node` is one of `targets`, or casts of one (identity-like ops: to, type_as, clone…)."""
    while True:
        if node in targets:
            return True
        if not (is_identity_like(node) and isinstance(node.args[0], fx.Node) and node.args[0] in dep):
            return False
        node = node.args[0]


def strip_casts(node: fx.Node, dep: set[fx.Node]) -> fx.Node:
    while is_identity_like(node) and isinstance(node.args[0], fx.Node) and node.args[0] in dep:
        node = node.args[0]
    return node


def sum_leaves(node: fx.Node, stream: set[fx.Node], dep: set[fx.Node]) -> list[fx.Node]:
    """The terms of a residual sum: `(h + attn) + mlp` (Cohere's shared-norm parallel block) has the
    leaves h, attn and mlp. Partial sums are opened while they contain the stream (`stream`: the
    stream node and its casts) as a term."""
    if node not in stream and node in dep and is_residual_add(node) and node.args[0] is not node.args[1]:
        if _contains(node, stream, dep):
            return sum_leaves(node.args[0], stream, dep) + sum_leaves(node.args[1], stream, dep)
    return [node]


def _contains(node: fx.Node, stream: set[fx.Node], dep: set[fx.Node]) -> bool:
    frontier, seen = [node], set()
    while frontier:
        n = frontier.pop()
        if is_cast_of(n, stream, dep):
            return True
        n = strip_casts(n, dep)
        if n in seen or not is_residual_add(n):
            continue
        seen.add(n)
        frontier.extend(a for a in n.args[:2] if isinstance(a, fx.Node))
    return False


def same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = val(a), val(b)
    if va is None or vb is None or not hasattr(va, "shape") or not hasattr(vb, "shape"):
        return False
    return len(va.shape) == len(vb.shape) and all(str(x) == str(y) for x, y in zip(va.shape, vb.shape))


def is_round_trip(start: fx.Node, segment: list[fx.Node]) -> bool:
    """Casts and reshapes of the stream that end in the shape it had at `start`: the identity."""
    return all(is_identity_like(n) or (n.op == "call_function" and n.target in RESHAPE_OPS) for n in segment) \
        and (not segment or same_shape(start, segment[-1]))
