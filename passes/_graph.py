"""Small facts about ATen ops and FX nodes that several passes share."""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
from torch import fx

aten = torch.ops.aten

# Ops that read only the shape, dtype or device of a tensor argument, never its values: a node
# consuming the stream through one of these does not depend on the stream's values.
SHAPE_ONLY_OPS = {
    aten.sym_size.int,
    aten.sym_size.default,
    aten.sym_numel.default,
    aten.sym_stride.int,
    aten.sym_stride.default,
    aten.sym_storage_offset.default,
    aten.new_ones.default,
    aten.new_zeros.default,
    aten.new_empty.default,
    aten.new_full.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.empty_like.default,
    aten.full_like.default,
    aten._assert_tensor_metadata.default,
}

# Ops whose output equals their first input in exact arithmetic (casts count: they only round).
IDENTITY_OPS = {
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
    aten.to.other,
    aten._to_copy.default,
    aten.type_as.default,
}


def is_identity_like(node: fx.Node) -> bool:
    """True when `node` passes its first argument through unchanged (up to rounding)."""
    if node.op != "call_function":
        return False
    if node.target in IDENTITY_OPS:
        return True
    if node.target is aten.dropout.default:  # dropout(x, p, train) in eval mode
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return train is False
    return False


def is_residual_add(node: fx.Node) -> bool:
    """An `add` of two tensors with unit scale: the only op a residual connection can be."""
    if node.op != "call_function" or node.target not in (aten.add.Tensor, operator.add):
        return False
    if len(node.args) < 2 or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return False
    alpha = node.kwargs.get("alpha", 1)
    return alpha == 1


def node_inputs(node: fx.Node) -> Iterator[fx.Node]:
    """Every node `node` reads, in argument order, each once."""
    seen = set()
    for a in node.all_input_nodes:
        if a not in seen:
            seen.add(a)
            yield a


def reads_values(user: fx.Node) -> bool:
    """Whether `user` reads the values (not only the metadata) of its tensor inputs."""
    if user.op == "call_function" and (user.target in SHAPE_ONLY_OPS or user.target is getattr):
        return False  # getattr reads `.device`/`.dtype`/`.shape` (see passes.device)
    if user.op == "call_module" and str(user.target).startswith("_guards"):
        return False
    return True


def replace_node(gm: fx.GraphModule, node: fx.Node, new: fx.Node) -> None:
    """Put `new` in `node`'s place: it takes node's metadata (shapes, module stack) and its users."""
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def val(node: fx.Node):
    """The example value recorded by torch.export (a FakeTensor, SymInt, tuple…) or None."""
    return node.meta.get("val", node.meta.get("example_value"))


def is_tensor_node(node: fx.Node) -> bool:
    v = val(node)
    return isinstance(v, torch.Tensor)


def module_path(node: fx.Node) -> str | None:
    """Dotted path of the innermost nn.Module that produced `node`, from export metadata."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    if not isinstance(path, str) or path.startswith("_empty_nn_module_stack"):
        return None
    return path


def nodes_by_name(graph: fx.Graph) -> dict[str, fx.Node]:
    return {n.name: n for n in graph.nodes}


def output_node(graph: fx.Graph) -> fx.Node:
    for n in reversed(graph.nodes):
        if n.op == "output":
            return n
    raise ValueError("graph has no output node")


def first_output_value(graph: fx.Graph) -> fx.Node:
    """The node producing the (first) output tensor of a graph."""
    out = output_node(graph).args[0]
    while isinstance(out, (tuple, list)):
        if not out:
            raise ValueError("graph returns an empty tuple")
        out = out[0]
    if isinstance(out, dict):
        out = out.get("logits", next(iter(out.values())))
    if not isinstance(out, fx.Node):
        raise ValueError("graph does not return a tensor")
    return out


def fetch_attr(module: torch.nn.Module, target: str):
    """The attribute a `get_attr` node names (a dotted path: "model.lm_head.weight")."""
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
