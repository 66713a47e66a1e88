"""Partial evaluation: split a graph into what does and what does not depend on some of its attributes.

`split_at_attributes(root, graph, targets)` returns two GraphModules:

- `prefix(*inputs)` computes every value that does not depend on the attributes `targets` and that
  the rest of the graph reads (the *frontier*), once;
- `suffix(*attributes, *frontier)` computes the rest from the attributes' values, given as inputs.

Fitting jet weights evaluates an expansion many times with different weights on the same tokens:
the prefix (the model's forward pass and every jet whose center does not depend on a weight) runs
once per input, the suffix (weight products and the jets downstream of them) at every step of the
optimizer, differentiably. Placeholders read by the suffix are passed through the prefix.
"""

from __future__ import annotations

from torch import fx

__all__ = ["split_at_attributes"]


def split_at_attributes(root, graph: fx.Graph, targets, *, consume: bool = False
                        ) -> tuple[fx.GraphModule, fx.GraphModule, int]:
    """(prefix, suffix, number of frontier values) of `graph` for its attributes `targets`.

    `root` holds the attributes (a module, or a dict as for `fx.GraphModule`). A node depends on the
    attributes when one of its inputs does (get_attr nodes of `targets` are the sources). The
    suffix's inputs are the attributes, in the order of `targets`, then the frontier values, in the
    order the prefix returns them. `consume=True` turns `graph` itself into the prefix's graph
    (no copy of a graph that is thrown away anyway).
    """
    targets = list(targets)
    sources = {t: [n for n in graph.nodes if n.op == "get_attr" and n.target == t] for t in targets}
    missing = [t for t, ns in sources.items() if not ns]
    if missing:
        raise KeyError(f"the graph reads no attribute named {missing}")
    dependent: set[fx.Node] = {n for ns in sources.values() for n in ns}
    output = next(n for n in graph.nodes if n.op == "output")
    for node in graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)

    # the frontier: values computed without the attributes that dependent nodes (or the output) read
    frontier: list[fx.Node] = []
    seen = set()
    for node in graph.nodes:
        if node in dependent or node.op == "output":
            continue
        readers = [u for u in node.users if u in dependent or u is output]
        if readers and node.op != "get_attr" and node not in seen:
            seen.add(node)
            frontier.append(node)

    suffix_graph = fx.Graph()
    senv: dict[fx.Node, fx.Node] = {}
    for t in targets:
        ph = suffix_graph.placeholder(_name(t))
        for n in sources[t]:
            senv[n] = ph
    for i, n in enumerate(frontier):
        ph = suffix_graph.placeholder(f"frontier_{i}")
        ph.meta = dict(n.meta)
        senv[n] = ph
    for node in graph.nodes:
        if node in senv:
            continue
        if node.op == "get_attr" and any(u in dependent for u in node.users):
            senv[node] = suffix_graph.node_copy(node)
        elif node in dependent:
            senv[node] = suffix_graph.node_copy(node, lambda a: senv[a])
        elif node.op == "output":
            suffix_graph.output(fx.node.map_arg(node.args[0], lambda a: senv[a]))
    suffix = fx.GraphModule(root, suffix_graph, class_name="Suffix")

    # the prefix: the graph itself (consume=True: it is not needed afterwards) or a copy
    if consume:
        prefix_graph, env = graph, {n: n for n in graph.nodes}
    else:
        prefix_graph, env = fx.Graph(), {}
        prefix_graph.graph_copy(graph, env)
    for node in list(prefix_graph.nodes):
        if node.op == "output":
            prefix_graph.erase_node(node)
    prefix_graph.output(tuple(env[n] for n in frontier))
    # before the module is made (made once: its code is generated once); submodules are pure here
    prefix_graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "call_module" and n.is_impure())
    prefix = fx.GraphModule(root, prefix_graph, class_name="Prefix")
    return prefix, suffix, len(frontier)


def _name(target: str) -> str:
    return "w_" + target.replace(".", "_")
