"""Change the floating-point precision of an exported graph.

Hugging Face models cast to float32 explicitly in places (RMS norms upcast with
`.to(torch.float32)`), and export bakes those casts into the graph. Analysing a model in float64
(the jet tests need 1e-9 agreement) therefore needs every floating dtype constant rewritten, not
only the parameters converted.
"""

from __future__ import annotations

import torch
from torch import fx

_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


def _swap(obj, dtype):
    if isinstance(obj, torch.dtype):
        return dtype if obj in _FLOATS else obj
    if isinstance(obj, tuple):
        return tuple(_swap(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_swap(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _swap(v, dtype) for k, v in obj.items()}
    return obj


def cast_floating(gm: fx.GraphModule, dtype: torch.dtype) -> fx.GraphModule:
    """Convert floating parameters, buffers and dtype constants of `gm` to `dtype`, in place.

    Parameters are replaced by new tensors rather than converted in place: exported modules share
    their parameters with the model they came from, which must stay as it was.
    """
    if dtype not in _FLOATS:
        raise ValueError(f"cast_floating needs a floating dtype, got {dtype}")
    _replace_tensors(gm, dtype)
    for _, sub in list(gm.named_modules()):  # subgraphs of higher-order ops (autocast, set_grad_enabled) too
        if isinstance(sub, fx.GraphModule):
            for node in sub.graph.nodes:
                node.args = _swap(node.args, dtype)
                node.kwargs = _swap(node.kwargs, dtype)
            sub.recompile()
    return gm


def _replace_tensors(module: torch.nn.Module, dtype: torch.dtype) -> None:
    converted: dict[int, torch.Tensor] = {}  # keep tied weights tied

    def convert(t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        if key not in converted:
            data = t.detach().to(dtype)
            converted[key] = torch.nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else data
        return converted[key]

    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                mod._parameters[name] = convert(p)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                mod._buffers[name] = convert(b)
        for name, value in list(vars(mod).items()):
            # tensor constants that export stores as plain attributes (e.g. `_tensor_constant0`)
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and value.is_floating_point() and value.dtype != dtype:
                setattr(mod, name, convert(value))


def _widen(obj, dtype):
    """`_swap` for the dtype constants narrower than `dtype` only (a model's own float32 upcasts stay)."""
    if isinstance(obj, torch.dtype):
        return dtype if obj in _FLOATS and _bits(obj) < _bits(dtype) else obj
    if isinstance(obj, tuple):
        return tuple(_widen(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_widen(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _widen(v, dtype) for k, v in obj.items()}
    return obj


def _bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def compute_in(gm: fx.GraphModule, dtype: torch.dtype) -> fx.GraphModule:
    """A copy of `gm` that computes in `dtype` (or wider), its weights cast as they are read.

    Jets of a bfloat16 or float16 model are computed in float32 (DESIGN: the k ≥ 1 coefficients are
    small next to c_0 and would drown in half-precision rounding). Converting the parameters would
    keep a float32 copy of every weight alive; here each floating `get_attr` is followed by a cast,
    so the float32 copy of a weight exists only while the region runs. Floating placeholders are
    cast on entry (side inputs such as rotary tables arrive in the model's dtype), dtype constants
    narrower than `dtype` are rewritten (wider ones, such as float32 norms in a bfloat16 model read
    in float32 anyway, stay), and the recorded `meta["val"]` dtypes follow (the Taylor pass reads
    them). Only precision is ever raised. Parameters stay shared with `gm`. Returns `gm` itself when
    nothing changes.
    """
    if dtype not in _FLOATS:
        raise ValueError(f"compute_in needs a floating dtype, got {dtype}")
    src = gm.graph
    if not _needs_compute_cast(gm, dtype):
        return gm
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in src.nodes:
        if node.op == "output":
            g.output(fx.node.map_arg(node.args[0], lambda a: env[a]))
            continue
        new = g.node_copy(node, lambda a: env[a])
        new.args = _widen(new.args, dtype)
        new.kwargs = _widen(new.kwargs, dtype)
        _retype_meta(new, dtype)
        value = _floating_input(gm, node)
        if value is not None and _bits(value) < _bits(dtype):
            cast = g.call_function(torch.ops.aten.to.dtype, (new, dtype))
            cast.meta = dict(new.meta)
            _retype_meta(cast, dtype)
            env[node] = cast
        else:
            env[node] = new
    module = fx.GraphModule(gm, g, class_name=type(gm).__name__)
    module.compute_dtype = dtype
    return module


def _floating_input(gm: fx.GraphModule, node: fx.Node) -> torch.dtype | None:
    """The dtype of a floating weight (`get_attr`) or floating input (`placeholder`), else None."""
    if node.op == "get_attr":
        from ._graph import fetch_attr

        value = fetch_attr(gm, node.target)
        return value.dtype if isinstance(value, torch.Tensor) and value.is_floating_point() else None
    if node.op == "placeholder":
        v = node.meta.get("val")
        return v.dtype if isinstance(v, torch.Tensor) and v.is_floating_point() else None
    return None


def _needs_compute_cast(gm: fx.GraphModule, dtype: torch.dtype) -> bool:
    for node in gm.graph.nodes:
        found = _floating_input(gm, node)
        if found is not None and _bits(found) < _bits(dtype):
            return True
        if _widen(node.args, dtype) != node.args or _widen(node.kwargs, dtype) != node.kwargs:
            return True
    return False


def _retype_meta(node: fx.Node, dtype: torch.dtype) -> None:
    """meta["val"] in `dtype` (fake tensors are re-made in their own fake mode; others dropped)."""
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or _bits(v.dtype) >= _bits(dtype):
        return
    node.meta = dict(node.meta)
    mode = getattr(v, "fake_mode", None)
    try:
        if mode is None:
            raise TypeError
        with mode:
            node.meta["val"] = v.to(dtype)
    except Exception:  # noqa: BLE001 - a value we cannot re-make is better absent than wrong
        node.meta.pop("val", None)
