"""Jet expansions of a whole model: Algorithm 2 of the paper (`exponential`), and `expand`, which
selects paths, builds their terms and compiles them into one module.

`expand(gm, k)` is the exponential expansion (Algorithm 2): start from {η, γ_1(η)}, expand every
step with uniform weights 1/|ξ| (Algorithm 1, `jetfx.step_expansion.jet_expand`), then the
decoder; the result has one term per path, 2^L for a sequential network. `paths=` selects which
paths are compiled (through `jetfx.paths` filters), without changing the terms selected paths get;
`split=True` compiles the super-exponential expansion instead (`jetfx.split`).

Jet weights are per site (a step, the decoder) and live in the compiled module's buffers: given
(`weights={"step3": …, "decoder": …}`, tensors that may require grad), fitted on tokens
(`weights="optimized"`, `jetfx.weights`), on the simplex or, with `constraint="affine"`, on the
affine plane Σ w = 1. `recenter=False` takes the jets in the direction of the variate itself
(around the origin), see `jet_expand`.

Algorithm 1 (`jet_expand`) and the centers (`stream`, `branch`, `constant`, `encoder`) are
`jetfx.step_expansion`'s, importable from here as well.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx

from . import paths as P
from .constraints import check_constraint
from .errors import ExpansionError, InputError, check_order
from .passes.materialize import compile_expansion
from .paths import DEFAULT_MAX_PATHS
from .split import expand_split
from .split_paths import check_split_degrees, split_name  # noqa: F401  (importable from here, as before)
from .step_expansion import (MAX_SPLIT_TERMS, JetExpansion, _jet_expand, branch, constant,  # noqa: F401  (as before)
                             encoder, jet_expand, split_parts, stream)
from .structure import ResidualStructure
from .terms import Branch, Concat, Stream, Terms
from .tracing import as_traced, residual_of
from .weights import fit_weights


# ---------------------------------------------------------------------------------------------
# Algorithm 2


def exponential(gm: fx.GraphModule, k: int, selected: Sequence[P.Path] | None = None, *,
                recenter: bool = True) -> JetExpansion:
    """Algorithm 2 with uniform weights, building only the terms the `selected` paths need.

    Each site's weights are 1/|ξ| of the full expansion whichever centers are selected; the
    uncompiled ones share the constraint (JetWeights.total), which is what makes a fitted weight
    of a selected term free up to the slack of the others (`jetfx.weights`)."""
    k = check_order(k)
    structure = residual_of(gm)
    steps = structure.steps
    if selected is None:
        selected = P.PathGraph(structure).paths()
    wanted = {_choices(structure, p.blocks) for p in selected}
    prefixes = [{c[: s + 1] for c in wanted} for s in range(len(steps))]

    # ξ_0 = {η, γ(η) for the blocks of step 0}: exact, from the model's own graph
    first = [Stream(0)] + [Branch(b) for b in steps[0].blocks]
    first_choices = [(None,)] + [(b.name,) for b in steps[0].blocks]
    keep = [i for i, ch in enumerate(first_choices) if ch in prefixes[0]]
    terms: Terms = Concat(tuple(first[i] for i in keep)) if len(keep) > 1 else first[keep[0]]
    choices = [first_choices[i] for i in keep]
    full = 1 + len(steps[0].blocks)  # |ξ| of the full expansion

    for s in range(1, len(steps)):
        blocks = steps[s].blocks
        keep_ids = [i for i, ch in enumerate(choices) if ch + (None,) in prefixes[s]]
        pairs = [(i, j) for j, b in enumerate(blocks) for i, ch in enumerate(choices) if ch + (b.name,) in prefixes[s]]
        # weights 1/|ξ| of the full expansion (Algorithm 2), whichever centers are selected
        xi = _jet_expand(gm, structure, s, terms, k, (1.0 / full,) * len(choices), pairs=pairs, keep=keep_ids,
                         total=full, recenter=recenter)
        choices = [choices[i] + (None,) for i in keep_ids] + [choices[i] + (blocks[j].name,) for i, j in pairs]
        terms = xi.terms
        full *= 1 + len(blocks)
    return _jet_expand(gm, structure, "decoder", terms, k, (1.0 / full,) * len(choices), total=full,
                       recenter=recenter)


def _choices(structure: ResidualStructure, blocks: tuple[str, ...]) -> tuple:
    """A path as its choice at every step: None (skip) or the block's name."""
    by_step = {}
    for name in blocks:
        b = structure.block(name)
        if b.step in by_step:
            raise ExpansionError(f"path {P.path_name(blocks)} goes through two blocks of step {b.step}")
        by_step[b.step] = b.name
    return tuple(by_step.get(s) for s in range(len(structure.steps)))


def expand(gm: fx.GraphModule, k: int = 1, paths=None, *, max_paths: int = DEFAULT_MAX_PATHS, jets: str = "auto",
           split: bool = False, degrees=None, weights=None, tokens=None, constraint: str = "simplex",
           recenter: bool = True, fit: dict | None = None, example_inputs=None):
    """The exponential jet expansion of a traced model, compiled into a runnable GraphModule.

    `paths` selects the compiled paths: a `jetfx.paths` filter, a predicate on `Path`, or path
    names. The module's output holds one logits tensor per selected path and the remainder;
    paths + remainder = the model's logits exactly, whatever the selection and the weights.

    `weights`: None (Algorithm 2's 1/|ξ_s| at every step s); "optimized" — fitted on `tokens` (a
    text, a list of texts or ids) to minimize the logits' remainder in the UᵀU metric, see
    `jetfx.weights.fit_weights` (options in `fit`, e.g. {"max_evals": 300}; what it did is
    `ex.weight_fit`); or a dict {site: weights} as in `ex.jet_weights` ("step3", …, "decoder"),
    e.g. another module's fitted weights or tensors that require grad (gradients of the outputs
    reach them). `constraint`: "simplex" (default) or "affine" (Σ w = 1). `recenter=False`: jets
    around the origin of the variate (see `jet_expand`).

    `split=True` (k ≥ 1) compiles the super-exponential expansion instead, every jet term split by
    degree and by the terms it interacts with; `paths` is then a `jetfx.split` filter (see there), and
    `weights` "exponential" (default: Algorithm 2's 1/2^s on the paper's paths) or "uniform" (1/N_s on
    every term of the split level); see `jetfx.split.split_terms`; a dict sets them afterwards, and
    `jetfx.weights.fit_weights(ex, tokens)` fits them.

    `gm` is made by `jetfx.trace`, or is a GraphModule from `torch.fx.symbolic_trace` /
    `torch.export` (or an ExportedProgram), re-exported first (`jetfx.tracing.as_traced`; float
    inputs need `example_inputs` when the graph records no shapes).
    """
    k = check_order(k)
    constraint = check_constraint(constraint)
    scheme = weights if isinstance(weights, str) else None
    if weights is not None and scheme is None and not isinstance(weights, dict):
        raise ExpansionError(f"weights must be a name or a dict {{site: weights}} (sites as in ex.jet_weights), "
                             f"got {type(weights).__name__}")
    if split and scheme == "optimized":
        raise ExpansionError("weights='optimized': the split expansion takes weights='uniform' (1/N_s on every term) "
                             "or 'exponential' (Algorithm 2's 1/2^s on the paper's paths) when it is built; fit its "
                             "weights afterwards with jetfx.weights.fit_weights(ex, tokens)")
    if not split and scheme in ("uniform", "exponential"):
        raise ExpansionError(f"weights={scheme!r} names a scheme of split jet terms: pass split=True as well. The "
                             "exponential expansion has Algorithm 2's weights 1/|ξ_s| by default (weights=None); "
                             "weights='optimized' fits them, a dict {site: weights} sets them")
    if scheme is not None and scheme not in ("uniform", "exponential", "optimized"):
        raise ExpansionError(f"weights={weights!r}: use None (Algorithm 2), 'optimized' (fitted on tokens=…), a dict "
                             "{site: weights} as in ex.jet_weights, or with split=True 'uniform'/'exponential'")
    if scheme == "optimized" and tokens is None:
        raise InputError("weights='optimized' fits the jet weights on tokens: pass tokens='some text', a list of "
                         "texts or token ids")
    if tokens is not None and scheme != "optimized":
        raise ExpansionError("tokens= is what weights='optimized' fits on; pass weights='optimized' as well")
    if fit is not None and scheme != "optimized":
        raise ExpansionError("fit= holds options of weights='optimized'")
    gm = as_traced(gm, example_inputs)
    if split:
        if not recenter:
            raise ExpansionError("recenter=False does not apply to split jets (see jet_expand)")
        module = expand_split(gm, k, paths, degrees=degrees, max_paths=max_paths, jets=jets, weights=scheme or "exponential")
    else:
        if degrees is not None:
            raise ExpansionError("degrees= applies to split jet terms: pass split=True as well")
        structure = residual_of(gm)
        graph = P.PathGraph(structure)
        filt = P.as_filter(paths)
        n = graph.count(filt)
        if n == 0:
            raise ExpansionError(f"the path filter {filt!r} selects no path of this model "
                                 f"({structure.num_blocks} blocks: {', '.join(b.name for b in structure.blocks[:6])}…); "
                                 "loosen it")
        if n > max_paths:
            raise ExpansionError(_too_many(graph, filt, n, max_paths))
        selected = list(graph.iter_paths(filt))
        expansion = exponential(gm, k, selected, recenter=recenter)
        module = compile_expansion(gm, expansion.terms, jets=jets, path_graph=graph, selected=selected, k=k)
    if isinstance(weights, dict):
        module.set_jet_weights(weights, constraint=constraint)
    elif scheme == "optimized":
        fit_weights(module, tokens, constraint=constraint, **(fit or {}))
    return module


def _too_many(graph: P.PathGraph, filt, n: int, limit: int) -> str:
    total = graph.structure.num_paths
    what = "the exponential expansion has" if isinstance(filt, P._AllPaths) else f"the filter {filt!r} selects"
    hints = []
    for name, f in (("jetfx.paths.max_blocks(1)", P.max_blocks(1)),
                    ("jetfx.paths.only_kinds('mlp') & jetfx.paths.max_blocks(2)", P.only_kinds("mlp") & P.max_blocks(2)),
                    ("jetfx.paths.max_blocks(2)", P.max_blocks(2))):
        try:
            c = graph.count(f & filt if not isinstance(filt, P._AllPaths) else f)
        except ExpansionError:
            continue
        if 0 < c <= limit:
            hints.append(f"{name} ({c} paths)")
    hint = ("; e.g. paths=" + " or paths=".join(hints)) if hints else ""
    return (f"{what} {n} paths ({total} in all for {graph.structure.num_blocks} blocks), more than "
            f"max_paths={limit}. Select fewer with paths=…{hint}, or raise max_paths")
