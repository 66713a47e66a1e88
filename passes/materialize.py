"""Path materialization: lower symbolic expansion terms into one runnable GraphModule.

The new graph contains a copy of the traced model's graph (which provides the true stream values
h_s, the side inputs and the logits), then, term by term, the stacked tensors (N, B, T, ·) of the
expansion: stream and block nodes of the model, weighted identity terms, and calls to jet modules
(one per block and order, batched over their centers). Terms shared by several paths are lowered
once. The graph returns (stacked path logits, remainder, logits); each path's logits and the
remainder pass through a hook point of their own (`jetfx.expanded.PathHooks`) on the way out.
"""

from __future__ import annotations

import re

import torch
from torch import fx

from jetfx.errors import ExpansionError, InputError
from jetfx.expanded import REMAINDER, ExpandedModule, PathHooks
from jetfx.functions import (block_region, compute_region, decoder_region, device_of, jet_dtype, logits_node,
                             split_decoder)
from jetfx.jets import jet_module
from jetfx.paths import PathGraph
from jetfx.terms import (LOGITS, Branch, Concat, Constant, Grouped, Jet, Logits, Remainder, Scaled, Select, SplitJet,
                         Stream, Terms, walk)
from jetfx.tracing import info_of, residual_of

from ._graph import aten, fetch_attr
from .mixed import mixed_jet


def broadcast_center(value: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """(N, d) / (N, T, d) / (N, B, T, d) constant centers → (N, B, T, d) like the stream (in the
    centers' own dtype: the precision jets are computed in, which may exceed the stream's)."""
    n, d = value.shape[0], value.shape[-1]
    shaped = value.reshape(n, *([1] * (4 - value.dim())), *value.shape[1:]) if value.dim() < 4 else value
    try:
        return shaped.expand(n, *like.shape)
    except RuntimeError:
        raise InputError(f"center {name!r} of shape {tuple(value.shape[1:])} does not fit the stream of "
                         f"shape {tuple(like.shape)} (batch, tokens, width {d})") from None


def _safe(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


# ops between the unembedding and the logits that keep every value where it is (then U can be
# applied to d-space jets and the result reshaped to the logits)
_TAIL_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.to.dtype, aten._to_copy.default,
             aten.clone.default, aten.alias.default, aten.contiguous.default, aten.detach.default}


def _unembedding_node(gm: fx.GraphModule) -> fx.Node | None:
    """The node applying U in the decoder, when only reshapes and casts follow it to the logits."""
    d = residual_of(gm).decoder
    if d.unembedding is None or d.norm_output is None:
        return None
    node = next(n for n in gm.graph.nodes if n.name == logits_node(gm))
    while node.op == "call_function" and node.target in _TAIL_OPS:
        node = node.args[0]
    ok = (node.op == "call_function" and node.target in (aten.linear.default, aten.mm.default, aten.matmul.default)
          and getattr(node.args[0], "name", None) == d.norm_output and len(node.args) == 2
          and getattr(node.args[1], "op", None) == "get_attr" and node.args[1].target == d.unembedding)
    return node if ok else None


class _Lowering:
    def __init__(self, gm: fx.GraphModule, jets: str):
        self.gm = gm
        self.structure = residual_of(gm)
        self.method = jets
        # constants made here live where the model's weights are (and move with the module)
        self.device = device_of(gm)
        self.graph = fx.Graph()
        self.attrs: dict[str, object] = {}
        self.memo: dict[int, fx.Node] = {}
        self.counter = 0
        old_ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
        tokens = self.graph.placeholder("tokens")
        val_map = {old_ph[0]: tokens}
        self.graph.graph_copy(gm.graph, val_map)
        self.env = {old.name: new for old, new in val_map.items()}
        encoder = next(n for n in gm.graph.nodes if n.name == self.structure.stream[0])
        val = encoder.meta.get("val")
        self.model_dtype = val.dtype if isinstance(val, torch.Tensor) and val.is_floating_point() else torch.float32
        # terms are computed in the jet dtype: float32 for a half-precision model (docs/devices.md)
        self.dtype = jet_dtype(gm) if self.model_dtype.is_floating_point else self.model_dtype
        for n in gm.graph.nodes:
            if n.op in ("get_attr", "call_module"):
                self.attrs[n.target] = fetch_attr(gm, n.target)
        self.unembedding = _unembedding_node(gm)

    # helpers
    def const(self, prefix: str, tensor: torch.Tensor) -> fx.Node:
        """A tensor constant of the graph, on the model's device (a buffer: it moves with `.to()`)."""
        self.counter += 1
        target = f"{prefix}.t{self.counter}"
        self.attrs[target] = tensor.to(self.device)
        return self.graph.get_attr(target)

    def call(self, target, *args) -> fx.Node:
        return self.graph.call_function(target, tuple(args))

    def in_compute_dtype(self, node: fx.Node) -> fx.Node:
        """A value of the model (its own dtype) as a term (the jet dtype)."""
        if self.dtype == self.model_dtype:
            return node
        return self.call(aten.to.dtype, node, self.dtype)

    def region(self, function):
        """(region, name) of the function a jet is taken of, computing in the jet dtype. The decoder
        is its part before U when U can be split off (`unembed` applies U after the jet)."""
        if function is None:
            if self.unembedding is not None:
                region, name = split_decoder(self.gm).norm, "decoder_norm"
            else:
                region, name = decoder_region(self.gm), "decoder"
        else:
            region, name = block_region(self.gm, function), _safe(function.name)
        return compute_region(region, self.dtype), name

    def unembed(self, function, out: fx.Node) -> fx.Node:
        """Logits of stacked d-space decoder jets (N, …, d) when the decoder was split: U·J^k γ = J^k(U∘γ),
        one GEMM per term instead of one per Taylor coefficient; in U's dtype, then the jet dtype."""
        if function is not None or self.unembedding is None:
            return out
        node = self.unembedding
        weight = self.env[node.args[1].name]
        u_dtype = fetch_attr(self.gm, node.args[1].target).dtype
        x = out if u_dtype == self.dtype else self.call(aten.to.dtype, out, u_dtype)
        if node.target is aten.linear.default:
            weight = self.call(aten.t.default, weight)
        logits = self.call(_like_logits, self.call(aten.matmul.default, x, weight), self.env[logits_node(self.gm)])
        return logits if u_dtype == self.dtype else self.call(aten.to.dtype, logits, self.dtype)

    def jet(self, function, k: int) -> tuple[str, object]:
        region, name = self.region(function)
        target = f"jets.{name}_k{k}"
        if target not in self.attrs:
            self.attrs[target] = jet_module(region.module, k, self.method)
        return target, region

    def mixed(self, function, multiplicities: tuple[int, ...]) -> tuple[str, object]:
        region, name = self.region(function)
        target = f"mixed.{name}_m{'_'.join(map(str, multiplicities)) or '0'}"
        if target not in self.attrs:
            self.attrs[target] = mixed_jet(region.module, multiplicities)
        return target, region

    def weights(self, values) -> fx.Node:
        """Jet weights as a constant in the jet dtype (float32 weights would limit a float64
        expansion to 1e-7: Σ w_i = 1 must hold to the precision of the model)."""
        return self.const("weights", torch.tensor(list(values), dtype=self.dtype))

    def index(self, source: fx.Node, indices) -> fx.Node:
        return self.call(aten.index_select.default, source, 0, self.const("index", torch.tensor(list(indices))))

    # lowering, memoized per Terms object
    def lower(self, t: Terms) -> fx.Node:
        for sub in walk(t):
            if id(sub) not in self.memo:
                self.memo[id(sub)] = self._lower_one(sub)
        return self.memo[id(t)]

    def _lower_one(self, t: Terms) -> fx.Node:
        s = self.structure
        if isinstance(t, Stream):
            return self.in_compute_dtype(self.call(aten.unsqueeze.default, self.env[s.stream[t.index]], 0))
        if isinstance(t, Branch):
            return self.in_compute_dtype(self.call(aten.unsqueeze.default, self.env[t.block.output], 0))
        if isinstance(t, Logits):
            return self.in_compute_dtype(self.call(aten.unsqueeze.default, self.env[logits_node(self.gm)], 0))
        if isinstance(t, Constant):
            value = self.const("centers", t.value.to(self.dtype))
            return self.call(broadcast_center, value, self.env[s.stream[0]], ",".join(t.names))
        if isinstance(t, Concat):
            parts = [self.memo[id(p)] for p in t.parts]
            return parts[0] if len(parts) == 1 else self.call(aten.cat.default, parts, 0)
        if isinstance(t, Select):
            src = self.memo[id(t.source)]
            if list(t.indices) == list(range(len(t.source))):
                return src
            return self.call(aten.index_select.default, src, 0, self.const("index", torch.tensor(t.indices)))
        if isinstance(t, Scaled):
            return self.call(scale_terms, self.memo[id(t.source)], self.weights(t.weights))
        if isinstance(t, Jet):
            return self._lower_jet(t)
        if isinstance(t, SplitJet):
            return self._lower_split(t)
        if isinstance(t, Grouped):
            src = self.memo[id(t.source)]
            owner = [0] * len(t.source)
            for g, members in enumerate(t.groups):
                for m in members:
                    owner[m] = g
            shape = self.call(_grouped_shape, src, len(t.groups))
            zeros = self.call(aten.new_zeros.default, src, shape)
            return self.call(aten.index_add.default, zeros, 0, self.const("index", torch.tensor(owner)), src)
        if isinstance(t, Remainder):
            total = self.call(aten.sum.dim_IntList, self.memo[id(t.terms)], [0], True)
            return self.call(aten.sub.Tensor, self.memo[id(t.target)], total)
        raise TypeError(f"cannot lower {type(t).__name__}")

    def _lower_jet(self, t: Jet) -> fx.Node:
        centers = self.memo[id(t.centers)]
        n = len(t.centers)
        outs = []
        seen_blocks = []
        for j, f in enumerate(t.functions):
            idx = [i for i, jj in t.pairs if jj == j]
            if not idx:
                continue
            seen_blocks.append(j)
            c = centers if idx == list(range(n)) else self.call(
                aten.index_select.default, centers, 0, self.const("index", torch.tensor(idx)))
            target, region = self.jet(f, t.k)
            variate = self.env[self.structure.decoder.input if f is None else f.input]
            side = [self.env[name] for name in region.side_inputs]
            out = self.unembed(f, self.graph.call_module(target, (c, variate, *side)))
            outs.append(self.call(scale_terms, out, self.weights([t.weights[i] for i in idx])))
        expected = [(i, j) for j in seen_blocks for i, jj in t.pairs if jj == j]
        if list(t.pairs) != expected:
            raise ExpansionError("internal: jet pairs must be grouped by block")
        return outs[0] if len(outs) == 1 else self.call(aten.cat.default, outs, 0)

    def _lower_split(self, t: SplitJet) -> fx.Node:
        """One batched call per (block, multiplicity pattern), then the parts put back in order."""
        centers = self.memo[id(t.centers)]
        groups: dict[tuple, list[int]] = {}
        for p, (i, j, others) in enumerate(t.parts):
            distinct = sorted(set(others))
            groups.setdefault((j, tuple(others.count(o) for o in distinct)), []).append(p)
        outs, order = [], []
        for (j, mult), members in groups.items():
            f = t.functions[j]
            target, region = self.mixed(f, mult)
            c = self.index(centers, [t.parts[p][0] for p in members])
            flat = [o for p in members for o in sorted(set(t.parts[p][2]))]
            # degree 0 takes no directions (the mixed jet evaluates f(x_i)); pass the centers along
            dirs = self.call(_as_directions, self.index(centers, flat), len(members), len(mult)) if flat else c
            side = [self.env[name] for name in region.side_inputs]
            out = self.unembed(f, self.graph.call_module(target, (c, dirs, *side)))
            outs.append(self.call(scale_terms, out, self.weights([t.weights[t.parts[p][0]] for p in members])))
            order.extend(members)
        stacked = outs[0] if len(outs) == 1 else self.call(aten.cat.default, outs, 0)
        if order == list(range(len(order))):
            return stacked
        inverse = [0] * len(order)
        for position, p in enumerate(order):
            inverse[p] = position
        return self.index(stacked, inverse)



def scale_terms(terms: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """w_i · term_i for stacked terms (N, …) of any rank: (N, B, T, d) streams of a transformer,
    (N, B, d) of a residual MLP, (N, B, V) logits of a classifier."""
    return terms * weights.reshape(-1, *([1] * (terms.dim() - 1)))


def _as_directions(flat: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """(n·s, B, T, d) gathered directions → (n, s, B, T, d)."""
    return flat.reshape(n, s, *flat.shape[1:])


def _like_logits(stacked: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(N, …, V) unembedded terms → (N, *logits.shape): the reshapes that followed U in the model."""
    return stacked.reshape(stacked.shape[0], *logits.shape)


def _grouped_shape(src: torch.Tensor, groups: int) -> list:
    return [groups, *src.shape[1:]]


def compile_terms(gm: fx.GraphModule, terms: Terms, remainder: Terms | None = None, *, jets: str = "auto") -> fx.GraphModule:
    """Any terms (stream or logits) as a GraphModule: tokens → stacked terms (and the remainder)."""
    low = _Lowering(gm, jets)
    out = low.lower(terms)
    if remainder is not None:
        out = (out, low.lower(remainder))
    low.graph.output(out)
    module = fx.GraphModule(low.attrs, low.graph, class_name="CompiledTerms")
    module.names = terms.names
    return module


def compile_expansion(gm: fx.GraphModule, terms: Terms, *, jets: str = "auto", path_graph: PathGraph | None = None,
                      selected=None, k: int | None = None) -> ExpandedModule:
    """Compile logit-space `terms` (an expansion at the decoder) into an `ExpandedModule`."""
    if not isinstance(terms, Terms) or terms.space != LOGITS:
        raise ExpansionError("only terms expanded at the decoder (logits) can be compiled; expand the "
                             "decoder last: jet_expand(gm, 'decoder', terms, k)")
    low = _Lowering(gm, jets)
    stacked = low.lower(terms)
    logits = low.env[logits_node(gm)]
    total = low.call(aten.sum.dim_IntList, stacked, [0])
    remainder = low.call(aten.sub.Tensor, logits, total)
    # hook points, after the remainder: overwriting a path changes Σ paths + remainder by the change
    hooks = PathHooks(terms.names)
    for key, hook in hooks.items():
        low.attrs[f"hooks.{key}"] = hook
    hooked = [low.graph.call_module(f"hooks.{hooks.key(name)}", (low.call(aten.select.int, stacked, 0, i),))
              for i, name in enumerate(terms.names)]
    stacked = low.call(aten.stack.default, hooked, 0)
    remainder = low.graph.call_module(f"hooks.{REMAINDER}", (remainder,))
    low.graph.output((stacked, remainder, logits))
    module = ExpandedModule(low.attrs, low.graph, class_name="ExpandedModule")
    module.hooks = hooks  # the same hook modules, in a container that finds them by path name
    module.path_names = terms.names
    module.terms = terms
    module.structure = residual_of(gm)
    module.path_graph = path_graph or PathGraph(module.structure)
    module.selected = selected
    module.k = k
    info = info_of(gm)
    module.tokenizer = info.tokenizer
    module.source = gm
    return module
