"""Mixed directional derivatives from univariate Taylor mode, by exact interpolation.

The split of a jet term (`jetfx.split`) needs, for a center x and other centers u_1…u_s taken with
multiplicities m_1…m_s (|m| = d), the coefficient of t^m = t_1^{m_1}…t_s^{m_s} in

    f(x + t_1·u_1 + … + t_s·u_s),    which is  D^d f(x)[u_1^{m_1}, …, u_s^{m_s}] / (m_1!…m_s!).

Along a single direction u(a) = Σ_j a_j·u_j the d-th univariate Taylor coefficient is
c_d(a) = Σ_{|n| = d} coef_n · a^n, a homogeneous polynomial of degree d in a. Evaluated at the
C(s−1+d, d) integer points {a ≥ 0 : |a| = d} — a unisolvent set for such polynomials — it
determines every coef_n; the inverse of that small integer matrix is computed exactly (fractions)
once per (s, d). This is the scheme of Griewank, Utke and Walther (Math. Comp. 2000).

Cost, and why this and not multivariate Taylor mode: a term of degree d with s distinct directions
costs at most C(s−1+d, d) univariate passes of order d (each O(d²) times a forward), run batched
through the Taylor-mode graph that is already tested against nested AD for every op; points whose
interpolation weight is zero are skipped (degree 1: one pass, a jvp), and d distinct directions
use the polarization identity instead (2^{d−1} passes: 2 at degree 2, 4 at degree 3).
Multivariate Taylor mode would propagate all C(s+d, d) mixed coefficients through every op with
multivariate Cauchy products and needs a second rule for every op; it pays off only when many
terms share a center and all their directions, which the split does not need.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from functools import lru_cache

import torch
from torch import fx

from .batching import map_centers
from .decompose import data_dependent
from .taylor import clear_errors, taylor_graph_module

CHUNK = 256  # univariate passes per vmap call


def lattice(s: int, d: int) -> tuple[tuple[int, ...], ...]:
    """All a ∈ ℕ^s with |a| = d, in a fixed order (the points, and also the monomials)."""
    return tuple(a for a in itertools.product(range(d + 1), repeat=s) if sum(a) == d)


def _solve_exact(m: list[list[Fraction]]) -> list[list[Fraction]]:
    """Inverse of a small square rational matrix by Gauss–Jordan elimination (exact)."""
    n = len(m)
    aug = [row[:] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(m)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if aug[r][col] != 0)
        aug[col], aug[pivot] = aug[pivot], aug[col]
        p = aug[col][col]
        aug[col] = [v / p for v in aug[col]]
        for r in range(n):
            if r != col and aug[r][col] != 0:
                f = aug[r][col]
                aug[r] = [a - f * b for a, b in zip(aug[r], aug[col])]
    return [row[n:] for row in aug]


@lru_cache(maxsize=None)
def interpolation_row(multiplicities: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], float], ...]:
    """((point a, weight), …) with coef_m = Σ weight · c_d(a), zero weights dropped.

    d ≥ 2 distinct directions (all m_j = 1) use polarization instead: D^d f[u_1, …, u_d] =
    2^{1−d} Σ_{ε ∈ {±1}^d, ε_1 = 1} (Π ε_j)·c_d(Σ ε_j u_j) — 2^{d−1} passes instead of C(2d−1, d)
    (2 vs 3 at d = 2, 4 vs 10 at d = 3), with weights of equal magnitude.
    """
    s, d = len(multiplicities), sum(multiplicities)
    if d >= 2 and all(m == 1 for m in multiplicities):
        signs = [(1, *rest) for rest in itertools.product((1, -1), repeat=d - 1)]
        return tuple((eps, float(Fraction(math.prod(eps), 2 ** (d - 1)))) for eps in signs)
    points = lattice(s, d)
    vander = [[Fraction(_monomial(a, n)) for n in points] for a in points]  # rows: points, cols: monomials
    inverse = _solve_exact(vander)  # rows: monomials, cols: points
    row = inverse[points.index(tuple(multiplicities))]
    return tuple((a, float(w)) for a, w in zip(points, row) if w != 0)


def _monomial(a, n) -> int:
    return math.prod(ai**ni for ai, ni in zip(a, n))


def directional_graph(region: fx.GraphModule, d: int) -> fx.GraphModule:
    """The Taylor-mode graph forward(x, v, *side) → (c_0…c_d), built once per region and order."""
    cache = region.__dict__.setdefault("_jetfx_directional_graphs", {})
    if d not in cache:
        cache[d] = taylor_graph_module(region, d, direction=True)[0]
    return cache[d]


class MixedJet(torch.nn.Module):
    """Mixed Taylor coefficients D^d f(x)[u_1^{m_1}…u_s^{m_s}] / Π m_j! at a batch of centers.

    forward(centers (N, …), directions (N, s, …), *side) → (N, …). `multiplicities` = (m_1…m_s),
    all ≥ 1; degree 0 (no directions) is f(x) itself.
    """

    def __init__(self, region: fx.GraphModule, multiplicities: tuple[int, ...]):
        super().__init__()
        if any(m < 1 for m in multiplicities):
            raise ValueError(f"multiplicities must be ≥ 1, got {multiplicities}")
        self.multiplicities = tuple(multiplicities)
        self.degree = sum(multiplicities)
        self.region = region
        self._jetfx_loop = data_dependent(region)  # routed experts: one center at a time
        if self.degree:
            row = interpolation_row(self.multiplicities)
            # on the region's device: no host → device copy per call (buffers: they move with `.to()`)
            device = next(region.parameters(), torch.empty(0)).device
            self.register_buffer("points", torch.tensor([a for a, _ in row], dtype=torch.float64, device=device),
                                 persistent=False)
            self.register_buffer("weights", torch.tensor([w for _, w in row], dtype=torch.float64, device=device),
                                 persistent=False)
            self.graph_module = directional_graph(region, self.degree)

    @clear_errors("mixed Taylor coefficients")
    def forward(self, centers: torch.Tensor, directions: torch.Tensor, *side):
        if self.degree == 0:
            return map_centers(lambda x: self.region(x, *side), centers, owner=self)
        n, p = centers.shape[0], self.points.shape[0]
        points = self.points.to(directions.device, directions.dtype)
        # u(a) = Σ_j a_j u_j for every point a: (N, P, …)
        u = torch.einsum("ps,ns...->np...", points, directions).reshape(n * p, *centers.shape[1:])
        x = centers.unsqueeze(1).expand(n, p, *centers.shape[1:]).reshape(n * p, *centers.shape[1:])
        gm, d = self.graph_module, self.degree

        def top(xi, ui):
            return gm(xi, ui, *side)[d]

        parts = [map_centers(top, x[i:i + CHUNK], u[i:i + CHUNK], owner=self) for i in range(0, n * p, CHUNK)]
        c = torch.cat(parts).reshape(n, p, *parts[0].shape[1:])
        return torch.einsum("p,np...->n...", self.weights.to(c.device, c.dtype), c)


def mixed_jet(region: fx.GraphModule, multiplicities: tuple[int, ...]) -> MixedJet:
    """The `MixedJet` of a region for one multiplicity pattern, built once and kept on the region."""
    cache = region.__dict__.setdefault("_jetfx_mixed_jets", {})
    key = tuple(multiplicities)
    if key not in cache:
        cache[key] = MixedJet(region, key)
    return cache[key]
