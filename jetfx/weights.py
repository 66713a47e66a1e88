"""Jet weights of compiled expansions: where they are, how they are parameterized, how they are fitted.

Every application of Algorithm 1 in an expansion — a block step s or the decoder — is a *site*
with one weight per center. A compiled module keeps each site's weights in a buffer
(`weights.step3`, `weights.decoder`; `ExpandedModule.jet_weights`), so they export with it,
can be set (`jetfx.expand(…, weights={...})`) or replaced per call (`ex(tokens, weights={...})`), and
gradients flow to them.

`fit_weights(ex, tokens)` fits them (paper, Remark 3): it minimizes the mean over tokens of

    ‖U·δ‖² / ‖q‖²  =  ‖γ_{L+1}(h_L) − Σ_paths e‖²_{UᵀU} / ‖γ_{L+1}(h_L)‖²_{UᵀU}

(δ: the logits' remainder, q: the logits), computed in d-space with the d × d Gram matrix UᵀU —
never in vocabulary space — over one input or a small corpus; one weight vector per site is
shared by all tokens and inputs, so the fitted module is reused on new inputs.

Parameters. Only the weights that some compiled term uses are free: at a site where the
expansion compiles n of its centers' terms, the weights of all the others (whose terms are in the
remainder) enter only through their sum, the *slack* 1 − Σ. With `constraint="simplex"` (the
paper's convex weights, default) a site's n weights and its slack are softmax(θ) of n + 1 free
logits — log-space, because the weights that matter span many orders of magnitude (Algorithm 2
gives step s of SmolLM2 the weight 2^-s, down to 10^-18); with `constraint="affine"` (Σ w = 1,
the paper's Appendix) the n weights are free reals and the slack takes what is left (a site
without slack: w = θ − mean θ + 1/n). See docs/weights.md for why, and what the two give.

The fit evaluates the expansion many times on the same tokens: it partially evaluates the
compiled graph (`jetfx.passes.partial`), so everything that does not depend on a weight — the
model's forward pass, every jet taken at a center that no weight scales — runs once per input, and
each step of the optimizer (L-BFGS with a strong-Wolfe line search) only recomputes weight
products and the jets downstream of them. For the paths through ≤ 1 block at k ≥ 1 that is the
decoder's norm at each path's center: a few milliseconds.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from .constraints import CONSTRAINTS, check_constraint
from .errors import ExpansionError, InputError
from .weight_sites import WeightSite, check_site_weights, site_key, weight_overrides

# ---------------------------------------------------------------------------------------------
# parameterization


class _Parameterization:
    """θ (one flat float64 vector) ↦ every fitted site's weight vector (its buffer's values).

    simplex: softmax over (used weights, slack) — the slack logit is only there when the site has
    one; affine: used weights free (slack: 1 − Σ), or θ − mean θ + 1/n without slack.
    """

    def __init__(self, sites: list[WeightSite], constraint: str, dtype: torch.dtype):
        self.sites = [s for s in sites if s.used]
        self.constraint = constraint
        self.dtype = dtype
        self.sizes = [len(s.used) + (1 if constraint == "simplex" and s.slack else 0) for s in self.sites]

    @property
    def n(self) -> int:
        return sum(self.sizes)

    def initial(self) -> torch.Tensor:
        """Uniform on the simplex (every used weight and the slack 1/(n+1)); on the affine plane,
        weight 1 on every used center of a block step with slack (each compiled term at full scale),
        uniform at the decoder and where there is no slack."""
        parts = []
        for s, size in zip(self.sites, self.sizes):
            if self.constraint == "simplex":
                parts.append(torch.zeros(size, dtype=torch.float64))
            elif s.slack and not s.decoder:
                parts.append(torch.ones(size, dtype=torch.float64))
            else:
                parts.append(torch.full((size,), 1.0 / (size + (1 if s.slack else 0)), dtype=torch.float64))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def from_weights(self, current: dict[str, torch.Tensor]) -> torch.Tensor:
        """θ that gives the weights `current` (target → buffer), e.g. to start from a module's own."""
        parts = []
        for s in self.sites:
            w = current[s.target].detach().double().cpu()[list(s.used)]
            if self.constraint == "simplex":
                rest = [1.0 - float(w.sum())] if s.slack else []
                full = torch.cat([w, torch.tensor(rest, dtype=torch.float64)]).clamp_min(1e-300)
                parts.append(full.log())
            else:  # with slack θ = w; without, θ − mean θ + 1/n = w since Σ w = 1
                parts.append(w)
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def weights(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """{buffer target: (site.size,) weights}, differentiable in θ; unused centers get 0.

        All sites at once (a segment softmax, one scatter into the concatenated buffers), not a loop
        of small ops per site: the fit calls this at every evaluation."""
        device = theta.device
        if getattr(self, "_index", None) is None or self._index[0].device != device:
            self._index = self._indices(device)
        segment, keep, position, total = self._index
        if self.constraint == "simplex":
            n = len(self.sizes)
            peak = torch.full((n,), -math.inf, dtype=theta.dtype, device=device).scatter_reduce(
                0, segment, theta.detach(), "amax")
            e = (theta - peak[segment]).exp()
            w = e / torch.zeros(n, dtype=theta.dtype, device=device).index_add(0, segment, e)[segment]
        else:
            mean = torch.zeros(len(self.sizes), dtype=theta.dtype, device=device).index_add(0, segment, theta)
            counts = torch.tensor(self.sizes, dtype=theta.dtype, device=device)
            shift = torch.tensor([0.0 if s.slack else 1.0 for s in self.sites], dtype=theta.dtype, device=device)
            w = theta - (shift * (mean / counts - 1.0 / counts))[segment]  # θ − mean θ + 1/n without slack
        flat = torch.zeros(total, dtype=theta.dtype, device=device).index_put((position,), w[keep])
        pieces = flat.to(self.dtype).split([s.size for s in self.sites])
        return {s.target: piece for s, piece in zip(self.sites, pieces)}

    def _indices(self, device):
        """(site of each θ entry, θ entries that are weights (not slack), where each goes in the
        concatenated buffers, their total length)."""
        segment, keep, position = [], [], []
        offset_theta = offset_buffer = 0
        for i, (s, size) in enumerate(zip(self.sites, self.sizes)):
            segment += [i] * size
            keep += list(range(offset_theta, offset_theta + len(s.used)))
            position += [offset_buffer + u for u in s.used]
            offset_theta += size
            offset_buffer += s.size
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        return as_long(segment), as_long(keep), as_long(position), offset_buffer


# ---------------------------------------------------------------------------------------------
# the fit


@dataclass
class WeightFit:
    """What `fit_weights` did: losses are mean relative squared remainders ‖U·δ‖²/‖q‖² over tokens."""

    constraint: str
    sites: int
    parameters: int
    tokens: int
    inputs: int
    before_loss: float  # the module's weights before the fit (e.g. Algorithm 2's 1/|ξ_s|)
    initial_loss: float  # the optimizer's starting point (see _Parameterization.initial)
    loss: float  # after the fit
    evaluations: int
    setup_seconds: float  # building the fit's graphs (once per module) and UᵀU (once per model)
    prefix_seconds: float  # the weight-independent part, once per input
    optimize_seconds: float
    metric: str  # "UᵀU (d-space)" or "euclidean (logits)"
    curve: list[float] = field(default_factory=list)  # loss at every evaluation

    @property
    def seconds(self) -> float:
        """The whole fit: setup (when it was not done before), prefix and optimization."""
        return self.setup_seconds + self.prefix_seconds + self.optimize_seconds

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("constraint", "sites", "parameters", "tokens", "inputs", "before_loss",
                                           "initial_loss", "loss", "evaluations", "setup_seconds", "prefix_seconds",
                                           "optimize_seconds", "metric")}
        d["seconds"] = self.seconds
        return d


class _Objective:
    """The compiled expansion's decoder terms, split into a cached prefix and a differentiable suffix."""

    def __init__(self, ex, decoder_order: int | None = None):
        from dataclasses import replace as _replace

        from .lens import _decoder
        from .passes.materialize import fit_graph
        from .passes.partial import split_at_attributes
        from .terms import Jet

        cache = ex.__dict__.setdefault("_jetfx_fit", {})
        device = _device_of(ex)
        key = ("parts", device, decoder_order)
        if key not in cache:
            terms = ex.terms
            if decoder_order is not None:  # the same expansion, its decoder's Taylor polynomial truncated
                if not isinstance(terms, Jet) or terms.site != "decoder":
                    raise ExpansionError("decoder_order= needs an expansion whose last step is an unsplit decoder jet")
                if not 0 <= decoder_order <= terms.k:
                    raise ExpansionError(f"decoder_order must be between 0 and k={terms.k}, got {decoder_order}")
                terms = _replace(terms, k=decoder_order)
            fg = fit_graph(ex.source, terms, jets=getattr(ex, "jets_method", "auto"))
            if [s.name for s in fg.weight_sites] != [s.name for s in ex.weight_sites]:
                raise ExpansionError("internal: the fit graph's weight sites differ from the module's")
            targets = [s.target for s in fg.weight_sites]
            prefix, suffix, _ = split_at_attributes(fg.attrs, fg.graph, targets, consume=True)
            prefix.to(device)
            suffix.to(device)
            gram = _decoder(ex.source).gram() if fg.dspace else None  # UᵀU, shared with the lenses
            cache[key] = (prefix, suffix, targets, gram.to(device) if gram is not None else None, fg.dspace)
        self.prefix, self.suffix, self.targets, self.gram, self.dspace = cache[key]
        self.ex = ex

    def frontier(self, ids: torch.Tensor):
        with torch.no_grad():
            values = self.prefix(ids)
        return tuple(values) if isinstance(values, (tuple, list)) else (values,)

    def terms(self, weights: dict[str, torch.Tensor], frontier) -> tuple[torch.Tensor, torch.Tensor]:
        """(stacked decoder terms, target) at these weights (target → tensor) for one input."""
        return self.suffix(*[weights[t] for t in self.targets], *frontier)

    def norms(self, x: torch.Tensor) -> torch.Tensor:
        """‖x‖² in the metric (UᵀU in d-space, Euclidean for logits), per token, float64."""
        x = x.double()
        if self.gram is None:
            return (x * x).sum(-1)
        return ((x @ self.gram) * x).sum(-1)


def corpus(ex, tokens) -> list[torch.Tensor]:
    """Token batches of `tokens`: a text, a list of texts (grouped by length), ids or a list of id tensors."""
    from .tracing import as_tokens, info_of

    info = info_of(ex.source)
    vocab = info.embedding_size or info.vocab_size

    def one(x):
        return as_tokens(x, info.tokenizer, vocab_size=vocab, max_length=info.max_length).to(_device_of(ex))

    if tokens is None:
        raise InputError("fitting jet weights needs tokens: tokens='some text', a list of texts or token ids")
    if isinstance(tokens, (list, tuple)) and tokens and all(isinstance(t, (str, torch.Tensor)) for t in tokens):
        batches: dict[tuple, list[torch.Tensor]] = {}
        for t in tokens:
            ids = one(t)
            batches.setdefault(tuple(ids.shape[1:]), []).append(ids)
        return [torch.cat(group) for group in batches.values()]
    return [one(tokens)]


def fit_weights(ex, tokens, *, constraint: str = "simplex", max_evals: int = 100, tolerance: float = 1e-9,
                init: str = "uniform", sites=None) -> WeightFit:
    """Fit the jet weights of the compiled expansion `ex` on `tokens`; writes them into its buffers.

    `constraint`: "simplex" or "affine" (see the module's doc). `max_evals`: the budget of loss
    evaluations (L-BFGS with line search). The fit stops earlier when an iteration changes the
    loss (a relative squared norm) or the parameters by less than `tolerance`. `init`: "uniform"
    (see `_Parameterization.initial`) or "current" (the module's weights; on the simplex these must
    lie on it). `sites`: names of the sites to fit (default all); the others keep their weights.
    Returns a `WeightFit` (also kept as `ex.weight_fit`).
    """
    constraint = check_constraint(constraint)
    if init not in ("uniform", "current"):
        raise ExpansionError(f"init must be 'uniform' or 'current', got {init!r}")
    if not isinstance(max_evals, int) or isinstance(max_evals, bool) or max_evals < 1:
        raise ExpansionError(f"max_evals must be a positive integer, got {max_evals!r}")
    if getattr(ex, "terms", None) is None or getattr(ex, "source", None) is None:
        raise ExpansionError("fit_weights needs a module compiled by jetfx.expand or JetExpansion.compile")
    chosen = [s for s in ex.weight_sites if s.used]
    if sites is not None:
        wanted = {site_key(x) for x in sites}
        unknown = wanted - {s.name for s in ex.weight_sites}
        if unknown:
            raise ExpansionError(f"no jet-weight sites {sorted(unknown)} in this module")
        chosen = [s for s in chosen if s.name in wanted]
    if not chosen:
        raise ExpansionError("this expansion has no jet weights to fit (no compiled term uses one)")
    batches = corpus(ex, tokens)
    device = _device_of(ex)
    t_setup = time.perf_counter()
    objective = _Objective(ex)
    setup_seconds = time.perf_counter() - t_setup
    dtype = ex.get_buffer(chosen[0].target).dtype
    param = _Parameterization(chosen, constraint, dtype)
    fixed = {s.target: ex.get_buffer(s.target).detach() for s in ex.weight_sites}

    t0 = time.perf_counter()
    cached = []
    n_tokens = 0
    for ids in batches:
        front = objective.frontier(ids)
        _, target = objective.terms(fixed, front)
        scale = objective.norms(target).clamp_min(1e-30)
        cached.append((front, scale))
        n_tokens += scale.numel()
    prefix_seconds = time.perf_counter() - t0

    def loss_at(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for front, scale in cached:
            stacked, target = objective.terms(weights, front)
            total = total + (objective.norms(target - stacked.sum(0)) / scale).sum()
        return total / n_tokens

    with torch.no_grad():
        before = float(loss_at(fixed))
    t1 = time.perf_counter()
    curve: list[float] = []
    if constraint == "affine" and init == "uniform":
        # the affine plane contains the simplex, whose log-space parameterization is better conditioned:
        # fit there first (half the budget; it ends at once where deep paths vanish, as at k = 0), then
        # go on from the better of its optimum and the affine start (every compiled term at full scale)
        simplex = _Parameterization(chosen, "simplex", dtype)
        theta_s = _warm_decoder(objective, simplex, simplex.initial(), fixed, cached)
        loss_s, theta_s = _lbfgs(loss_at, fixed, simplex, theta_s, max(1, max_evals // 2), tolerance, curve, device)
        starts = [_warm_decoder(objective, param, param.initial(), fixed, cached),
                  param.from_weights({**fixed, **simplex.weights(theta_s)})]
        with torch.no_grad():
            losses = [float(loss_at({**fixed, **param.weights(t)})) for t in starts]
        theta0 = starts[0] if losses[0] <= losses[1] else starts[1]
    else:
        theta0 = param.initial() if init == "uniform" else param.from_weights(fixed)
        theta0 = _warm_decoder(objective, param, theta0, fixed, cached)
    loss, theta = _lbfgs(loss_at, fixed, param, theta0, max_evals - len(curve), tolerance, curve, device)
    optimize_seconds = time.perf_counter() - t1
    initial = curve[0] if curve else before
    with torch.no_grad():
        fitted = param.weights(theta)
    _store(ex, fitted)
    fit = WeightFit(constraint=constraint, sites=len(chosen), parameters=param.n, tokens=n_tokens, inputs=len(batches),
                    before_loss=before, initial_loss=initial, loss=loss, evaluations=len(curve),
                    setup_seconds=setup_seconds, prefix_seconds=prefix_seconds, optimize_seconds=optimize_seconds,
                    metric="UᵀU (d-space)" if objective.dspace else "euclidean (logits)", curve=curve)
    ex.weight_fit = fit
    if constraint == "simplex" and loss > 0.9:
        warnings.warn(
            f"the fitted paths leave {loss:.3g} of the logits' squared norm in the remainder: on the simplex a path's "
            "weights multiply along its steps (at k = 0 its identity terms are weighted too), so the terms of deep "
            "paths vanish whatever the weights; constraint='affine' lets every compiled term keep its scale "
            "(docs/weights.md)", stacklevel=2)
    return fit


class _Budget(Exception):
    """The evaluation budget is spent."""


def _lbfgs(loss_at, fixed, param: _Parameterization, theta0: torch.Tensor, budget: int, tolerance: float,
           curve: list[float], device) -> tuple[float, torch.Tensor]:
    """L-BFGS (strong-Wolfe line search) on θ for at most `budget` loss evaluations, each appended to
    `curve`; stops early when an iteration changes the (relative) loss or θ by less than `tolerance`.
    Returns the best (loss, θ) seen."""
    theta = theta0.clone().to(device).requires_grad_(True)
    best = [math.inf, theta.detach().clone()]
    if budget < 1 or param.n == 0:
        with torch.no_grad():
            return float(loss_at({**fixed, **param.weights(theta)})), best[1]
    used = len(curve)

    def closure():
        if len(curve) - used >= budget:
            raise _Budget
        opt.zero_grad()
        loss = loss_at({**fixed, **param.weights(theta)})
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ExpansionError("the weight fit reached a non-finite loss; try constraint='simplex' or fewer paths")
        loss.backward()
        curve.append(value)
        if value < best[0]:
            best[0], best[1] = value, theta.detach().clone()
        return loss

    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=budget, max_eval=budget, history_size=20, tolerance_grad=1e-12,
                            tolerance_change=tolerance, line_search_fn="strong_wolfe")
    try:
        opt.step(closure)
    except _Budget:  # the line search would have gone on: the best point so far is kept
        pass
    return best[0], best[1]


def _warm_decoder(objective: "_Objective", param: _Parameterization, theta: torch.Tensor, fixed, cached) -> torch.Tensor:
    """θ with the decoder's weights solved for the step weights in θ: they enter the loss linearly,
    so the best ones minimize a quadratic form Σ_tokens ‖t − Σ_p ω_p a_p‖²_G/‖t‖²_G — by least squares
    on the affine plane, by the lens's solver (`jetfx.lens.optimize_weights`) on the simplex, the
    slack taking part as a zero term. The optimizer then starts where the linear part is right."""
    from .lens import optimize_weights

    offset = 0
    for site, size in zip(param.sites, param.sizes):
        if site.decoder:
            break
        offset += size
    else:
        return theta
    used = list(site.used)
    weights = {**fixed, **param.weights(theta)}
    weights[site.target] = torch.ones(site.size, dtype=param.dtype, device=weights[site.target].device)
    M = b = None
    with torch.no_grad():
        for front, scale in cached:
            stacked, target = objective.terms(weights, front)
            root = scale.sqrt().unsqueeze(-1)
            a = stacked[used].double() / root
            t = target.double() / root
            aG = a if objective.gram is None else a @ objective.gram
            m = torch.einsum("p...d,q...d->pq", aG, a)
            v = torch.einsum("p...d,...d->p", aG, t)
            M, b = (m, v) if M is None else (M + m, b + v)
    n = len(used)
    M, b = M.cpu(), b.cpu()  # n × n: solved on the CPU (the lens's solver keeps its state there)
    ridge = 1e-10 * float(M.diagonal().abs().mean().clamp_min(1e-300)) * torch.eye(n, dtype=M.dtype, device=M.device)
    theta = theta.clone()
    if param.constraint == "affine" and site.slack:
        theta[offset: offset + size] = torch.linalg.solve(M + ridge, b).to(theta)
    elif param.constraint == "simplex":
        # vectors with these inner products: rows of Lᵀ (M = L Lᵀ); the target solves L q = b
        L = torch.linalg.cholesky(M + ridge)
        q = torch.linalg.solve_triangular(L, b.unsqueeze(-1), upper=False).squeeze(-1)
        terms = L.clone()  # row p of L: a vector whose inner products are M's row p
        if site.slack:
            terms = torch.cat([terms, torch.zeros(1, n, dtype=terms.dtype, device=terms.device)])
        w, _, _, _ = optimize_weights(terms.unsqueeze(1), q.unsqueeze(0), None, steps=200, lr=0.1)
        theta[offset: offset + size] = w.double().flatten().clamp_min(1e-300).log().to(theta)
    return theta


def _store(ex, weights: dict[str, torch.Tensor]) -> None:
    """Write fitted weights into `ex`'s buffers (fresh tensors: a user's tensor is not overwritten)."""
    for target, value in weights.items():
        owner_name, _, leaf = target.rpartition(".")
        owner = ex.get_submodule(owner_name) if owner_name else ex
        old = getattr(owner, leaf)
        owner.register_buffer(leaf, value.detach().to(old.device, old.dtype).clone())


def _device_of(module) -> torch.device:
    from .functions import device_of

    return device_of(module)


# ---------------------------------------------------------------------------------------------
# how much the paths carry


def faithfulness(ex, tokens, *, weights: dict | None = None, decoder_order: int | None = None) -> dict:
    """How much of the logits the compiled paths carry, on `tokens` (a text, texts or ids).

    Returns means over tokens of: `paths_norm` ‖Σ paths‖/‖q‖ and `remainder_norm` ‖δ‖/‖q‖ (Σ paths
    + δ = q, the logits), `cosine` (Σ paths vs q), `top1` (argmax agreement), `relative_loss`
    ‖δ‖²/‖q‖² (what fit_weights minimizes), and the number of tokens. In d-space (Σ paths = U·Σ e)
    when the decoder ends in an unembedding, so a thousand paths cost one unembedding.

    `decoder_order=j` measures the paths with their decoder jets truncated at order j ≤ k (the
    steps before unchanged): at j = 0 what each path's center gives through the decoder alone,
    U·γ_{L+1}(x_p), without the decoder's derivatives along h_L − x_p (see docs/weights.md).
    """
    objective = _Objective(ex, decoder_order)
    current = {s.target: ex.get_buffer(s.target).detach() for s in ex.weight_sites}
    if weights:
        current.update({k: v.detach() for k, v in weight_overrides(ex, weights).items()})
    sums = {"paths_norm": 0.0, "remainder_norm": 0.0, "cosine": 0.0, "top1": 0.0, "relative_loss": 0.0}
    count = 0
    unembed = None
    if objective.dspace:
        from .functions import split_decoder

        unembed = split_decoder(ex.source).unembedding
    for ids in corpus(ex, tokens):
        with torch.no_grad():
            stacked, target = objective.terms(current, objective.frontier(ids))
            total = stacked.sum(0)
            if unembed is not None:
                paths, logits = total @ unembed.t().to(total.dtype), target @ unembed.t().to(target.dtype)
            else:
                paths, logits = total, target
            paths, logits = paths.double(), logits.double()
            rest = logits - paths
            q = logits.norm(dim=-1).clamp_min(1e-30)
            sums["paths_norm"] += float((paths.norm(dim=-1) / q).sum())
            sums["remainder_norm"] += float((rest.norm(dim=-1) / q).sum())
            sums["cosine"] += float(torch.nn.functional.cosine_similarity(paths, logits, dim=-1).sum())
            sums["top1"] += float((paths.argmax(-1) == logits.argmax(-1)).double().sum())
            sums["relative_loss"] += float((rest.pow(2).sum(-1) / q.pow(2)).sum())
            count += q.numel()
    out = {k: v / count for k, v in sums.items()}
    out["tokens"] = count
    return out


def weight_table(ex) -> dict[str, dict[str, float]]:
    """{site: {center name: weight, …, "(others)": slack}} of the module's current weights."""
    out = {}
    for s in ex.weight_sites:
        w = ex.get_buffer(s.target).detach().double().cpu()
        names = s.weights.centers or tuple(f"c{i}" for i in range(s.size))
        row = {names[i]: float(w[i]) for i in s.used}
        if s.slack:
            row["(others)"] = 1.0 - sum(row.values())
        out[s.name] = row
    return out


__all__ = ["CONSTRAINTS", "WeightFit", "WeightSite", "check_site_weights", "faithfulness", "fit_weights",
           "weight_table"]
