"""The split (super-exponential) expansion: the selected split paths' terms, compiled; regrouping.

The path set and its counting are `jetfx.split_paths`, the filters `jetfx.split_filters`: both
are importable from here, which is the module users read (`jetfx.split.max_degree(1)`,
`jetfx.split.SplitPathGraph`).

Regrouping (`regroup`) sums split terms into coarser paths: a degree-0 part by the center it is
evaluated at, a degree-1 part by the direction it differentiates along. For a linear residual
network that recovers exactly the paths U·(Π_{j∈S} A_j)·E (the paper's equation 5, Remark 2).
"""

from __future__ import annotations

import math

from torch import fx

from . import paths as P
from .errors import ExpansionError, check_order
from .passes.materialize import compile_expansion
from .paths import DEFAULT_MAX_PATHS
# the path set and its filters, importable from here (what users read: jetfx.split.max_degree, …)
from .split_filters import (SplitFilter, all_split_paths, as_split_filter, avoid, contains,  # noqa: F401
                            exponential_centers, interacts_with, max_degree, no_kind, only_kinds, total_degree, within)
from .split_paths import (COUNT_CAP, MAX_INTERMEDIATE_TERMS, SplitPath, SplitPathGraph, _Log10,  # noqa: F401
                          _Saturating, check_split_degrees, format_count, split_name)
from .step_expansion import JetExpansion, _jet_expand
from .terms import Branch, Concat, Grouped, SplitJet, Stream, Terms
from .tracing import residual_of

# ---------------------------------------------------------------------------------------------
# the split expansion as terms, and its compilation


WEIGHTS = ("exponential", "uniform")  # the schemes of `split_terms`, default first


def split_terms(gm: fx.GraphModule, k: int, selected: list[SplitPath], degrees=None,
                weights: str = "exponential", *, weight_of=None) -> JetExpansion:
    """Algorithm 2 with every jet split, building only the terms the `selected` paths need.

    `weights` are the convex weights of every step's jets, whichever terms are selected (what is
    not selected is in the remainder). "exponential" (default) takes Algorithm 2's 1/|ξ_s| on the
    level's |ξ_s| paths of the exponential expansion (total degree 0: 2^s for a sequential model)
    and 0 on the other terms: every jet is taken at one of the paper's paths and split by all the
    terms it interacts with. "uniform" takes 1/N_s on each of the level's N_s terms; N_s squares at
    every step, so beyond about ten steps these weights are 0 in float64 (refused: see
    `level_weights`). `weight_of`: those weights as made by `level_weights`, if at hand.
    """
    structure = residual_of(gm)
    steps = structure.steps
    graph = SplitPathGraph(structure, k, degrees)
    weight_of = weight_of or level_weights(graph, weights)
    sizes = graph.level_sizes()  # the terms of each level share its weights' constraint (JetWeights.total)
    # which terms are needed, and the last step that uses each (S: the decoder)
    last_use: dict[SplitPath, int] = {}

    def need(t: SplitPath, step: int):
        if last_use.get(t, -1) >= step:
            return
        first_time = t not in last_use
        last_use[t] = step
        if first_time and t.center is not None:
            own = t.block.step
            for sub in (t.center, *t.others):
                need(sub, own)

    for p in selected:
        for sub in (p.center, *p.others):
            need(sub, len(steps))
    leaves = [SplitPath(None)] + [SplitPath(b) for b in steps[0].blocks]
    current = [t for t in leaves if t in last_use]
    parts_of_leaves = {P.ENCODER: Stream(0), **{b.name: Branch(b) for b in steps[0].blocks}}
    terms: Terms = _concat([parts_of_leaves[t.name] for t in current])
    for s in range(1, len(steps)):
        made = [t for t in last_use if t.center is not None and t.block.step == s]
        keep = [i for i, t in enumerate(current) if last_use[t] > s]
        parts = _parts(current, made, steps[s].blocks)
        w = tuple(weight_of(s - 1, t) for t in current)
        if not parts and len(keep) == len(current):
            continue
        xi = _jet_expand(gm, structure, s, terms, k, w, keep=keep, split_parts=parts, total=sizes[s - 1])
        terms = xi.terms
        current = [current[i] for i in keep] + made
    parts = _parts(current, selected, (None,))
    return _jet_expand(gm, structure, "decoder", terms, k, tuple(weight_of(len(steps) - 1, t) for t in current),
                       split_parts=parts, total=sizes[-1])


def level_weights(graph: SplitPathGraph, weights: str):
    """weight(level index, term) under the named scheme (see `split_terms`), as float64.

    Uniform weights 1/N_s vanish in float64 once N_s passes ~10^308, and every split path would be
    exactly 0: refused here, where the weights are made.
    """
    if weights not in WEIGHTS:
        raise ExpansionError(f"weights={weights!r}: the split expansion takes weights='uniform' (1/N_s on every "
                             "term) or 'exponential' (1/2^s on the exponential expansion's paths, Algorithm 2's)")
    if weights == "uniform":
        sizes = graph.level_sizes()
        for s, n in enumerate(sizes):
            if 1 / n == 0.0:  # int / int: correctly rounded even where N_s exceeds a float
                shown = format_count(n, math.log10(n)) if n < COUNT_CAP else "10^1000 or more"
                raise ExpansionError(
                    f"under weights='uniform' the split level after step {s} has {shown} terms, so its weight 1/N "
                    "is 0 in float64 and every split path of this model would be exactly 0 (all of the logits in "
                    "the remainder). Use weights='exponential': jets at the exponential expansion's paths, weights 1/2^s")
        return lambda s, t: 1 / sizes[s]
    carriers = [level.get(True, 0) for level in graph._levels(max_degree(0))]
    return lambda s, t: 1 / carriers[s] if t.total_degree == 0 else 0.0


def _parts(current: list[SplitPath], made: list[SplitPath], functions) -> tuple:
    index = {t: i for i, t in enumerate(current)}
    fidx = {(f.name if f is not None else None): j for j, f in enumerate(functions)}
    parts = [(index[t.center], fidx[t.block.name if t.block is not None else None],
              tuple(sorted(index[o] for o in t.others))) for t in made]
    order = sorted(range(len(parts)), key=lambda p: parts[p][1])
    made[:] = [made[p] for p in order]
    return tuple(parts[p] for p in order)


def _concat(parts: list[Terms]) -> Terms:
    return parts[0] if len(parts) == 1 else Concat(tuple(parts))


def expand_split(gm: fx.GraphModule, k: int = 1, paths=None, *, degrees=None, max_paths: int = DEFAULT_MAX_PATHS,
                 jets: str = "auto", weights: str = "exponential"):
    """The split (super-exponential) expansion, compiled: one logits tensor per selected split path.

    weights="exponential" (see `split_terms`) keeps only paths that are not identically 0 under it.
    """
    k = check_order(k)
    structure = residual_of(gm)
    graph = SplitPathGraph(structure, k, degrees)
    f = graph.filter(paths)
    weight_of = level_weights(graph, weights)  # a bad name or vanishing weights fail before paths are counted
    if weights == "exponential":
        f = f & exponential_centers()
    n = graph.count_at_most(f, max_paths)
    if n == 0:
        raise ExpansionError(f"the split-path filter {f!r} selects no path of this model at k={k}; loosen it")
    if n is None:
        raise ExpansionError(f"the filter {f!r} selects {graph.describe(f)} split paths, more than max_paths={max_paths}; narrow it "
                             "(e.g. jetfx.split.max_degree(0) & jetfx.split.total_degree(max=1)) or raise max_paths")
    selected = list(graph.iter_paths(f))
    expansion = split_terms(gm, k, selected, degrees, weights, weight_of=weight_of)
    module = compile_expansion(gm, expansion.terms, jets=jets, k=k)
    module.split_graph = graph
    module.selected = selected
    return module


# ---------------------------------------------------------------------------------------------
# regrouping


def regroup(expansion: JetExpansion, labels=None) -> tuple[Terms, tuple]:
    """Sum split terms into coarser paths: degree 0 by center, degree 1 by direction.

    `labels` are the centers' path labels (frozensets of block names; default: η ↦ ∅, a block
    output ↦ {block}, other terms ↦ their name). A degree-0 part of block b at a center labelled S
    goes to S ∪ {b}, a degree-1 part along x_o to label(x_o) ∪ {b}, identity terms keep their
    center's label; parts of degree ≥ 2 stay as they are (labelled by name). Returns the grouped
    terms (names "embed", "h.0.attn>h.2.mlp", …) and their labels, to feed the next step.
    """
    terms = expansion.terms
    split = _split_node(terms)
    if split is None:
        raise ExpansionError("regroup needs a split expansion: jet_expand(…, split=True)")
    centers = split.centers
    if labels is None:
        labels = [_default_label(n) for n in centers.names]
    labels = list(labels)
    if len(labels) != len(centers):
        raise ExpansionError(f"{len(labels)} labels for {len(centers)} centers")
    out_labels = []
    if split is not terms:  # identity terms first (Concat(identity, split))
        identity = terms.parts[0]
        ids = identity.indices if hasattr(identity, "indices") else range(len(identity))
        out_labels.extend(labels[i] for i in ids)
    for (i, j, others), name in zip(split.parts, split.labels):
        f = split.functions[j]
        add = frozenset() if f is None else frozenset({f.name})
        if len(others) == 0:
            out_labels.append(frozenset(labels[i]) | add)
        elif len(others) == 1:
            out_labels.append(frozenset(labels[others[0]]) | add)
        else:
            out_labels.append(name)
    order: dict = {}
    for pos, lab in enumerate(out_labels):
        order.setdefault(lab, []).append(pos)
    group_labels = tuple(order)
    names = tuple(_label_name(lab, expansion.gm) for lab in group_labels)
    return Grouped(terms, tuple(tuple(v) for v in order.values()), names), group_labels


def _split_node(terms: Terms) -> SplitJet | None:
    if isinstance(terms, SplitJet):
        return terms
    if isinstance(terms, Concat) and isinstance(terms.parts[-1], SplitJet):
        return terms.parts[-1]
    return None


def _default_label(name: str):
    if name == P.ENCODER:
        return frozenset()
    return frozenset(P.parse_path(name)) if "[" not in name else name


def _label_name(label, gm) -> str:
    if isinstance(label, str):
        return label
    order = {b.name: i for i, b in enumerate(residual_of(gm).blocks)}
    return P.path_name(sorted(label, key=order.__getitem__))


__all__ = [
    "SplitPath", "SplitFilter", "SplitPathGraph", "all_split_paths", "max_degree", "total_degree", "interacts_with",
    "contains", "within", "avoid", "only_kinds", "no_kind", "exponential_centers", "expand_split", "split_terms", "regroup",
]
