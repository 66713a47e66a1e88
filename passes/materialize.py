"""Path materialization: lower symbolic expansion terms into one runnable GraphModule.

The new graph contains a copy of the traced model's graph (which provides the true stream values
h_s, the side inputs and the logits), then, term by term, the stacked tensors (N, B, T, ·) of the
expansion: stream and block nodes of the model, weighted identity terms, and calls to jet modules
(one per block and order, batched over their centers). Terms shared by several paths are lowered
once. The graph returns (stacked path logits, remainder, logits).

Rows are followed to the node that produces them: a concatenation or selection of terms is not a
node of its own until something needs it whole, and a jet gathers its centers from their
producers. Besides saving copies, this keeps a term's dependences exact: the jet of a block at η
does not depend on the weights of other terms that happen to share a concatenation with η (what
fitting jet weights by partial evaluation relies on, `jetfx.weights`).

Jet weights are buffers, one per site (`weights.step3`, `weights.decoder`): they export
with the module, can be replaced per call (`ExpandedModule.__call__(…, weights=…)`), and when a
site's weights were given as a tensor that requires grad, the buffer is that tensor, so gradients
flow from the module's outputs to it.

Each path's logits and the remainder pass through a hook point of their own
(`jetfx.expanded.PathHooks`) on the way out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx

from jetfx.errors import ExpansionError, InputError
from jetfx.expanded import REMAINDER, ExpandedModule, PathHooks, restack
from jetfx.functions import (block_region, compute_region, decoder_region, device_of, jet_dtype, logits_node,
                             split_decoder)
from jetfx.jets import jet_module
from jetfx.paths import PathGraph
from jetfx.terms import (LOGITS, Branch, Concat, Constant, Grouped, Jet, JetWeights, Logits, Remainder, Scaled, Select,
                         SplitJet, Stream, Terms, used_weights, walk)
from jetfx.tracing import info_of, residual_of
from jetfx.weight_sites import WeightSite

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
    """Terms → nodes of a new graph that starts with a copy of the traced model's graph.

    Jets of the decoder υ = U∘γ_{L+1} are taken of its norm alone, in d-space, and U applied once to
    their sum (J^k(U∘γ) = U∘J^k γ: k + 1 times fewer vocabulary-sized products), when the decoder
    ends in an unembedding; `decoder="stream"` stops before U (where jet weights are fitted,
    `jetfx.weights`).
    """

    def __init__(self, gm: fx.GraphModule, jets: str, decoder: str = "logits"):
        self.gm = gm
        self.structure = residual_of(gm)
        self.method = jets
        self.decoder = decoder
        # constants made here live where the model's weights are (and move with the module)
        self.device = device_of(gm)
        self.graph = fx.Graph()
        self.attrs: dict[str, object] = {}
        self.rows_of: dict[int, list] = {}  # id(Terms) → [(node, row, factors)]
        self.gathered: dict[tuple, fx.Node] = {}
        self.site_weights: dict[int, JetWeights] = {}
        self.sizes: dict[fx.Node, int] = {}  # rows of each producing node
        self.weight_nodes: dict[int, fx.Node] = {}
        self.sites: list[WeightSite] = []
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

    def unembeds(self, function) -> bool:
        """Whether the jets of `function` are d-space and U is applied to them here (see `unembed`)."""
        return function is None and self.unembedding is not None and self.decoder != "stream"

    def unembed(self, function, out: fx.Node) -> fx.Node:
        """Logits of stacked d-space decoder jets (N, …, d) when the decoder was split: U·J^k γ = J^k(U∘γ),
        one GEMM per term instead of one per Taylor coefficient; in U's dtype, then the jet dtype."""
        if not self.unembeds(function):
            return out
        node = self.unembedding
        weight = self.env[node.args[1].name]
        u_dtype = fetch_attr(self.gm, node.args[1].target).dtype
        x = out if u_dtype == self.dtype else self.call(aten.to.dtype, out, u_dtype)
        if node.target is aten.linear.default:
            weight = self.call(aten.t.default, weight)
        logits = self.call(_like_logits, self.call(aten.matmul.default, x, weight), self.env[logits_node(self.gm)])
        return logits if u_dtype == self.dtype else self.call(aten.to.dtype, logits, self.dtype)

    def jet(self, function, k: int, recenter: bool = True) -> tuple[str, object]:
        region, name = self.region(function)
        target = f"jets.{name}_k{k}" + ("" if recenter or k == 0 else "_origin")
        if target not in self.attrs:
            self.attrs[target] = jet_module(region.module, k, self.method, recenter=recenter)
        return target, region

    def mixed(self, function, multiplicities: tuple[int, ...]) -> tuple[str, object]:
        region, name = self.region(function)
        target = f"mixed.{name}_m{'_'.join(map(str, multiplicities)) or '0'}"
        if target not in self.attrs:
            self.attrs[target] = mixed_jet(region.module, multiplicities)
        return target, region

    def weights(self, w: JetWeights) -> fx.Node:
        """The site's weight vector, a buffer cast to the stream's dtype (float32 weights would limit
        a float64 expansion to 1e-7: Σ w_i = 1 must hold to the precision of the model). A tensor
        given by the user is the buffer itself, so that gradients reach it."""
        node = self.weight_nodes.get(id(w))
        if node is None:
            tensor = w.tensor if w.tensor is not None else torch.tensor(list(w), dtype=self.dtype, device=self.device)
            taken = {site.name for site in self.sites}
            name, n = w.site, 2
            while name in taken:
                name, n = f"{w.site}_{n}", n + 1
            target = f"weights.{name}"
            self.attrs[target] = tensor
            node = self.call(aten.to.dtype, self.graph.get_attr(target), self.dtype)  # weights set later may differ
            self.weight_nodes[id(w)] = node
            self.sites.append(WeightSite(name, target, w))
        return node

    def index(self, source: fx.Node, indices) -> fx.Node:
        indices = list(indices)
        if indices and indices == list(range(indices[0], indices[-1] + 1)):  # a contiguous run: a view
            return self.call(aten.slice.Tensor, source, 0, indices[0], indices[-1] + 1)
        return self.call(aten.index_select.default, source, 0, self.const("index", self.indices(indices)))

    # lowering: every row of every Terms is (node, row, factors) — the node computing it, and the jet
    # weights (site, center) it is still to be multiplied by; the product is taken where rows are
    # gathered into a tensor for a consumer, one multiplication per gather
    def lower(self, t: Terms) -> fx.Node:
        for sub in walk(t):
            if id(sub) not in self.rows_of:
                self.rows_of[id(sub)] = self._rows(sub)
        return self.node(t)

    def node(self, t: Terms) -> fx.Node:
        """The stacked tensor of all of `t`'s rows."""
        return self.gather(t, range(len(t)))

    def gather(self, t: Terms, indices) -> fx.Node:
        """Rows `indices` of `t` as one tensor: the producing nodes' rows, times their weights."""
        rows = [self.rows_of[id(t)][i] for i in indices]
        key = tuple((id(n), r, f) for n, r, f in rows)
        if key in self.gathered:
            return self.gathered[key]
        runs: list[tuple[fx.Node, list[int]]] = []
        for n, r, _ in rows:
            if runs and runs[-1][0] is n:
                runs[-1][1].append(r)
            else:
                runs.append((n, [r]))
        pieces = [n if rs == list(range(self.sizes[n])) else self.index(n, rs) for n, rs in runs]
        out = pieces[0] if len(pieces) == 1 else self.call(aten.cat.default, pieces, 0)
        if any(f for _, _, f in rows):
            out = self.call(scale_terms, out, self.factors([f for _, _, f in rows]))
        self.gathered[key] = out
        return out

    def factors(self, factors: list[tuple]) -> fx.Node:
        """(n,): per row, the product of its weights (one gather, and a segment product where a row
        has several)."""
        sites = list(dict.fromkeys(w for f in factors for w, _ in f))
        vectors = [self.weights(self.site_weights[w]) for w in sites]
        offsets, total = {}, 0
        for w, v in zip(sites, vectors):
            offsets[w] = total
            total += len(self.site_weights[w])
        one = self.call(aten.new_ones.default, vectors[0], [1])  # rows without weights: × 1
        flat = self.call(aten.cat.default, [*vectors, one], 0)
        if all(len(f) <= 1 for f in factors):
            index = [offsets[f[0][0]] + f[0][1] if f else total for f in factors]
            product = self.call(aten.index_select.default, flat, 0, self.const("index", self.indices(index)))
        else:
            index = [offsets[w] + i for f in factors for w, i in f]
            segment = [r for r, f in enumerate(factors) for _ in f]
            picked = self.call(aten.index_select.default, flat, 0, self.const("index", self.indices(index)))
            ones = self.call(aten.new_ones.default, flat, [len(factors)])
            product = self.graph.call_function(aten.scatter_reduce.two, (ones, 0, self.const("index", self.indices(segment)),
                                                                        picked, "prod"), {"include_self": True})
        return product

    def indices(self, values) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.long, device=self.device)

    def _rows(self, t: Terms) -> list:
        s = self.structure
        if isinstance(t, Concat):
            return [x for p in t.parts for x in self.rows_of[id(p)]]
        if isinstance(t, Select):
            rows = self.rows_of[id(t.source)]
            return [rows[i] for i in t.indices]
        if isinstance(t, Scaled):
            w = self.site(t.weights)
            return [(n, r, f + ((w, i),)) for i, (n, r, f) in enumerate(self.rows_of[id(t.source)])]
        if isinstance(t, Jet):
            return self._lower_jet(t)
        if isinstance(t, SplitJet):
            return self._lower_split(t)
        if isinstance(t, Stream):
            node = self.in_compute_dtype(self.call(aten.unsqueeze.default, self.env[s.stream[t.index]], 0))
        elif isinstance(t, Branch):
            node = self.in_compute_dtype(self.call(aten.unsqueeze.default, self.env[t.block.output], 0))
        elif isinstance(t, Logits):
            node = self.in_compute_dtype(self.call(aten.unsqueeze.default, self.env[logits_node(self.gm)], 0))
        elif isinstance(t, Constant):
            value = self.const("centers", t.value.to(self.dtype))
            node = self.call(broadcast_center, value, self.env[s.stream[0]], ",".join(t.names))
        elif isinstance(t, Grouped):
            src = self.node(t.source)
            owner = [0] * len(t.source)
            for g, members in enumerate(t.groups):
                for m in members:
                    owner[m] = g
            shape = self.call(_grouped_shape, src, len(t.groups))
            zeros = self.call(aten.new_zeros.default, src, shape)
            node = self.call(aten.index_add.default, zeros, 0, self.const("index", self.indices(owner)), src)
        elif isinstance(t, Remainder):
            total = self.call(aten.sum.dim_IntList, self.node(t.terms), [0], True)
            node = self.call(aten.sub.Tensor, self.node(t.target), total)
        else:
            raise TypeError(f"cannot lower {type(t).__name__}")
        self.sizes[node] = len(t)
        return [(node, r, ()) for r in range(len(t))]

    def _lower_jet(self, t: Jet) -> list:
        w = self.site(t.weights)
        out: dict[tuple[int, int], tuple] = {}
        for j, f in enumerate(t.functions):
            idx = [i for i, jj in t.pairs if jj == j]
            if not idx:
                continue
            c = self.gather(t.centers, idx)
            target, region = self.jet(f, t.k, t.recenter)
            variate = self.env[self.structure.decoder.input if f is None else f.input]
            side = [self.env[name] for name in region.side_inputs]
            node, factors = self.weighted_logits(f, self.graph.call_module(target, (c, variate, *side)), w, idx)
            self.sizes[node] = len(idx)
            for position, i in enumerate(idx):
                out[(i, j)] = (node, position, factors[position])
        return [out[pair] for pair in t.pairs]

    def weighted_logits(self, function, out: fx.Node, w: int, centers: list[int]) -> tuple[fx.Node, list[tuple]]:
        """(node, factors of its rows) for the jets `out` of `function` at these centers of site `w`.
        Jets that are unembedded here get their weights in d-space, before U (U is linear, without a
        bias: U·(w·x) = w·(U·x)): the logits (N, B, T, V) are the largest tensor of an expansion, and
        weighting them after U would hold two of them at once."""
        factors = [((w, i),) for i in centers]
        if not self.unembeds(function):
            return out, factors
        scaled = self.call(scale_terms, out, self.factors(factors))
        return self.unembed(function, scaled), [()] * len(centers)

    def _lower_split(self, t: SplitJet) -> list:
        """One batched call per (block, multiplicity pattern); each part is a row of its call."""
        w = self.site(t.weights)
        groups: dict[tuple, list[int]] = {}
        for p, (i, j, others) in enumerate(t.parts):
            distinct = sorted(set(others))
            groups.setdefault((j, tuple(others.count(o) for o in distinct)), []).append(p)
        out: list = [None] * len(t.parts)
        for (j, mult), members in groups.items():
            f = t.functions[j]
            target, region = self.mixed(f, mult)
            c = self.gather(t.centers, [t.parts[p][0] for p in members])
            flat = [o for p in members for o in sorted(set(t.parts[p][2]))]
            # degree 0 takes no directions (the mixed jet evaluates f(x_i)); pass the centers along
            dirs = self.call(_as_directions, self.gather(t.centers, flat), len(members), len(mult)) if flat else c
            side = [self.env[name] for name in region.side_inputs]
            centers = [t.parts[p][0] for p in members]
            node, factors = self.weighted_logits(f, self.graph.call_module(target, (c, dirs, *side)), w, centers)
            self.sizes[node] = len(members)
            for position, p in enumerate(members):
                out[p] = (node, position, factors[position])
        return out

    def site(self, w) -> int:
        """Register the site of weights `w` (its buffer is made when first needed); returns its key."""
        if not isinstance(w, JetWeights):
            raise ExpansionError("internal: jet weights must be JetWeights (made by jet_expand)")
        self.site_weights.setdefault(id(w), w)
        self.weights(w)
        return id(w)

    def finish_sites(self, root: Terms) -> tuple[WeightSite, ...]:
        """The sites of the lowered terms, each with the centers whose weight an output uses."""
        used = {id(w): ix for w, ix in used_weights(root).values()}
        return tuple(site.with_used(used.get(id(site.weights), set())) for site in self.sites)


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
    module.weight_sites = low.finish_sites(terms if remainder is None else remainder)
    return module


@dataclass
class FitGraph:
    """The decoder terms of an expansion as a graph `tokens → (stacked, target)` (see `fit_graph`)."""

    attrs: dict
    graph: fx.Graph
    weight_sites: tuple
    dspace: bool  # stacked and target are d-space vectors (else logits)


def fit_graph(gm: fx.GraphModule, terms: Terms, *, jets: str = "auto") -> FitGraph:
    """The decoder terms of an expansion where their weights are fitted: tokens → (stacked, target).

    When the decoder ends in a linear unembedding U, jets are taken of its norm alone and
    `stacked` (N, B, T, d), `target` = γ_{L+1}(h_L) are d-space vectors: ‖U·(target − Σ stacked)‖ is
    the logits' remainder, computed with UᵀU (Remark 3). Otherwise both are logits. Not made into a
    module here: `jetfx.passes.partial` splits it first.
    """
    if not isinstance(terms, Terms) or terms.space != LOGITS:
        raise ExpansionError("jet weights are fitted on terms expanded at the decoder")
    low = _Lowering(gm, jets, decoder="stream")
    dspace = low.unembedding is not None  # the decoder's jets stop before U (else they are logits)
    stacked = low.lower(terms)
    target = low.in_compute_dtype(low.env[residual_of(gm).decoder.norm_output if dspace else logits_node(gm)])
    low.graph.output((stacked, target))
    return FitGraph(low.attrs, low.graph, low.finish_sites(terms), dspace)


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
    rows = [low.call(aten.select.int, stacked, 0, i) for i in range(len(terms.names))]
    hooked = [low.graph.call_module(f"hooks.{hooks.key(name)}", (row,)) for name, row in zip(terms.names, rows)]
    stacked = low.graph.call_function(restack, (stacked, rows, hooked))
    remainder = low.graph.call_module(f"hooks.{REMAINDER}", (remainder,))
    low.graph.output((stacked, remainder, logits))
    module = ExpandedModule(low.attrs, low.graph, class_name="ExpandedModule")
    module.weight_sites = low.finish_sites(terms)
    module.jets_method = jets
    module.hooks = hooks  # the same hook modules, in a container that finds them by path name
    module.path_names = terms.names
    module.terms = terms
    module.structure = residual_of(gm)
    module.path_graph = path_graph or PathGraph(module.structure)
    module.selected = selected
    module.k = k
    info = info_of(gm)
    module.tokenizer = info.tokenizer
    # a reference, not a submodule: the expansion owns the model's weights it reads (`model.…`), the
    # source holds the same tensors (ExpandedModule._apply keeps them tied when the module moves)
    module.__dict__["source"] = gm
    return module
