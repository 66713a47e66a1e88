"""Clean-up passes for exported graphs.

torch.export leaves nodes in the graph that only make sense at trace time: metadata asserts that
pin dtype and device, and eval-mode dropouts that are identities. Removing them keeps the graphs
small, readable and movable between devices.
"""

from __future__ import annotations

from torch import fx

from ._graph import aten, is_identity_like


def drop_metadata_asserts(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove `_assert_tensor_metadata` nodes: they pin the device the graph was traced on."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def drop_eval_dropout(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace eval-mode `dropout(x, p, False)` by `x`."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten.dropout.default and is_identity_like(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def clean(gm: fx.GraphModule) -> fx.GraphModule:
    """All clean-ups, then dead-code elimination."""
    drop_metadata_asserts(gm)
    drop_eval_dropout(gm)
    gm.graph.eliminate_dead_code(is_impure_node=_keeps_guards)
    gm.recompile()
    return gm


def _keeps_guards(node: fx.Node) -> bool:
    # `_guards_fn` checks input shapes against the exported range: it has no users but must stay.
    return node.op == "call_module" or node.is_impure()
