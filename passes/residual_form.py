"""Bring a traced graph into residual form h_{s+1} = h_s + γ(h_s) where it is not written that way.

Two exact rewrites, applied until the stream between residual additions holds nothing but casts:

- Reshaped streams (OPT flattens the stream to (B·T, d) around its MLP): `add(reshape(h), b)`
  becomes `reshape(add(h, reshape(b, shape of h)))` — reshapes are linear, so this is exact — and
  the reshape round trip left between additions is the identity.
- Sums without a plain skip term, h ← α⊙h + f(h) (Doge), become h + (α⊙h + f(h) − h) alike.
- Post-norm layers h ← N(h + f(h)) (BERT, RoBERTa, BART/Marian/… decoders, openai-gpt, XLNet,
  OPT with post-norm): the step's output y = N(h + f(h)) becomes h + (y − h), i.e. the layer is
  the block γ(h) = N(h + f(h)) − h, so the stream stays a sum and every expansion stays exact.
  The block reads h like any other block; its jets go through the norm.

Both change the graph in place (new nodes carry `meta["val"]` and the module of the node they
stand for) and return a description of what they did, kept in `ResidualStructure.rewrites`.
"""

from __future__ import annotations

from torch import fx

from jetfx.errors import StructureError

from ._graph import aten, is_identity_like, is_residual_add, module_path, val
from .stream import RESHAPE_OPS, is_cast_of, is_round_trip, same_shape, stream_chain

MAX_REWRITES = 10_000


def to_residual_form(gm: fx.GraphModule, source: fx.Node, logits: fx.Node) -> list[str]:
    """Rewrite `gm` in place until every segment between residual additions is the identity."""
    done: list[str] = []
    limit = None
    for _ in range(MAX_REWRITES):
        sc = stream_chain(gm.graph, source, logits)
        limit = len(sc.chain) if limit is None else limit  # each rewrite removes a segment of the chain
        if len(done) > limit:
            raise StructureError(f"rewriting the graph into residual form did not converge ({done[-1]}); "
                                 "this is a bug in jetfx, please report it with the model")
        join = _scaled_residual(sc)
        if join is not None:
            done.append(_fold_post_norm(gm, *join, scaled=True))
            continue
        step = None
        for i, (r, segment) in enumerate(sc.segments()):
            if is_round_trip(r, segment):
                continue
            step = (i, r, segment)
            break
        if step is None:
            break
        i, r, segment = step
        skip = sc.adds[i][1]
        next_add = sc.adds[i + 1][0]
        if all(is_identity_like(n) or n.target in RESHAPE_OPS for n in segment):
            done.append(_sink_reshape(gm, next_add, segment[-1], r))
        elif same_shape(skip, segment[-1]):
            done.append(_fold_post_norm(gm, skip, segment[-1], r))
        else:
            break  # the residual analysis names the op it cannot handle
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _scaled_residual(sc):
    """A sum on the stream with no plain skip term: h ← α⊙h + f(h) (Doge's learned residual scale) or
    a norm of it (DeepNorm). Returns (h, y, y) for `_fold_post_norm`, or None."""
    residual = {r for r, _, _ in sc.adds}
    for i, n in enumerate(sc.chain[1:], start=1):
        if n in residual or not is_residual_add(n) or i < 2:
            continue
        a, b = n.args[0], n.args[1]
        h = sc.chain[i - 1]
        if is_cast_of(a, {h}, sc.dep) or is_cast_of(b, {h}, sc.dep):
            continue  # a plain skip term the residual analysis did not accept: folding would not help
        if a in sc.dep and b in sc.dep and same_shape(h, n) and val(h) is not None and val(h).is_floating_point():
            return h, n, n
    return None


def _like(node: fx.Node, *, value_of: fx.Node, module_of: fx.Node) -> fx.Node:
    node.meta["val"] = val(value_of)
    if "nn_module_stack" in module_of.meta:
        node.meta["nn_module_stack"] = dict(module_of.meta["nn_module_stack"])
    return node


def _sizes(graph: fx.Graph, like: fx.Node) -> list:
    v = val(like)
    return [d if isinstance(d, int) else graph.call_function(aten.sym_size.int, (like, i)) for i, d in enumerate(v.shape)]


def _sink_reshape(gm: fx.GraphModule, add: fx.Node, view: fx.Node, stream: fx.Node) -> str:
    """add(view(h), b) → view(add(h, b reshaped like h)): the stream keeps h's shape."""
    graph = gm.graph
    b = add.args[1] if add.args[0] is view else add.args[0]
    with graph.inserting_before(add):
        back = _like(graph.call_function(aten.reshape.default, (b, _sizes(graph, stream))), value_of=stream, module_of=add)
        summed = _like(graph.call_function(aten.add.Tensor, (stream, back)), value_of=stream, module_of=add)
        out = _like(graph.call_function(aten.reshape.default, (summed, _sizes(graph, view))), value_of=add, module_of=add)
    add.replace_all_uses_with(out)
    graph.erase_node(add)
    return f"{module_path(out) or out.name}: the stream is reshaped around the block; the sum is taken in its own shape"


def _fold_post_norm(gm: fx.GraphModule, h: fx.Node, y: fx.Node, add: fx.Node, scaled: bool = False) -> str:
    """y = N(h + f(h)) → h + (y − h): the block γ(h) = N(h + f(h)) − h."""
    graph = gm.graph
    users = [u for u in y.users]
    with graph.inserting_after(y):
        delta = _like(graph.call_function(aten.sub.Tensor, (y, h)), value_of=y, module_of=add)
    with graph.inserting_after(delta):
        new = _like(graph.call_function(aten.add.Tensor, (h, delta)), value_of=y, module_of=add)
    for u in users:
        u.replace_input_with(y, new)
    if scaled:
        return f"{module_path(add) or add.name}: the sum has no plain skip term, the block is γ(h) = (its sum) − h"
    norm = next((n for n in reversed(_between(add, y)) if not is_identity_like(n)), y)
    return (f"{module_path(add) or add.name}: post-norm, the block is γ(h) = {module_path(norm) or norm.name}(h + f(h)) − h")


def _between(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    nodes, n = [], end
    while n is not start and n.all_input_nodes:
        nodes.append(n)
        n = n.all_input_nodes[0]
    return list(reversed(nodes))
