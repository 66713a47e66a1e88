"""Pictures of the residual computation: the path graph (and a selected path set) as SVG.

Drawing depends on path data (`jetfx.paths`, `jetfx.split_paths`), never the reverse:
`PathGraph.render` calls what this module registers with `jetfx.paths.draw_with`.
Rendering goes through graphviz's `dot` program; a missing `dot` gets a message saying how to
install it. Blocks are labelled with their name and kind and colored by kind; edges used by the
selected paths are drawn bold and colored, the others faint.
"""

from __future__ import annotations

import shutil

from . import paths as P
from .errors import MissingDependencyError
from .paths import DECODER, ENCODER, parse_path
from .split_paths import SplitPathGraph

KIND_COLORS = {"attn": "#d6e6f5", "mlp": "#fde2cf", "moe": "#fbd0d9", "mixer": "#d5f0ef", "other": "#e6e6e6", "encoder": "#d9f0d3", "decoder": "#e7d4e8"}
HIGHLIGHT = "#c0392b"
INTERACTION = "#2471a3"


def _require_dot() -> None:
    if shutil.which("dot") is None:
        raise MissingDependencyError("rendering needs graphviz's `dot` program: apt-get install graphviz "
                                     "(Debian/Ubuntu), brew install graphviz (macOS), or conda install graphviz")


def svg_of(dot) -> str:
    """SVG text of a graphviz.Digraph (or Graph), drawn by `dot`; a missing `dot` says how to install it."""
    _require_dot()
    return dot.pipe(format="svg").decode("utf-8")


def path_graph_dot(graph, selected=None, *, max_skip_edges: int = 400, title: str | None = None):
    """A graphviz.Digraph of the path graph; `selected` paths (Path objects or names) highlighted."""
    structure = graph.structure
    used_edges: set[tuple[str, str]] = set()
    used_nodes: set[str] = set()
    n_selected = 0
    for p in selected or ():
        blocks = parse_path(p)
        chain = (ENCODER, *blocks, DECODER)
        used_nodes.update(chain)
        used_edges.update(zip(chain, chain[1:]))
        n_selected += 1
    label = title or f"{structure.num_blocks} blocks, {graph.count():,} paths"
    if n_selected:
        label += f"; {n_selected} selected"
    dot = _blocks_digraph(structure, label, used_nodes)
    edges = list(graph.graph.edges)
    # long skip edges make big models unreadable: draw the residual chain, plus skips if few
    chain = [ENCODER, *[b.name for step in structure.steps for b in step.blocks], DECODER]
    consecutive = set(zip(chain, chain[1:]))
    draw_skips = len(edges) <= max_skip_edges
    for u, v in edges:
        used = (u, v) in used_edges
        if used:
            dot.edge(u, v, color=HIGHLIGHT, penwidth="2")
        elif (u, v) in consecutive or draw_skips:
            dot.edge(u, v, color="#bbbbbb" if (u, v) not in consecutive else "#777777")
    return dot


def _blocks_digraph(structure, label: str, used_nodes: set[str]):
    """A left-to-right graphviz.Digraph with η, the blocks (one rank per step) and the decoder."""
    import graphviz

    dot = graphviz.Digraph("paths", graph_attr={"rankdir": "LR", "fontname": "Helvetica", "splines": "true",
                                                "nodesep": "0.15", "ranksep": "0.35"},
                           node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "10"},
                           edge_attr={"arrowsize": "0.5"})
    dot.attr(label=label, labelloc="t", fontsize="12")
    dot.node(ENCODER, "embed\n(encoder η)", fillcolor=KIND_COLORS["encoder"],
             penwidth="2" if ENCODER in used_nodes else "1")
    for step in structure.steps:
        with dot.subgraph(name=f"step{step.index}") as s:
            s.attr(rank="same")
            for b in step.blocks:
                s.node(b.name, f"{b.name}\n{b.kind}", fillcolor=KIND_COLORS.get(b.kind, KIND_COLORS["other"]),
                       color=HIGHLIGHT if b.name in used_nodes else "#555555",
                       penwidth="2" if b.name in used_nodes else "1")
    dot.node(DECODER, "logits\n(decoder υ)", fillcolor=KIND_COLORS["decoder"],
             penwidth="2" if DECODER in used_nodes else "1")
    return dot


def split_edges(selected) -> tuple[set, set]:
    """(carry edges, interaction edges) used by split paths: a term enters a block either as the
    center it carries (carry) or as a direction the block's jet is differentiated along."""
    carry, interact, seen = set(), set(), set()

    def end(t) -> str:
        return t.block.name if t.block is not None else ENCODER

    def walk(t):
        if t.name in seen or t.center is None:
            return
        seen.add(t.name)
        target = t.block.name if t.block is not None else DECODER
        carry.add((end(t.center), target))
        for o in t.others:
            interact.add((end(o), target))
        for sub in (t.center, *t.others):
            walk(sub)

    for p in selected:
        walk(p)
    return carry, interact


def split_graph_dot(graph, selected=(), *, title: str | None = None):
    """A graphviz.Digraph of the split path graph: the residual chain, and for the `selected` split
    paths their carry edges (solid) and interaction edges (dashed)."""
    structure = graph.structure
    selected = list(selected)
    carry, interact = split_edges(selected)
    used_nodes = {n for e in carry | interact for n in e}
    label = title or (f"{structure.num_blocks} blocks, k={graph.k}: {graph.describe()} split paths"
                      + (f"; {len(selected)} selected (solid: carried, dashed: interacting)" if selected else ""))
    dot = _blocks_digraph(structure, label, used_nodes)
    chain = [ENCODER, *[b.name for step in structure.steps for b in step.blocks], DECODER]
    for u, v in zip(chain, chain[1:]):
        if (u, v) not in carry:
            dot.edge(u, v, color="#777777")
    for u, v in sorted(carry):
        dot.edge(u, v, color=HIGHLIGHT, penwidth="2")
    for u, v in sorted(interact):
        dot.edge(u, v, color=INTERACTION, penwidth="1.5", style="dashed", constraint="false")
    return dot


def render_path_graph(graph, selected=None, *, path: str | None = None, **kw) -> str:
    """SVG text of the path graph (a `PathGraph` or a `split.SplitPathGraph`); written to `path` if given."""
    _require_dot()
    make = split_graph_dot if isinstance(graph, SplitPathGraph) else path_graph_dot
    svg = svg_of(make(graph, selected or (), **kw))
    if path is not None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(svg)
    return svg


P.draw_with(render_path_graph)  # what PathGraph.render draws with
