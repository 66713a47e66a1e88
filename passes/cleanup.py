"""Clean-up passes for exported graphs.

torch.export leaves nodes in the graph that only make sense at trace time: metadata asserts that
pin dtype and device, and eval-mode dropouts that are identities; and in-place ops on fresh
tensors (Falcon sums its branches with `+=`, MoE layers fill an `empty_like` with `index_put_`),
which become their out-of-place forms so that residual sums are plain `add`s. Removing them keeps the graphs
small, readable and movable between devices.
"""

from __future__ import annotations

from torch import fx

from ._graph import aten, is_identity_like


def drop_metadata_asserts(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove `_assert_tensor_metadata` nodes: they pin the device the graph was traced on."""
    for _, sub in list(gm.named_modules()):  # higher-order ops' subgraphs carry them too
        if not isinstance(sub, fx.GraphModule):
            continue
        for node in list(sub.graph.nodes):
            if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
                sub.graph.erase_node(node)
        sub.recompile()
    return gm


def drop_eval_dropout(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace eval-mode `dropout(x, p, False)` by `x`."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten.dropout.default and is_identity_like(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def functionalize_inplace(gm: fx.GraphModule) -> fx.GraphModule:
    """`op_(x, …)` → `op(x, …)` where nothing reads `x` after the op (export's fresh buffers)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not hasattr(node.target, "overloadpacket"):
            continue
        name = node.target.overloadpacket.__name__
        if not name.endswith("_") or name.startswith("_") or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        functional = getattr(getattr(aten, name[:-1], None), node.target._overloadname, None)
        target = node.args[0]
        if functional is None or target.op != "call_function" or name == "copy_" \
                or any(order[u] > order[node] for u in target.users if u is not node):
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(functional, node.args, node.kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def clean(gm: fx.GraphModule) -> fx.GraphModule:
    """All clean-ups, then dead-code elimination."""
    drop_metadata_asserts(gm)
    functionalize_inplace(gm)
    drop_eval_dropout(gm)
    gm.graph.eliminate_dead_code(is_impure_node=_keeps_guards)
    gm.recompile()
    return gm


def _keeps_guards(node: fx.Node) -> bool:
    # `_guards_fn` checks input shapes against the exported range: it has no users but must stay.
    return node.op == "call_module" or node.is_impure()
