"""The pass: walk a region graph once and build its Taylor graph, dispatching each node.

A node that does not depend on x is copied as a constant; an integer, boolean or step-function
node is taken at the center; every other node goes to its rule (`registry.rule_for`), or, without
one, to the nested-AD fall-back. The interpreter holds no Taylor arithmetic itself.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ...errors import ExpansionError, check_order
from .._graph import aten, module_path
from ..dependence import value_dependent
from .builder import Builder, Ctx
from .fallback import emit_fallback
from .registry import rule_for
from .series import Const, Parts, Series, Unsupported, series_args


def taylor_graph_module(region: fx.GraphModule, k: int, strict: bool = False, direction: bool = False):
    """The Taylor-mode GraphModule of `region`: forward(x, y, *side) → (c_0, …, c_k).

    With `direction=True` the second input is the direction v itself, forward(x, v, *side), the
    coefficients of t ↦ f(x + t·v): mixed derivatives (`jetfx.passes.mixed`) need arbitrary
    directions, and forming y = x + v only to subtract x again would cost precision.
    Returns (graph_module, fallback_ops): the ops computed by nested-AD fallback.
    """
    k = check_order(k)
    src = region.graph
    placeholders = [n for n in src.nodes if n.op == "placeholder"]
    if not placeholders:
        raise ExpansionError("the region has no input placeholder")
    x_src = placeholders[0]
    dep = value_dependent(src, x_src)

    g = fx.Graph()
    B = Builder(g, k)
    env: dict[fx.Node, object] = {}
    x0 = g.placeholder("x")
    y = g.placeholder("v" if direction else "y")
    for p in placeholders[1:]:
        ph = g.placeholder(p.name)
        ph.meta = dict(p.meta)
        env[p] = Const(ph)
    x_c0 = x0
    x_c1 = y if direction else B.call(aten.sub.Tensor, (y, x0), name="x_c1")
    env[x_src] = Series([x_c0, x_c1] + [None] * (k - 1)) if k >= 1 else Series([x_c0])
    fallback: list[str] = []

    def as_const_arg(a):
        """Argument for a constant node: series → their zeroth coefficient."""
        v = env[a]
        if isinstance(v, Series):
            return v[0]
        if isinstance(v, Parts):
            raise ExpansionError(f"'{a.name}' ({a.target}{_where(a)}) is used as a whole tuple; jetfx jets "
                                 "can only read its elements")
        return v.value

    for node in src.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            if fallback and strict:
                break
            result = env[node.args[0]] if isinstance(node.args[0], fx.Node) else Const(node.args[0])
            if isinstance(result, Const):
                c0 = result.value
                cs = [c0] + [B.call(aten.zeros_like.default, (c0,), name=B.cname("out", j)) for j in range(1, k + 1)]
            else:
                c0 = result[0]
                cs = [result[j] if result[j] is not None else B.call(aten.zeros_like.default, (c0,), name=B.cname("out", j)) for j in range(k + 1)]
            g.output(tuple(cs))
            break
        if node.op == "get_attr":
            new = g.get_attr(node.target)
            new.meta = dict(node.meta)
            env[node] = Const(new)
            continue
        if node not in dep or node.op not in ("call_function", "call_method"):
            new = g.node_copy(node, as_const_arg)
            env[node] = Const(new)
            continue
        if node.target is operator.getitem and isinstance(env.get(node.args[0]), Parts):
            env[node] = env[node.args[0]].items[node.args[1]]
            continue
        if _piecewise_constant(node):  # routing indices, masks, comparisons: taken at the center
            new = g.node_copy(node, as_const_arg)
            env[node] = Const(new)
            continue
        unwrap = lambda a: env[a] if isinstance(env[a], (Series, Parts)) else env[a].value  # noqa: E731
        args = fx.node.map_arg(node.args, unwrap)
        kwargs = fx.node.map_arg(node.kwargs, unwrap)
        if not series_args(args, kwargs):
            new = g.node_copy(node, as_const_arg)
            env[node] = Const(new)
            continue
        rule = rule_for(node.target) if node.op == "call_function" else None
        ctx = Ctx(B, node)
        result = None
        if rule is not None:
            try:
                result = rule(ctx, node, args, kwargs)
            except Unsupported:
                result = None
            except Exception as e:  # noqa: BLE001 - a rule that cannot handle these arguments
                raise ExpansionError(
                    f"the Taylor-mode rule for {node.target} (node '{node.name}'{_where(node)}) failed: "
                    f"{type(e).__name__}: {e}; use jets='nested' for this model") from e
        if result is None and any(isinstance(env.get(a), Parts) for a in node.all_input_nodes):
            raise ExpansionError(f"{node.target} (node '{node.name}'{_where(node)}) reads a multi-output value "
                                 "as a whole; jetfx jets cannot go through it")
        if result is None:
            fallback.append(str(node.target) if node.op == "call_function" else f"Tensor.{node.target}")
            if strict:
                env[node] = Series([None] * (k + 1))
                continue
            result = emit_fallback(ctx, node, args, kwargs)
        env[node] = result

    if fallback and strict:
        names = sorted(set(fallback))
        raise ExpansionError(
            f"no Taylor-mode rule for {', '.join(names)}; use strict=False to compute these ops by "
            "nested forward AD, or jets='nested' for the whole expansion"
        )
    try:
        gm = fx.GraphModule(region, g, class_name="TaylorJetGraph")
        gm.graph.eliminate_dead_code()
        gm.recompile()
    except Exception as e:  # noqa: BLE001 - generated code that does not compile is jetfx's bug, said clearly
        raise ExpansionError(f"the Taylor-mode graph of this block could not be generated ({type(e).__name__}: "
                             f"{e}); ops without rules: {', '.join(sorted(set(fallback))) or 'none'}. "
                             "Use jets='nested' for this model") from e
    return gm, sorted(set(fallback))


PIECEWISE_CONSTANT = {aten.sign.default, aten.floor.default, aten.ceil.default, aten.round.default,
                      aten.trunc.default, aten.heaviside.default}


def _piecewise_constant(node: fx.Node) -> bool:
    """Integer or boolean outputs (indices, masks, comparisons) and step functions: their jets are
    their value at the center. The jet of a routed computation thus keeps the center's routing."""
    if node.op == "call_function" and node.target in PIECEWISE_CONSTANT:
        return True
    v = node.meta.get("val")
    values = v if isinstance(v, (tuple, list)) else (v,)
    tensors = [t for t in values if isinstance(t, torch.Tensor)]
    return bool(tensors) and len(tensors) == len(values) and not any(t.is_floating_point() or t.is_complex() for t in tensors)


def _where(node: fx.Node) -> str:
    """', in module a.b.c' for error messages, or '' where the node has no module path."""
    path = module_path(node)
    return f", in module {path}" if path else ""
