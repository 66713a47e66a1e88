"""Residual analysis: find encoder, residual stream, blocks and decoder from the graph alone.

No per-architecture adapter: the stream is read off the data-flow graph.

1. Keep the nodes whose values depend on the token values (`dependence.value_dependent`).
2. The nodes every token-to-logits path passes through are the dominators of the logits node;
   they form a chain ids → … → logits.
3. A chain node `add(p, b)` whose one operand `p` is its predecessor on the chain and whose other
   operand `b` is computed from `p` is a residual connection: `p` is the stream node h_s and `b`
   the residual branch. Between one residual add and the next stream node only identity-like ops
   (casts, eval dropouts) may stand.
4. A branch that is itself a sum of terms each computed from h_s (GPT-NeoX's parallel attention
   and MLP) splits into one block per term, when the terms come from different modules.
5. A block's subgraph is every node between its stream node and its output. Its name comes from
   `nn_module_stack`: the child module, under the nodes' common module path, that holds most of
   the block's parameters (`h.3.attn`, `layers.3.mlp`).

The result is a `jetfx.structure.ResidualStructure`; each node also gets `node.meta["jetfx"]`
saying its role (encoder, stream, block, side, decoder).
"""

from __future__ import annotations

import operator
import warnings

import networkx as nx
import torch
from torch import fx

from jetfx.errors import StructureError
from jetfx.structure import Block, Decoder, Encoder, ResidualStructure, Step

from ._graph import aten, fetch_attr, first_output_value, is_identity_like, is_residual_add, module_path, val
from .residual_form import to_residual_form
from .stream import is_round_trip, stream_chain
from .stream import same_shape as _same_shape

ATTENTION_OPS = {
    aten.scaled_dot_product_attention.default,
    aten._softmax.default,
    aten.softmax.int,
    aten._safe_softmax.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default,
}
MATMUL_OPS = {aten.linear.default, aten.mm.default, aten.matmul.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
# Ops linear in their (single) stream-dependent tensor argument, when the other tensor arguments
# are constants. Used to tell linear blocks (linear residual networks) from the rest.
_LINEAR_SHAPE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.expand.default, aten.slice.Tensor, aten.select.int, aten.flatten.using_ints,
    aten.unflatten.int, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
    aten.neg.default, aten.sum.dim_IntList, aten.mean.dim, aten.repeat.default, aten.index_select.default,
    aten.index.Tensor, operator.getitem,
}
_SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}


def _dep_args(node: fx.Node, dep: set[fx.Node]) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a in dep]


def _is_linear_op(node: fx.Node, dep: set[fx.Node]) -> bool:
    """Linear (not merely affine) in its stream-dependent argument."""
    if node.op != "call_function":
        return False
    deps = _dep_args(node, dep)
    if is_identity_like(node) or node.target in _LINEAR_SHAPE_OPS:
        return node.target is not aten.index.Tensor or (bool(deps) and deps[0] is node.args[0])
    if node.target is aten.cat.default:
        return True  # only linear if all parts are; checked by the caller walking every node
    if node.target in _SCALE_OPS:
        if node.target in (aten.div.Tensor, aten.div.Scalar):
            return len(deps) == 1 and node.args[0] is deps[0]
        return len(deps) == 1
    if node.target in (aten.linear.default,):
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return len(deps) == 1 and node.args[0] is deps[0] and bias is None
    if node.target in (aten.mm.default, aten.matmul.default, aten.bmm.default):
        return len(deps) == 1
    if node.target in (aten.add.Tensor, aten.sub.Tensor):
        # sum of two stream-dependent linear parts is linear; adding a constant is not
        return len([a for a in node.args[:2] if isinstance(a, fx.Node) and a in dep]) == 2
    return False



def _where(n: fx.Node) -> str:
    if n.op == "placeholder":
        return f"'{n.name}' (the input)"
    path = module_path(n)
    return f"'{n.name}' ({n.target}" + (f", in module {path})" if path else ")")


def _no_stream(chain: list[fx.Node], G: nx.DiGraph) -> str:
    """Why there is no residual stream, naming where the tokens-to-logits chain has its widest gap."""
    text = ("no residual stream found: on the path from the tokens to the logits there is no `add` whose one "
            "operand is the stream and whose other is computed from it")
    gaps = [(len(nx.descendants(G, a) & nx.ancestors(G, b)), a, b) for a, b in zip(chain, chain[1:])]
    if gaps:
        size, a, b = max(gaps, key=lambda g: g[0])
        if size > 0:
            text += (f". Between {_where(a)} and {_where(b)} the computation runs along {size} nodes that no "
                     "single node separates, "
                     "so no residual addition h + γ(h) lies on all paths: layers that also read the tokens or the "
                     "embedding by another route (per-layer inputs, several copies of the stream, attention over all "
                     "layers' outputs) leave no single residual stream to expand")
    return text + (". jetfx expands residual networks h_{l+1} = h_l + γ(h_l) (a plain MLP or a model without skip "
                   "connections cannot be jet-expanded)")


def _summands(node: fx.Node, stream: fx.Node, dep: set[fx.Node], G: nx.DiGraph) -> list[fx.Node]:
    """Split a branch output that is a sum of stream-dependent terms (parallel residual)."""
    if is_residual_add(node) and len(node.users) == 1:
        a, b = node.args[0], node.args[1]
        if a in dep and b in dep and a is not stream and b is not stream:
            return _summands(a, stream, dep, G) + _summands(b, stream, dep, G)
    return [node]


def _region(G: nx.DiGraph, stream: fx.Node, out: fx.Node, after_stream: set[fx.Node]) -> set[fx.Node]:
    return (nx.ancestors(G, out) & after_stream) | {out}


def _short_name(qualname: str) -> str:
    parts = qualname.split(".")
    for i, p in enumerate(parts):
        if p.isdigit() and i >= 1:
            return ".".join(parts[i - 1 :])
    return qualname


class _Namer:
    """Names blocks after the module (under the common module path) holding most parameters."""

    def __init__(self, gm: fx.GraphModule, strip_prefix: str, dep: set[fx.Node] = frozenset()):
        self.gm = gm
        self.strip = strip_prefix
        self.dep = dep

    def path(self, node: fx.Node) -> str | None:
        p = module_path(node)
        if p is None:
            return None
        if self.strip and (p == self.strip.rstrip(".") or p.startswith(self.strip)):
            p = p[len(self.strip) :] if p.startswith(self.strip) else ""
        return p

    def params_behind(self, node: fx.Node, depth: int = 6) -> set[str]:
        """Parameters a constant input is made of: `get_attr` itself, or through a few ops on
        weights (TransformerLens reshapes W_Q, W_K, W_V before its matmuls)."""
        if node.op == "get_attr":
            return {node.target}
        if node.op != "call_function" or depth == 0 or node in self.dep:
            return set()
        return {t for a in node.all_input_nodes for t in self.params_behind(a, depth - 1)}

    def qualname(self, region: set[fx.Node]) -> str:
        paths = [(n, self.path(n)) for n in region]
        paths = [(n, p) for n, p in paths if p is not None]
        if not paths:
            return ""
        split = [p.split(".") if p else [] for _, p in paths]
        common: list[str] = []
        for parts in zip(*split):
            if all(x == parts[0] for x in parts):
                common.append(parts[0])
            else:
                break
        scores: dict[str, float] = {}
        for (n, _), parts in zip(paths, split):
            if len(parts) <= len(common):
                continue
            child = parts[len(common)]
            weight = 0.0
            for target in {t for a in n.all_input_nodes if a not in region for t in self.params_behind(a)}:
                try:
                    t = fetch_attr(self.gm, target)
                    weight += t.numel() if isinstance(t, torch.Tensor) else 0
                except AttributeError:
                    pass
            scores[child] = scores.get(child, 0.0) + weight + 1e-3  # node count breaks ties
        best = max(scores, key=scores.get) if scores else None
        # a block spanning several children of a Sequential/ModuleList, or several modules of similar
        # size (OPT's fc1 and fc2, BERT's intermediate and output), is named after the container
        share = scores[best] / sum(scores.values()) if best is not None else 0.0
        if best is not None and not (best.isdigit() and len(scores) > 1) and (share >= 0.75 or not common):
            # with the list index all of the chosen child's nodes share (XLM: attentions → attentions.0)
            under = [parts for parts in split if len(parts) > len(common) and parts[len(common)] == best]
            common = common + [best]
            for parts in zip(*[p[len(common):] for p in under]):
                if not all(x == parts[0] for x in parts) or not parts[0].isdigit():
                    break
                common.append(parts[0])
        return ".".join(common)


def find_residual_structure(gm: fx.GraphModule, token_input: str | None = None, strip_prefix: str = "") -> ResidualStructure:
    """Analyse `gm` (an exported ATen graph from tokens to logits) and annotate its nodes.

    `strip_prefix` is removed from module paths when naming blocks (the wrapper jetfx puts
    around Hugging Face models is called `model`). The steps are those of the module docstring.
    """
    source, logits = _token_input_and_logits(gm.graph, token_input)
    rewrites = to_residual_form(gm, source, logits)
    sc = stream_chain(gm.graph, source, logits)
    _check_residual_stream(sc, source, logits)
    steps, block_nodes = _residual_steps(gm, sc, strip_prefix)
    encoder = _encoder(gm.graph, sc, source)
    dec_nodes = _decoder_nodes(sc, logits)
    decoder = _decoder(gm, sc.adds[-1][0], logits, dec_nodes, sc.dep, gm.graph)
    structure = ResidualStructure(encoder=encoder, steps=steps, decoder=decoder,
                                  side_inputs=_side_inputs(gm.graph, block_nodes | dec_nodes, sc.dep),
                                  rewrites=tuple(rewrites))
    _annotate(gm.graph, structure, sc.dep)
    return structure


def _token_input_and_logits(graph: fx.Graph, token_input: str | None) -> tuple[fx.Node, fx.Node]:
    """The placeholder of the token ids (`token_input`, else the first) and the first tensor output:
    the two ends every residual path runs between."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise StructureError("the graph has no input: expected a token-id placeholder")
    source = next((p for p in placeholders if p.name == token_input), placeholders[0])
    try:
        logits = first_output_value(graph)
    except ValueError as e:
        raise StructureError(f"the graph has no tensor output to expand ({e})") from None
    return source, logits


def _check_residual_stream(sc, source: fx.Node, logits: fx.Node) -> None:
    """Refuse graphs without a residual stream jets can expand: logits that do not depend on the
    token values, no residual addition on the chain, or a stream transformed between two additions
    (only casts and reshape round trips may stand there once to_residual_form has folded post-norms
    into their blocks): h_{l+1} = h_l + γ(h_l) must hold exactly."""
    if logits not in sc.dep:
        raise StructureError(
            "the output of the graph does not depend on the values of the token input "
            f"'{source.name}', so there is no residual computation to expand"
        )
    if not sc.adds:
        raise StructureError(_no_stream(sc.chain, sc.graph))
    for r, segment in sc.segments():
        if not is_round_trip(r, segment):
            n = next(n for n in segment if not is_identity_like(n))
            raise StructureError(
                f"the residual stream is transformed between two residual additions by "
                f"'{n.name}' ({n.target}, in module {module_path(n) or '?'}) and jetfx could not rewrite it "
                "into residual form; jetfx needs h_{l+1} = h_l + γ(h_l) with nothing but casts in between"
            )


def _residual_steps(gm: fx.GraphModule, sc, strip_prefix: str) -> tuple[tuple[Step, ...], set[fx.Node]]:
    """One `Step` per residual addition with its blocks in graph order, indexed and named across the
    whole model; and the nodes of all blocks (whose constant inputs are the side inputs)."""
    namer = _Namer(gm, strip_prefix, sc.dep)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    steps: list[Step] = []
    block_nodes: set[fx.Node] = set()
    used_names: dict[str, int] = {}
    for s, (r, skip, branches) in enumerate(sc.adds):
        blocks = []
        for out, region, qual in sorted(_step_blocks(sc, namer, r, skip, branches), key=lambda t: order[t[0]]):
            _warn_stream_reads(region, out, skip, sc.dep)
            index = sum(len(step.blocks) for step in steps) + len(blocks)
            name = _unique_name(qual, index, used_names)
            blocks.append(_block(gm.graph, name, qual, index, s, skip, out, region, sc.dep))
            block_nodes |= region
        steps.append(Step(index=s, input=skip.name, output=r.name, blocks=tuple(blocks)))
    return tuple(steps), block_nodes


def _step_blocks(sc, namer: "_Namer", r: fx.Node, skip: fx.Node, branches) -> list[tuple]:
    """(output, region, module name) of each block of the step at residual add `r`.

    A branch that is a sum of terms each computed from the stream (GPT-NeoX's parallel attention and
    MLP) is one block per term when the terms come from different modules; terms of one module stay
    one block, and several branches of one module cannot be told apart."""
    dep, G = sc.dep, sc.graph
    after = nx.descendants(G, skip)
    outs = [o for branch in branches for o in _summands(branch, skip, dep, G)]
    regions = [_region(G, skip, o, after) for o in outs]
    names = [namer.qualname(reg) for reg in regions]
    if len(outs) > 1 and len(set(names)) < len(names):
        if len(branches) > 1:
            raise StructureError(
                f"the residual step at '{r.name}' (module {module_path(r) or '?'}) adds {len(outs)} branches that "
                "come from the same module; jetfx cannot tell them apart")
        outs, regions = [branches[0]], [_region(G, skip, branches[0], after)]
        names = [namer.qualname(regions[0])]
    return list(zip(outs, regions, names))


def _warn_stream_reads(region: set[fx.Node], out: fx.Node, skip: fx.Node, dep) -> None:
    """Warn when a block reads a token-dependent value other than its stream input (e.g. an earlier
    stream node): its jets treat that value as a constant, so say so."""
    for n in region:
        for a in n.all_input_nodes:
            if a in dep and a not in region and a is not skip:
                warnings.warn(
                    f"block output '{out.name}' reads '{a.name}', which is computed from "
                    "the tokens but is not its stream input; jets treat it as a constant",
                    stacklevel=4,  # the caller of find_residual_structure
                )


def _unique_name(qual: str, index: int, used: dict[str, int]) -> str:
    """The block's short name (`h.3.attn` → itself, or `block7` without a module); a repeated short
    name becomes the full module path, or `name#2`, `name#3`, … (`used` counts them)."""
    short = _short_name(qual) if qual else f"block{index}"
    if short in used:
        used[short] += 1
        short = qual if qual and qual not in used else f"{short}#{used[short]}"
    used.setdefault(short, 0)
    return short


def _block(graph: fx.Graph, name: str, qual: str, index: int, step: int, skip: fx.Node, out: fx.Node,
           region: set[fx.Node], dep) -> Block:
    """The `Block` of a region: its kind (attention, MLP, …) and whether it is linear in the stream."""
    return Block(name=name, qualname=qual or name, kind=_kind(region, dep, skip), index=index, step=step,
                 input=skip.name, output=out.name, nodes=tuple(n.name for n in graph.nodes if n in region),
                 linear=all(_is_linear_op(n, dep) for n in region))


def _encoder(graph: fx.Graph, sc, source: fx.Node) -> Encoder:
    """Everything from the token ids to the first stream node h_0; linear when it only embeds and
    reshapes (what lets a linear residual network's paths be exact products of matrices)."""
    h0 = sc.adds[0][1]
    nodes = (nx.ancestors(sc.graph, h0) | {h0}) - {source}
    linear = all(n.target is aten.embedding.default or is_identity_like(n)
                 or n.target in (aten.view.default, aten.reshape.default) for n in nodes)
    return Encoder(input=source.name, output=h0.name, nodes=tuple(n.name for n in graph.nodes if n in nodes),
                   linear=linear)


def _decoder_nodes(sc, logits: fx.Node) -> set[fx.Node]:
    """The decoder υ: every node after the last residual addition that the logits are computed from."""
    last = sc.adds[-1][0]
    return nx.descendants(sc.graph, last) & (nx.ancestors(sc.graph, logits) | {logits})


def _side_inputs(graph: fx.Graph, nodes: set[fx.Node], dep) -> tuple[str, ...]:
    """Inputs of blocks and decoder that do not depend on the tokens and are not parameters (masks,
    position ids): compiled expansions feed them to every region that reads them."""
    side = {a for n in nodes for a in n.all_input_nodes if a not in dep and a.op != "get_attr"}
    return tuple(n.name for n in graph.nodes if n in side)


SOFTMAX_OPS = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
FUSED_ATTENTION_OPS = ATTENTION_OPS - SOFTMAX_OPS
ROUTING_OPS = {aten.topk.default, aten.sort.default, aten.sort.stable, aten.argsort.default, aten.argmax.default,
               aten.max.dim, aten.argsort.stable}
MIXER_OPS = {aten.convolution.default, aten.conv1d.default, aten.cumsum.default, aten.cumprod.default,
             aten._conv_depthwise2d.default}


def _smooth(region: set[fx.Node], stream: fx.Node) -> set[fx.Node]:
    """Floating-point nodes of a block computed from its stream input through floating values: integer
    nodes (routing indices, masks) break the chain, so `expert_weight[index]` is not stream data."""
    smooth = {stream}
    for n in sorted(region, key=_order_key(stream)):
        v = val(n)
        floating = isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
        if isinstance(v, (tuple, list)):
            floating = any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in v)
        if floating and any(a in smooth for a in n.all_input_nodes):
            smooth.add(n)
    return smooth


def _order_key(stream: fx.Node):
    order = {n: i for i, n in enumerate(stream.graph.nodes)}
    return lambda n: order[n]


def _kind(region: set[fx.Node], dep: set[fx.Node], stream: fx.Node | None = None) -> str:
    """attn (a product of two stream-dependent tensors: query-key scores), moe (routed experts: a
    top-k or sort of stream data, then products), mixer (state-space / convolutional token mixing),
    mlp (two products and a non-linearity) or other."""
    smooth = _smooth(region, stream) if stream is not None else dep
    calls = [n for n in region if n.op == "call_function"]

    def on_stream(n):
        return any(a in smooth for a in n.all_input_nodes)

    if any(n.target in FUSED_ATTENTION_OPS for n in calls):
        return "attn"
    softmax = any(n.target in SOFTMAX_OPS and on_stream(n) for n in calls)
    products = any(n.target in (aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.einsum.default)
                   and len([a for a in n.all_input_nodes if a in smooth]) >= 2 for n in calls)
    if products and softmax:
        return "attn"  # softmax over a product of two stream-dependent tensors: query-key scores
    matmuls = sum(1 for n in calls if n.target in MATMUL_OPS or "grouped_mm" in str(n.target))
    if any(n.target in ROUTING_OPS and on_stream(n) for n in calls) and matmuls >= 2:
        return "moe"
    if products or any(n.target in MIXER_OPS and on_stream(n) for n in calls):
        return "mixer"  # token mixing without softmax: state-space scans, convolutions, linear attention
    nonlinear = any(not _is_linear_op(n, dep) and n.target not in MATMUL_OPS for n in calls)
    return "mlp" if matmuls >= 2 and nonlinear else "other"


def _decoder(gm, h_last: fx.Node, logits: fx.Node, nodes: set[fx.Node], dep, graph) -> Decoder:
    vocab = None
    v = val(logits)
    if isinstance(v, torch.Tensor) and v.dim() >= 1:
        vocab = v.shape[-1]
    unembedding = None
    norm_output = None
    node = logits
    # Walk back over a tail of casts, full slices and same-shape views to the unembedding matmul: U
    # can be split off only if its output is the logits (ProphetNet selects one of its n-gram streams
    # after U: its decoder is not split).
    while node in nodes and node is not h_last:
        if node is not logits and not _same_shape(node, logits):
            break
        if node.op == "call_function" and node.target in (aten.linear.default, aten.mm.default, aten.matmul.default):
            weight = node.args[1]
            bias = node.args[2] if node.target is aten.linear.default and len(node.args) > 2 else None
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and bias is None:
                t = fetch_attr(gm, weight.target)
                if isinstance(t, torch.Tensor) and t.dim() == 2 and vocab is not None and vocab in tuple(t.shape):
                    unembedding = weight.target
                    norm_output = node.args[0].name if isinstance(node.args[0], fx.Node) else None
            break
        if is_identity_like(node) or node.target in (aten.slice.Tensor, aten.view.default, aten.reshape.default):
            node = node.args[0]
            continue
        break
    # The final norm is everything before U; the decoder "has a norm" unless that part is linear.
    if norm_output is not None:
        pre = {n for n in nodes if n.name == norm_output}
        frontier = list(pre)
        while frontier:
            n = frontier.pop()
            for a in n.all_input_nodes:
                if a in nodes and a not in pre:
                    pre.add(a)
                    frontier.append(a)
        has_norm = not all(_is_linear_op(n, dep) for n in pre)
    else:
        has_norm = not all(_is_linear_op(n, dep) for n in nodes)
    return Decoder(
        input=h_last.name,
        output=logits.name,
        nodes=tuple(n.name for n in graph.nodes if n in nodes),
        has_norm=has_norm,
        unembedding=unembedding,
        norm_output=norm_output,
    )


def _annotate(graph: fx.Graph, structure: ResidualStructure, dep: set[fx.Node]) -> None:
    roles: dict[str, dict] = {}
    for name in structure.encoder.nodes:
        roles[name] = {"role": "encoder"}
    for b in structure.blocks:
        for name in b.nodes:
            entry = roles.setdefault(name, {"role": "block", "blocks": []})
            if entry["role"] == "block":
                entry["blocks"].append(b.name)
    for name in structure.decoder.nodes:
        roles[name] = {"role": "decoder"}
    for i, name in enumerate(structure.stream):
        roles[name] = {"role": "stream", "index": i}
    for name in structure.side_inputs:
        roles[name] = {"role": "side"}
    for n in graph.nodes:
        if n.name in roles:
            n.meta["jetfx"] = roles[n.name]
        elif n in dep:
            n.meta["jetfx"] = {"role": "residual"}
