"""The functions γ_b (blocks) and υ (decoder) of a traced model, and the values it computes.

`block_region(gm, b)` and `decoder_region(gm)` extract them as GraphModules f(x, *side) with
fused attention and layer norms decomposed (`passes.decompose`: jets go through them); they are
cached on the traced module. `capture(gm, tokens, names)` runs the traced graph once and returns
the values of the named nodes (stream nodes, block outputs, side inputs).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import fx

from .passes._graph import fetch_attr, first_output_value, nodes_by_name
from .passes.decompose import decompose_for_jets
from .passes.regions import Region, extract_region
from .structure import Block
from .tracing import residual_of


def cache_of(gm: fx.GraphModule) -> dict:
    """Regions and probes of `gm`, kept per device and dtype of its weights: they hold references to
    its buffers and views of its weights, which `gm.to(...)` replaces rather than moves."""
    caches = gm.__dict__.setdefault("_jetfx_cache", {})
    first = _first_tensor(gm)
    key = (first.device, first.dtype) if first is not None else None
    return caches.setdefault(key, {})


def block_region(gm: fx.GraphModule, block: Block | str) -> Region:
    """γ_b as a GraphModule `f(x, *side)`; `x` is the block's stream input h_s."""
    structure = residual_of(gm)
    b = structure.block(block) if isinstance(block, str) else block
    key = ("block", b.name)
    cache = cache_of(gm)
    if key not in cache:
        region = extract_region(gm, b.input, b.output, b.nodes)
        decompose_for_jets(region.module)
        region.module.block_name = b.name  # named in errors from its jets
        cache[key] = region
    return cache[key]


def decoder_region(gm: fx.GraphModule) -> Region:
    """υ = U∘γ_{L+1} as a GraphModule `f(x, *side)`; `x` is the last stream node."""
    structure = residual_of(gm)
    key = ("decoder",)
    cache = cache_of(gm)
    if key not in cache:
        d = structure.decoder
        region = extract_region(gm, d.input, d.output, d.nodes)
        decompose_for_jets(region.module)
        region.module.block_name = "the decoder"
        cache[key] = region
    return cache[key]


@dataclass(frozen=True)
class DecoderSplit:
    """υ = U ∘ γ_{L+1} split at U: `norm` maps the last stream node to U's input (in d-space),
    `unembedding` is U as a (V, d) view of the model's parameter. Jets of υ are U·(jets of norm)."""

    norm: Region
    unembedding: torch.Tensor


def split_decoder(gm: fx.GraphModule) -> DecoderSplit | None:
    """The decoder split at its unembedding, or None when it does not end in a linear map."""
    key = ("decoder-split",)
    cache = cache_of(gm)
    if key in cache:
        return cache[key]
    d = residual_of(gm).decoder
    result = None
    if d.unembedding is not None and d.norm_output is not None:
        by_name = nodes_by_name(gm.graph)
        allowed = set(d.nodes)
        # the node applying U: linear(norm, W) stores U as (V, d); mm/matmul(norm, W) as (d, V)
        applies = [n for n in gm.graph.nodes if n.name in allowed and n.op == "call_function" and n.args
                   and getattr(n.args[0], "name", None) == d.norm_output and len(n.args) > 1
                   and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"
                   and n.args[1].target == d.unembedding]
        if applies and d.norm_output == d.input:  # no final norm: U reads the stream itself
            weight = fetch_attr(gm, d.unembedding).detach()
            result = DecoderSplit(_identity_region(d.input), weight if "linear" in str(applies[0].target) else weight.t())
        elif applies:
            weight = fetch_attr(gm, d.unembedding).detach()
            if "linear" not in str(applies[0].target):
                weight = weight.t()
            keep, frontier = {d.norm_output}, [by_name[d.norm_output]]
            while frontier:  # the decoder's nodes that U's input depends on
                n = frontier.pop()
                for a in n.all_input_nodes:
                    if a.name in allowed and a.name not in keep and a.name != d.input:
                        keep.add(a.name)
                        frontier.append(a)
            region = extract_region(gm, d.input, d.norm_output, [name for name in d.nodes if name in keep])
            decompose_for_jets(region.module)
            region.module.block_name = "the final norm"
            result = DecoderSplit(region, weight)
    cache[key] = result
    return result


def _identity_region(name: str) -> Region:
    """x ↦ x as a region (the part of a norm-less decoder before U)."""
    g = fx.Graph()
    g.output(g.placeholder("x"))
    return Region(module=fx.GraphModule(torch.nn.Module(), g, class_name="Region"), stream_input=name,
                  side_inputs=(), output=name)


def _first_tensor(module: torch.nn.Module) -> torch.Tensor | None:
    return next(itertools.chain(module.parameters(), module.buffers()), None)


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's weights live (CPU for a module without any)."""
    first = _first_tensor(module)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()  # an autograd graph would keep every converted block of W alive
def gram(weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """WᵀW (d × d) in `dtype` for W (V, d), summed over blocks of rows: no (V, d) copy of W in
    `dtype` is made (4 GB for U at V = 128256, d = 4096 in float64)."""
    g = torch.zeros(weight.shape[1], weight.shape[1], dtype=dtype, device=weight.device)
    step = max(1, (1 << 24) // max(1, weight.shape[1]))
    for i in range(0, weight.shape[0], step):
        block = weight[i:i + step].to(dtype)
        g.addmm_(block.t(), block)
    return g


def host_floats(t: torch.Tensor) -> list[float]:
    """`t.tolist()` as floats: one device → host transfer (nan for tensors on the meta device,
    which have no values: device bookkeeping is checked there)."""
    if t.device.type == "meta":
        return [float("nan")] * t.numel()
    return [float(v) for v in t.detach().double().flatten().tolist()]


HALF = (torch.float16, torch.bfloat16)


def default_jet_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision jets are computed in for a model of floating type `dtype`: float32 for half
    precision (the k ≥ 1 coefficients are small next to c_0 and would drown in bf16/fp16 rounding),
    the model's own dtype otherwise."""
    return torch.float32 if dtype in HALF else dtype


def jet_dtype(gm: fx.GraphModule) -> torch.dtype:
    """The dtype jets of `gm` are computed in: `gm.jetfx.jet_dtype` (set by `jetfx.trace(...,
    jet_dtype=...)`, or assigned later), by default float32 for half-precision models."""
    info = getattr(gm, "jetfx", None)
    model = getattr(info, "dtype", None) or torch.float32
    chosen = getattr(info, "jet_dtype", None)
    if chosen is None:
        return default_jet_dtype(model)
    if chosen != model and torch.finfo(chosen).bits <= torch.finfo(model).bits:
        from .errors import InputError

        raise InputError(f"jet_dtype={chosen} is not wider than the model's {model}: jets are computed in the model's "
                         "dtype or a wider one (torch.float32, torch.float64); set gm.jetfx.jet_dtype = None for the "
                         "default")
    return chosen


def compute_region(region: Region, dtype: torch.dtype) -> Region:
    """`region` computing in `dtype` (weights and side inputs cast as read, see
    `passes.dtype.compute_in`); the region itself when it already computes in `dtype`. Kept on the
    region module, so jets built from it are built once."""
    from .passes.dtype import compute_in

    cache = region.module.__dict__.setdefault("_jetfx_compute_regions", {})
    if dtype not in cache:
        module = compute_in(region.module, dtype)
        cache[dtype] = region if module is region.module else Region(module, region.stream_input,
                                                                      region.side_inputs, region.output)
    return cache[dtype]


def probe_module(gm: fx.GraphModule, names: tuple[str, ...]) -> fx.GraphModule:
    """A copy of the traced graph that returns the values of the nodes `names` (a tuple)."""
    key = ("probe", names)
    cache = cache_of(gm)
    if key not in cache:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        g.graph_copy(gm.graph, env)
        by_name = {n.name: n for n in gm.graph.nodes}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise KeyError(f"no nodes named {missing} in the traced graph")
        g.output(tuple(env[by_name[n]] for n in names))
        probe = fx.GraphModule(gm, g, class_name="Probe")
        probe.graph.eliminate_dead_code(is_impure_node=_keeps_running)
        probe.recompile()
        cache[key] = probe
    return cache[key]


def _keeps_running(node: fx.Node) -> bool:
    """Impure for dead-code elimination: real side effects only. (torch marks fused attention
    impure for its dropout RNG, which would keep the whole model alive in every probe.)"""
    if node.op == "call_function" and getattr(node.target, "_schema", None) is not None:
        if "scaled_dot_product" in str(node.target) or "dropout" in str(node.target):
            return False
    return node.is_impure()


def capture(gm: fx.GraphModule, tokens, names) -> dict:
    """Run the traced graph on `tokens` and return {name: value} for the named nodes."""
    names = tuple(dict.fromkeys(names))
    values = probe_module(gm, names)(tokens)
    return dict(zip(names, values))


def logits_node(gm: fx.GraphModule) -> str:
    return first_output_value(gm.graph).name
