"""Make an exported graph device-agnostic.

torch.export bakes the tracing device into the graph (`arange(..., device=cpu)`,
`to(..., device=cpu)`), so `.to("cuda")` alone does not make an exported module run on a GPU.
This pass replaces every constant `torch.device` in node arguments by the device of the token
input, read at run time: the graph then runs wherever its parameters and inputs are.
"""

from __future__ import annotations

import torch
from torch import fx


def _has_device(obj) -> bool:
    if isinstance(obj, torch.device):
        return True
    if isinstance(obj, (list, tuple)):
        return any(_has_device(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_device(o) for o in obj.values())
    return False


def _replace_device(obj, device_node):
    if isinstance(obj, torch.device):
        return device_node
    if isinstance(obj, tuple):
        return tuple(_replace_device(o, device_node) for o in obj)
    if isinstance(obj, list):
        return [_replace_device(o, device_node) for o in obj]
    if isinstance(obj, dict):
        return {k: _replace_device(v, device_node) for k, v in obj.items()}
    return obj


def make_device_agnostic(gm: fx.GraphModule, anchor: str | None = None) -> fx.GraphModule:
    """Replace constant devices by `anchor.device` (default: the first placeholder).

    Returns `gm`, modified in place and recompiled. A graph without placeholders is left alone.
    Subgraphs of higher-order ops (some torch versions export `wrap_with_autocast` around rotary
    embeddings) get the same treatment, anchored at their first tensor input.
    """
    for _, sub in list(gm.named_modules()):
        if sub is not gm and isinstance(sub, fx.GraphModule):
            inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
            tensors = [n for n in inputs if isinstance(n.meta.get("val", n.meta.get("example_value")), torch.Tensor)]
            tensors = tensors or inputs[:1]
            if tensors:
                _replace_in_graph(sub, tensors[0])
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return gm
    anchor_node = next((p for p in placeholders if p.name == anchor), placeholders[0])
    return _replace_in_graph(gm, anchor_node)


def _replace_in_graph(gm: fx.GraphModule, anchor_node: fx.Node) -> fx.GraphModule:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    targets = [n for n in graph.nodes if n.op != "placeholder" and (_has_device(n.args) or _has_device(n.kwargs))]
    if not targets:
        return gm
    with graph.inserting_after(placeholders[-1]):
        device_node = graph.call_function(getattr, (anchor_node, "device"))
        device_node.name = "device"
    for n in targets:
        n.args = _replace_device(n.args, device_node)
        n.kwargs = _replace_device(n.kwargs, device_node)
    gm.recompile()
    return gm


def constant_devices(gm: fx.GraphModule) -> list[str]:
    """Names of nodes, subgraphs included, that still carry a constant device (empty after the pass)."""
    return [f"{prefix}{'.' if prefix else ''}{n.name}" for prefix, m in gm.named_modules()
            if isinstance(m, fx.GraphModule) for n in m.graph.nodes if _has_device(n.args) or _has_device(n.kwargs)]
