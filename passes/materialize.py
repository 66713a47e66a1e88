"""Path materialization: lower symbolic expansion terms into one runnable GraphModule.

The new graph contains a copy of the traced model's graph (which provides the true stream values
h_s, the side inputs and the logits), then, term by term, the stacked tensors (N, B, T, ·) of the
expansion: stream and block nodes of the model, weighted identity terms, and calls to jet modules
(one per block and order, batched over their centers). Terms shared by several paths are lowered
once. The graph returns (stacked path logits, remainder, logits).
"""

from __future__ import annotations

import re

import torch
from torch import fx

from jetfx.errors import ExpansionError, InputError
from jetfx.expanded import ExpandedModule
from jetfx.functions import block_region, decoder_region, logits_node
from jetfx.jets import jet_module
from jetfx.paths import PathGraph
from jetfx.terms import LOGITS, Branch, Concat, Constant, Jet, Logits, Remainder, Scaled, Select, Stream, Terms, walk
from jetfx.tracing import info_of, residual_of

from ._graph import aten, fetch_attr


def broadcast_center(value: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """(N, d) / (N, T, d) / (N, B, T, d) constant centers → (N, B, T, d) like the stream."""
    n, d = value.shape[0], value.shape[-1]
    shaped = value.reshape(n, *([1] * (4 - value.dim())), *value.shape[1:]) if value.dim() < 4 else value
    try:
        return shaped.to(like.dtype).expand(n, *like.shape)
    except RuntimeError:
        raise InputError(f"center {name!r} of shape {tuple(value.shape[1:])} does not fit the stream of "
                         f"shape {tuple(like.shape)} (batch, tokens, width {d})") from None


def _safe(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


class _Lowering:
    def __init__(self, gm: fx.GraphModule, jets: str):
        self.gm = gm
        self.structure = residual_of(gm)
        self.method = jets
        self.graph = fx.Graph()
        self.attrs: dict[str, object] = {}
        self.memo: dict[int, fx.Node] = {}
        self.counter = 0
        old_ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
        tokens = self.graph.placeholder("tokens")
        val_map = {old_ph[0]: tokens}
        self.graph.graph_copy(gm.graph, val_map)
        self.env = {old.name: new for old, new in val_map.items()}
        for n in gm.graph.nodes:
            if n.op in ("get_attr", "call_module"):
                self.attrs[n.target] = fetch_attr(gm, n.target)

    # helpers
    def const(self, prefix: str, tensor: torch.Tensor) -> fx.Node:
        self.counter += 1
        target = f"{prefix}.t{self.counter}"
        self.attrs[target] = tensor
        return self.graph.get_attr(target)

    def call(self, target, *args) -> fx.Node:
        return self.graph.call_function(target, tuple(args))

    def jet(self, function, k: int) -> tuple[str, object]:
        if function is None:
            region, name = decoder_region(self.gm), "decoder"
        else:
            region, name = block_region(self.gm, function), _safe(function.name)
        target = f"jets.{name}_k{k}"
        if target not in self.attrs:
            self.attrs[target] = jet_module(region.module, k, self.method)
        return target, region

    # lowering, memoized per Terms object
    def lower(self, t: Terms) -> fx.Node:
        for sub in walk(t):
            if id(sub) not in self.memo:
                self.memo[id(sub)] = self._lower_one(sub)
        return self.memo[id(t)]

    def _lower_one(self, t: Terms) -> fx.Node:
        s = self.structure
        if isinstance(t, Stream):
            return self.call(aten.unsqueeze.default, self.env[s.stream[t.index]], 0)
        if isinstance(t, Branch):
            return self.call(aten.unsqueeze.default, self.env[t.block.output], 0)
        if isinstance(t, Logits):
            return self.call(aten.unsqueeze.default, self.env[logits_node(self.gm)], 0)
        if isinstance(t, Constant):
            value = self.const("centers", t.value)
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
            w = self.const("weights", torch.tensor(t.weights).view(-1, 1, 1, 1))
            return self.call(aten.mul.Tensor, self.memo[id(t.source)], w)
        if isinstance(t, Jet):
            return self._lower_jet(t)
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
            out = self.graph.call_module(target, (c, variate, *side))
            w = self.const("weights", torch.tensor([t.weights[i] for i in idx]).view(-1, 1, 1, 1))
            outs.append(self.call(aten.mul.Tensor, out, w))
        expected = [(i, j) for j in seen_blocks for i, jj in t.pairs if jj == j]
        if list(t.pairs) != expected:
            raise ExpansionError("internal: jet pairs must be grouped by block")
        return outs[0] if len(outs) == 1 else self.call(aten.cat.default, outs, 0)



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
    low.graph.output((stacked, remainder, logits))
    module = ExpandedModule(low.attrs, low.graph, class_name="ExpandedModule")
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
