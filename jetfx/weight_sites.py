"""Jet-weight sites of a compiled expansion: which buffer holds a site's weights, and the checks of
weights given for them.

Every application of Algorithm 1 in an expansion — a block step s or the decoder — is a *site*
with one weight per center, kept in a buffer of the compiled module (`weights.step3`). The
materializer makes the sites, the expanded module reads and replaces their buffers, and
`jetfx.weights` fits them: the sites live below all three.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .constraints import check_constraint
from .errors import ExpansionError
from .terms import JetWeights


@dataclass(frozen=True)
class WeightSite:
    """One site's jet weights in a compiled module: buffer `target`, its `weights` as made by
    jet_expand (names of the centers, `total`), and `used`: the centers whose weight an output uses."""

    name: str  # "step3", "decoder" (key of ExpandedModule.jet_weights)
    target: str  # the buffer, "weights.step3"
    weights: JetWeights
    used: tuple[int, ...] = ()

    def with_used(self, used) -> "WeightSite":
        return replace(self, used=tuple(sorted(used)))

    @property
    def size(self) -> int:
        return len(self.weights)

    @property
    def slack(self) -> bool:
        """Whether centers outside `used` share the constraint (their weights: 1 − Σ used)."""
        return self.weights.total > len(self.used)

    @property
    def decoder(self) -> bool:
        return self.weights.site == "decoder"


# ---------------------------------------------------------------------------------------------
# given weights


def check_site_weights(site: WeightSite, value, constraint: str | None = "simplex") -> torch.Tensor:
    """A tensor of `site.size` weights, checked against the constraint (None: shape only); tensors are
    kept as they are (they may require grad), sequences become float64 tensors."""
    if constraint is not None:
        constraint = check_constraint(constraint)
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            tensor = torch.tensor([float(x) for x in value], dtype=torch.float64)
        except (TypeError, ValueError):
            raise ExpansionError(f"weights of site {site.name!r} must be a tensor or a sequence of "
                                 f"{site.size} numbers, got {value!r}") from None
    if tensor.dim() != 1 or tensor.shape[0] != site.size or not tensor.is_floating_point():
        raise ExpansionError(f"site {site.name!r} has {site.size} centers ({_names(site)}); got weights of shape "
                             f"{tuple(tensor.shape)} and dtype {tensor.dtype}: give one floating weight per center")
    if constraint is None:
        return tensor
    w = tensor.detach().double().cpu()
    if not torch.isfinite(w).all():
        raise ExpansionError(f"weights of site {site.name!r} must be finite, got {w.tolist()}")
    used = w[list(site.used)]
    total = float(used.sum())
    tol = 1e-6 * max(1, site.size)
    if constraint == "simplex" and used.numel() and float(used.min()) < -1e-6:
        raise ExpansionError(f"weights of site {site.name!r} must be non-negative on the simplex, got {used.tolist()}; "
                             "pass constraint='affine' for weights that only sum to 1")
    if site.slack:
        if constraint == "simplex" and total > 1 + tol:
            raise ExpansionError(f"weights of site {site.name!r} sum to {total:.6g} > 1: on the simplex the compiled "
                                 "terms' weights and the slack of the others are non-negative and sum to 1")
    elif abs(total - 1) > tol:
        raise ExpansionError(f"weights of site {site.name!r} sum to {total:.6g}, not 1: every center of this site is "
                             "compiled, so its weights must lie on the simplex (or, with constraint='affine', the "
                             "affine plane Σ w = 1)")
    return tensor


def _names(site: WeightSite) -> str:
    names = site.weights.centers
    return ", ".join(names[:4]) + (", …" if len(names) > 4 else "") if names else f"{site.size} centers"


def site_key(key) -> str:
    """"step3" from 3 or "step3"; "decoder" stays."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"step{key}"
    if isinstance(key, str):
        return key
    raise ExpansionError(f"jet weights are keyed by site: 'step3' (or 3) or 'decoder', got {key!r}")


def weight_overrides(module, weights: dict, constraint: str | None = None) -> dict[str, torch.Tensor]:
    """{buffer target: tensor} for `torch.func.functional_call`, from {site: weights}, checked against
    `constraint` (None: only their shapes — Σ paths + remainder = logits holds for any weights)."""
    if not isinstance(weights, dict):
        raise ExpansionError("weights must be a dict {site: tensor}, sites as in ex.jet_weights "
                             "('step3', …, 'decoder')")
    sites = {s.name: s for s in module.weight_sites}
    out = {}
    for key, value in weights.items():
        name = site_key(key)
        if name not in sites:
            raise ExpansionError(f"no jet-weight site {name!r} in this module; its sites are "
                                 f"{', '.join(list(sites)[:6])}{'…' if len(sites) > 6 else ''}")
        out[sites[name].target] = check_site_weights(sites[name], value, constraint)
    return out
