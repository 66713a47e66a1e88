"""Taylor-mode jets: a compiler pass from a region graph f(x, *side) to its Taylor coefficients.

For a center x and variate y the input is the polynomial x(t) = x + t·(y − x); every value u of
the region becomes the list of its normalized Taylor coefficients u_0 … u_k in t, and every node
of the region becomes explicit nodes of a new graph, one (or a few) per coefficient:

    linear ops (views, sums, casts, linear/addmm on a constant weight)  u_j ↦ op(u_j)
    bilinear ops (mul, matmul, …, both sides dependent)                  Cauchy product
    exp, log, pow, rsqrt, tanh, sigmoid, erf, div, softmax, …            the classic recurrences

so J^k costs O(k²) evaluations of cheap elementwise ops plus O(k) of each linear op, instead of
the O(2^k) of nested forward AD (`jetfx.jets.NestedJet`, the reference this is tested against).

Structural zeros are tracked: a coefficient is an FX node or `None` (known zero). The input has
u_0 = x, u_1 = y − x and zeros above; linear ops keep them zero, a square makes a degree-2
polynomial (u_3 = u_4 = 0), and so on — a linear layer after a norm costs k+1 matmuls, but the
first linear layer of a block costs two. Values that do not depend on x are computed once, as
constants (their own node, nothing per coefficient).

An op with no rule falls back on nested forward AD for that op alone (`fallback.py`), with one
warning naming the ops; `TaylorJet(..., strict=True)` raises instead.

The package, bottom to top (each module imports only the ones above it in this list):

    series.py       Series / Const / Parts values, helpers the generated code calls
    builder.py      Builder (coefficient algebra that emits nodes), Ctx
    elementwise.py  exp, log, pow, tanh, sigmoid, erf, gelu, silu, softplus, mish (one ODE recurrence)
    linear.py       views, shape ops, sums, casts, gathers, cat, add/sub, scatters, pad, conv
    bilinear.py     mul, div, mm/bmm/matmul/einsum, linear, addmm/baddbmm (Cauchy products)
    reductions.py   var, rms_norm, layer_norm
    attention.py    softmax, log_softmax
    casts.py        where, masked_fill, comparisons, topk/sort/max/amax (choices made at the center)
    registry.py     RULES: op → rule, `register`, `rule_for`
    fallback.py     nested-AD derivatives, the fall-back for ops without a rule
    interpreter.py  taylor_graph_module: walks the region and dispatches each node
    jet.py          TaylorJet (the nn.Module), clear_errors

    tj = TaylorJet(region, k=3)
    tj(centers, variate, *side)            # Σ_j c_j, stacked over centers: J^k f(center_i)(variate)
    tj(centers, variate, *side, coefficients=True)   # (k+1, N, …)
    print(tj.graph_module.code)            # x_c0, x_c1, linear_c0, linear_c1, … one line each
"""

from .fallback import nested_derivatives
from .interpreter import taylor_graph_module
from .jet import TaylorJet, clear_errors
from .registry import RULES, rule_name, supported_ops
from .series import stack_coefficients

__all__ = ["TaylorJet", "taylor_graph_module", "RULES", "supported_ops", "rule_name", "stack_coefficients",
           "clear_errors", "nested_derivatives"]
