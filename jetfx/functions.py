"""The functions γ_b (blocks) and υ (decoder) of a traced model, and the values it computes.

`block_region(gm, b)` and `decoder_region(gm)` extract them as GraphModules f(x, *side) with
fused attention and layer norms decomposed (`passes.decompose`: jets go through them); they are
cached on the traced module. `capture(gm, tokens, names)` runs the traced graph once and returns
the values of the named nodes (stream nodes, block outputs, side inputs).
"""

from __future__ import annotations

from torch import fx

from .passes._graph import first_output_value
from .passes.decompose import decompose_for_jets
from .passes.regions import Region, extract_region
from .structure import Block
from .tracing import residual_of


def _cache(gm: fx.GraphModule) -> dict:
    cache = gm.__dict__.get("_jetfx_cache")
    if cache is None:
        cache = {}
        gm.__dict__["_jetfx_cache"] = cache
    return cache


def block_region(gm: fx.GraphModule, block: Block | str) -> Region:
    """γ_b as a GraphModule `f(x, *side)`; `x` is the block's stream input h_s."""
    structure = residual_of(gm)
    b = structure.block(block) if isinstance(block, str) else block
    key = ("block", b.name)
    cache = _cache(gm)
    if key not in cache:
        region = extract_region(gm, b.input, b.output, b.nodes)
        decompose_for_jets(region.module)
        cache[key] = region
    return cache[key]


def decoder_region(gm: fx.GraphModule) -> Region:
    """υ = U∘γ_{L+1} as a GraphModule `f(x, *side)`; `x` is the last stream node."""
    structure = residual_of(gm)
    key = ("decoder",)
    cache = _cache(gm)
    if key not in cache:
        d = structure.decoder
        region = extract_region(gm, d.input, d.output, d.nodes)
        decompose_for_jets(region.module)
        cache[key] = region
    return cache[key]


def probe_module(gm: fx.GraphModule, names: tuple[str, ...]) -> fx.GraphModule:
    """A copy of the traced graph that returns the values of the nodes `names` (a tuple)."""
    key = ("probe", names)
    cache = _cache(gm)
    if key not in cache:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        out = g.graph_copy(gm.graph, env)
        del out
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
