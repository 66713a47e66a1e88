"""Clean-up passes for exported graphs.

torch.export leaves nodes in the graph that only make sense at trace time: metadata asserts that
pin dtype and device, and eval-mode dropouts that are identities; and in-place ops on fresh
tensors (Falcon sums its branches with `+=`, MoE layers fill an `empty_like` with `index_put_`),
which become their out-of-place forms so that residual sums are plain `add`s. Removing them keeps the graphs
small, readable and movable between devices.
"""

from __future__ import annotations

import operator

from torch import fx

from ._graph import aten, is_identity_like, replace_node


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


# ops whose output aliases their input: mutating it mutates a tensor other nodes read
_VIEW_OPS = {aten.view.default, aten.slice.Tensor, aten.select.int, aten.transpose.int, aten.permute.default,
             aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
             aten.t.default, aten.narrow.default, aten.diagonal.default, aten.as_strided.default, aten.alias.default,
             aten.unfold.default, aten._unsafe_view.default, aten.split.Tensor, aten.split_with_sizes.default,
             aten.chunk.default, aten.unbind.int, aten.reshape.default, aten.flatten.using_ints,
             aten.unflatten.int, aten.movedim.int, aten.view_as_real.default, aten.view_as_complex.default}


def _inplace(node: fx.Node):
    """(functional overload) for an in-place ATen op `op_(x, …)`, else None."""
    if node.op != "call_function" or not hasattr(node.target, "overloadpacket"):
        return None
    name = node.target.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_") or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    return getattr(getattr(aten, name[:-1], None), node.target._overloadname, False)


def _replaceable(node: fx.Node, functional, order: dict) -> bool:
    """A fresh tensor (not a view, input, parameter or buffer) that nothing reads after the op."""
    target = node.args[0]
    base = target
    while base.op == "call_function" and base.target is operator.getitem:
        base = base.args[0]
    return (bool(functional) and target.op == "call_function" and node.target.overloadpacket.__name__ != "copy_"
            and base.target not in _VIEW_OPS
            and not any(order[u] > order[node] for u in target.users if u is not node))


def functionalize_inplace(gm: fx.GraphModule) -> fx.GraphModule:
    """`op_(x, …)` → `op(x, …)` where x is a fresh tensor nothing reads after the op (Falcon's
    `mlp += attn`, MoE's `index_put_` into an `empty_like`). Mutations of views stay: see
    `has_mutations`."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        functional = _inplace(node)
        if functional is None or not _replaceable(node, functional, order):
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(functional, node.args, node.kwargs)
        replace_node(gm, node, new)
    gm.recompile()
    return gm


def has_mutations(gm: fx.GraphModule) -> bool:
    """In-place ops `functionalize_inplace` cannot remove (writes into slices of a buffer: chunked
    scans): data flow no longer shows what depends on what, the graph must be functionalized."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return any(_inplace(n) is not None and not _replaceable(n, _inplace(n), order) for n in gm.graph.nodes)


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
