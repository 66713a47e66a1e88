"""The rule table: which rule computes the Taylor coefficients of which op.

A rule is `rule(ctx, node, args, kwargs) -> Series | Const | Parts`, where args/kwargs are the
node's arguments mapped to `Series` (depends on x) or constants. It may raise `Unsupported` for
arguments it cannot handle; the op then falls back on nested AD. Keys are ATen overload packets
(every overload of the op), single overloads (which take precedence), or plain functions
(`operator.getitem`, `passes.decompose.grouped_mm`). Every key is tested against nested AD by name
(tests/test_taylor_rules.py, which fails for a key without a test entry).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch

from .._graph import aten
from ..decompose import grouped_mm
from .attention import rule_log_softmax, rule_softmax
from .bilinear import rule_addmm, rule_baddbmm, rule_bilinear, rule_div, rule_einsum, rule_linear, rule_mul
from .casts import rule_amax, rule_masked_fill, rule_max_dim, rule_piecewise_constant, rule_topk, rule_where
from .elementwise import (_pow_rule, rule_erf, rule_exp, rule_gelu, rule_log, rule_mish, rule_pow,
                          rule_sigmoid, rule_silu, rule_softplus, rule_tanh)
from .linear import (_joint_linear, rule_add, rule_constant_pad, rule_convolution, rule_getitem, rule_identity,
                     rule_linear_first, rule_linear_list, rule_rsub, rule_sub, rule_view)
from .reductions import rule_layer_norm, rule_rms_norm, rule_var

RULES: dict = {}


def register(names, rule: Callable) -> None:
    """Register `rule` for the ATen ops named in `names` (every overload of each). A name that is
    not an ATen op is an error: a rule registered under a wrong name would silently never run."""
    for name in names:
        packet = getattr(aten, name, None)
        if packet is None:
            raise ValueError(f"no ATen op named {name!r}: the Taylor rule {rule.__name__} cannot be registered for it")
        RULES[packet] = rule


def rule_name(key) -> str:
    """The name a rule key is listed and tested under: 'aten.exp', 'aten.max.dim',
    '_operator.getitem', 'jetfx.passes.decompose.grouped_mm'."""
    if isinstance(key, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return str(key)
    return f"{key.__module__}.{key.__qualname__}"


def rule_for(target) -> Callable | None:
    """The rule for a call_function target: its overload's, else its packet's, else None."""
    rule = RULES.get(target)
    if rule is not None:
        return rule
    packet = getattr(target, "overloadpacket", None)
    return RULES.get(packet) if packet is not None else None


def supported_ops() -> list[str]:
    """The names of every op with a rule, sorted."""
    return sorted(rule_name(key) for key in RULES)


# -- linear ops (linear.py): u_j ↦ op(u_j)
SHAPE_OPS = [
    "view", "reshape", "transpose", "permute", "t", "slice", "select", "unsqueeze", "squeeze",
    "expand", "clone", "contiguous", "alias", "neg", "flatten", "unflatten", "repeat_interleave", "repeat", "narrow",
    "roll", "flip", "split", "split_with_sizes", "chunk", "unbind", "tril", "triu", "diagonal", "movedim", "swapaxes",
    "transpose_copy", "view_copy", "expand_copy", "permute_copy", "squeeze_copy", "unsqueeze_copy", "slice_copy",
    "select_copy", "lift_fresh_copy", "as_strided", "view_as_real", "view_as_complex",
]
LINEAR_REDUCTIONS = ["sum", "mean", "cumsum", "trace"]
CASTS = ["_to_copy", "to", "type_as"]
GATHERS = ["index_select", "gather", "index"]
register(SHAPE_OPS + LINEAR_REDUCTIONS + CASTS + GATHERS, rule_linear_first)
RULES[aten.view.default] = rule_view  # as reshape: coefficients need not have a view's strides
RULES[aten._unsafe_view.default] = rule_view  # (its packet's only other overload is `out=`)
# No in-place op has a rule (`detach_` had one): `passes.cleanup.functionalize_inplace` and
# torch.export's functionalization remove them before jets (`passes.decompose.decompose_for_jets`).
# `aten.embedding(weight, ids)`: ids never depend on x and weights are parameters, so it is a
# constant; if the weight depended on x it would be linear in it:
RULES[aten.embedding] = rule_linear_first
# grouped expert products (passes.decompose.grouped_mm): linear in the routed rows, offsets constant
RULES[grouped_mm] = rule_linear_first
register(["slice_scatter", "select_scatter", "copy", "diagonal_scatter"], _joint_linear(0, 1))
RULES[aten.index_put.default] = _joint_linear(0, 2)
RULES[aten.conv1d.default] = rule_convolution
RULES[aten.convolution.default] = rule_convolution
register(["cat", "stack", "hstack", "vstack", "concat", "concatenate"], rule_linear_list)
register(["add"], rule_add)
register(["sub"], rule_sub)
register(["rsub"], rule_rsub)
register(["constant_pad_nd"], rule_constant_pad)
register(["detach"], rule_identity)  # detach in an inference graph only cuts autograd
RULES[operator.getitem] = rule_getitem

# -- products (bilinear.py)
register(["mul"], rule_mul)
register(["div"], rule_div)
register(["mm", "bmm", "matmul", "outer", "dot", "vdot", "mv"], rule_bilinear)
register(["einsum"], rule_einsum)
register(["linear"], rule_linear)
register(["addmm"], rule_addmm)
register(["baddbmm"], rule_baddbmm)

# -- elementwise (elementwise.py)
register(["exp"], rule_exp)
register(["log"], rule_log)
register(["pow"], rule_pow)
register(["rsqrt"], _pow_rule(-0.5))
register(["sqrt"], _pow_rule(0.5))
register(["reciprocal"], _pow_rule(-1))
register(["tanh"], rule_tanh)
register(["sigmoid"], rule_sigmoid)
register(["erf"], rule_erf)
register(["gelu"], rule_gelu)
register(["silu"], rule_silu)
register(["mish"], rule_mish)
register(["softplus"], rule_softplus)

# -- reductions and norms (reductions.py), attention (attention.py)
register(["var"], rule_var)
register(["rms_norm"], rule_rms_norm)
register(["layer_norm"], rule_layer_norm)
register(["softmax", "_softmax", "special_softmax"], rule_softmax)
register(["log_softmax", "_log_softmax"], rule_log_softmax)

# -- selections, masks, comparisons (casts.py)
register(["where"], rule_where)
register(["masked_fill"], rule_masked_fill)
register(["isnan", "isinf", "isfinite", "isposinf", "isneginf", "eq", "ne", "gt", "ge", "lt", "le", "logical_not",
          "logical_and", "logical_or", "logical_xor", "argmax", "argmin"], rule_piecewise_constant)
register(["topk", "sort"], rule_topk)
RULES[aten.max.dim] = rule_max_dim
RULES[aten.min.dim] = rule_max_dim
register(["amax", "amin"], rule_amax)
