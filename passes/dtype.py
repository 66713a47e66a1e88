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
