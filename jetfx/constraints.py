"""The constraints on jet weights, and the check of the weights given to one expansion step.

The paper's jet weights are convex ("simplex": non-negative, summing to 1); its Appendix allows any
weights on the affine plane Σ w = 1 ("affine"). Checked here, at the bottom of the package, because
every layer that takes weights from a user checks them the same way: one function's jets
(`jetfx.jets.expand_function`), one step of an expansion (`jet_expand`), a lens
(`jetfx.lens.joint_lens`) and the sites of a compiled module (`jetfx.weight_sites`).
"""

from __future__ import annotations

import math

import torch

from .errors import ExpansionError

CONSTRAINTS = ("simplex", "affine")
SIMPLEX_TOLERANCE = 1e-6


def check_constraint(constraint: str) -> str:
    if constraint not in CONSTRAINTS:
        raise ExpansionError(f"constraint must be 'simplex' (convex weights, the default) or 'affine' (weights that "
                             f"sum to 1, any sign), got {constraint!r}")
    return constraint


def check_weights(weights, n: int, constraint: str = "simplex") -> tuple[float, ...]:
    """One weight per center, as floats: uniform by default; on the simplex, or with
    constraint="affine" on the affine plane Σ w = 1 (any sign, the paper's Appendix)."""
    constraint = check_constraint(constraint)
    if weights is None or (isinstance(weights, str) and weights == "uniform"):
        return tuple([1.0 / n] * n)
    if isinstance(weights, str):
        raise ExpansionError(f"weights={weights!r}: give one number per center (a sequence or a tensor), or "
                             "'uniform'; fitted weights are for whole expansions: jetfx.expand(…, weights='optimized')")
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ExpansionError(f"weights must be a 1-D tensor of {n} numbers, got shape {tuple(weights.shape)}")
        weights = weights.detach().flatten().tolist()
    try:
        w = tuple(float(x) for x in weights)
    except (TypeError, ValueError):
        raise ExpansionError(f"weights must be a sequence of {n} numbers, got {weights!r}") from None
    if len(w) != n:
        raise ExpansionError(f"got {len(w)} jet weights for {n} centers; give one weight per center")
    if any(not math.isfinite(x) for x in w):
        raise ExpansionError(f"jet weights must be finite, got {list(w)}")
    if constraint == "affine":
        if abs(sum(w) - 1.0) > SIMPLEX_TOLERANCE * max(1, n):
            raise ExpansionError(f"with constraint='affine' jet weights must sum to 1 (the affine plane that contains "
                                 f"the simplex), got {list(w)} (sum {sum(w):.6g})")
    elif min(w) < -SIMPLEX_TOLERANCE or abs(sum(w) - 1.0) > SIMPLEX_TOLERANCE * max(1, n):
        raise ExpansionError(
            f"jet weights must lie on the simplex (non-negative, summing to 1), got {list(w)} "
            f"(sum {sum(w):.6g}); use weights=None for uniform weights, or constraint='affine' for "
            "weights of any sign that sum to 1"
        )
    return w
