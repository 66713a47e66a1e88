"""Extract a block (or the decoder) of a traced graph into a GraphModule of its own.

The extracted module computes `f(x, *side)`: `x` replaces the block's stream input, `side` are the
nodes of the parent graph the block reads that do not depend on the stream (masks, rotary tables,
symbolic sizes). Parameters are shared with the parent by reference, not copied.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import fx


@dataclass(frozen=True)
class Region:
    module: fx.GraphModule  # forward(x, *side) -> output
    stream_input: str  # parent node replaced by `x`
    side_inputs: tuple[str, ...]  # parent nodes to pass after `x`, in order
    output: str  # parent node computed by the region


def extract_region(gm: fx.GraphModule, stream_input: str, output: str, nodes: Iterable[str]) -> Region:
    """Copy the nodes named `nodes` (which must include `output`) into a new GraphModule."""
    wanted = set(nodes) | {output}
    parent_nodes = [n for n in gm.graph.nodes if n.name in wanted]
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    x = g.placeholder("x")
    env[stream_input] = x
    side: list[str] = []
    # placeholders first: every outside value the region reads
    for n in parent_nodes:
        for a in n.all_input_nodes:
            if a.name in env or a.name in wanted or a.op == "get_attr":
                continue
            ph = g.placeholder(a.name)
            ph.meta = dict(a.meta)
            env[a.name] = ph
            side.append(a.name)
    for n in parent_nodes:
        for a in n.all_input_nodes:
            if a.name not in env and a.op == "get_attr":
                attr = g.get_attr(a.target)
                attr.meta = dict(a.meta)
                env[a.name] = attr
        env[n.name] = g.node_copy(n, lambda a: env[a.name])
    g.output(env[output])
    module = fx.GraphModule(gm, g, class_name="Region")
    return Region(module=module, stream_input=stream_input, side_inputs=tuple(side), output=output)
