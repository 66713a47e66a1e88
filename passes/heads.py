"""Split an attention block into per-head branches.

An attention block ends in an output projection that is linear in the concatenated head outputs:

    γ_attn(h) = W_O · concat_h(head_h(h)) + b_O = Σ_h W_O[:, slice_h] · head_h(h) + b_O

so γ_attn = Σ_h γ_{attn,h} + b_O exactly, with the per-head branch

    γ_{attn,h}(h) = W_O · (m_h ⊙ concat(heads(h)))        m_h: 1 on head h's slice, 0 elsewhere

This pass builds γ_{attn,h} as a GraphModule `f(x, *side)` (same calling convention as
`jetfx.functions.block_region`) by copying the block's region, inserting the mask m_h before the
output projection and dropping the projection's bias b_O (a constant, the same for every input:
`bias_of` returns it). The output projection is found by graph analysis (the last matmul-like op
on the path to the block output) and the head count from the symbolic shapes of the tensors
feeding it ((B, T, H, d_h) or (B, H, T, d_h): the two static sizes are H and d_h), so no
per-architecture code is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from jetfx.errors import ExpansionError
from jetfx.functions import block_region, cache_of
from jetfx.tracing import residual_of

from ._graph import aten, fetch_attr
from .regions import Region

_MATMULS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default)
_SHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
          aten.permute.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
          aten._to_copy.default}


@dataclass(frozen=True)
class HeadSplit:
    block: str
    num_heads: int
    head_dim: int
    projection: str  # node name of the output projection (in the block region)
    bias: torch.Tensor | None  # b_O, or None


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _projection(region: fx.GraphModule) -> fx.Node:
    out = next(n for n in region.graph.nodes if n.op == "output").args[0]
    node = out
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target in _MATMULS:
            return node
        if node.op == "call_function" and node.target in _SHAPE:
            node = node.args[0]
            continue
        break
    raise ExpansionError("cannot split this block into heads: its output is not a linear projection of "
                         "the concatenated heads (no matmul found on the path to the block output)")


def _activation_and_weight(proj: fx.Node):
    if proj.target is aten.addmm.default:
        return proj.args[1], proj.args[2], proj.args[0]
    if proj.target is aten.linear.default:
        return proj.args[0], proj.args[1], proj.args[2] if len(proj.args) > 2 else None
    return proj.args[0], proj.args[1], None


def _infer_heads(act: fx.Node) -> tuple[int, int] | None:
    node = act
    for _ in range(12):
        v = _val(node)
        if isinstance(v, torch.Tensor) and v.dim() == 4:
            static = [s for s in v.shape if isinstance(s, int)]
            if len(static) == 2:
                return static[0], static[1]
        if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _SHAPE):
            return None
        node = node.args[0]
    return None


def analyze(gm: fx.GraphModule, block, num_heads: int | None = None) -> HeadSplit:
    """Find the output projection and head count of attention block `block` (name or Block)."""
    structure = residual_of(gm)
    b = structure.block(block) if isinstance(block, str) else block
    region = block_region(gm, b).module
    proj = _projection(region)
    act, weight, bias = _activation_and_weight(proj)
    width = _val(act).shape[-1] if isinstance(_val(act), torch.Tensor) else None
    if num_heads is None:
        found = _infer_heads(act)
        if found is None:
            raise ExpansionError(f"cannot infer the number of heads of {b.name}; pass num_heads=")
        num_heads = found[0]
    if not isinstance(width, int) or width % num_heads:
        raise ExpansionError(f"{b.name}: projection input width {width} is not a multiple of {num_heads} heads")
    bias_t = None
    if isinstance(bias, fx.Node) and bias.op == "get_attr":
        bias_t = fetch_attr(region, bias.target).detach()
    return HeadSplit(b.name, num_heads, width // num_heads, proj.name, bias_t)



class _Mask(torch.nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)


def head_branch(gm: fx.GraphModule, block, head: int, num_heads: int | None = None) -> Region:
    """γ_{block,head} as a Region `f(x, *side)`: the block with every other head masked before the
    output projection and the projection's bias dropped (cached on `gm`)."""
    split = analyze(gm, block, num_heads)
    if not isinstance(head, int) or not 0 <= head < split.num_heads:
        raise ExpansionError(f"head {head!r} is out of range: {split.block} has {split.num_heads} heads")
    cache = cache_of(gm)
    key = ("head", split.block, head, split.num_heads)
    if key in cache:
        return cache[key]
    base = block_region(gm, split.block)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(base.module.graph, env)
    proj = next(env[n] for n in base.module.graph.nodes if n.name == split.projection)
    act, _w, _b = _activation_and_weight(proj)
    width = split.num_heads * split.head_dim
    first = next(iter(base.module.parameters()), None)
    if first is None:
        first = next(iter(base.module.buffers()), None)
    device = first.device if first is not None else "cpu"
    # in the weights' dtype: a float32 mask would promote a bfloat16 model's activations to float32
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    mask = torch.zeros(width, device=device, dtype=dtype)
    mask[head * split.head_dim:(head + 1) * split.head_dim] = 1.0
    owner = torch.nn.Module()
    owner.add_module("base", base.module)
    owner.add_module("head_mask", _Mask(mask))
    # re-point get_attr targets at the copied owner
    for n in g.nodes:
        if n.op == "get_attr":
            n.target = "base." + n.target
    with g.inserting_before(proj):
        m = g.get_attr("head_mask.mask")
        masked = g.call_function(aten.mul.Tensor, (act, m))
    if proj.target is aten.addmm.default:
        proj.target = aten.mm.default
        proj.args = (masked, proj.args[2])
    elif proj.target is aten.linear.default:
        proj.args = (masked, proj.args[1])
    else:
        proj.args = (masked, *proj.args[1:])
    g.output(out)
    g.eliminate_dead_code()
    module = fx.GraphModule(owner, g, class_name="HeadBranch")
    region = Region(module=module, stream_input=base.stream_input, side_inputs=base.side_inputs, output=base.output)
    cache[key] = region
    return region


def bias_of(gm: fx.GraphModule, block, num_heads: int | None = None) -> torch.Tensor | None:
    """The output projection's bias b_O (the constant remainder of Σ_h γ_{attn,h}), or None."""
    return analyze(gm, block, num_heads).bias
