"""Draw docs/architecture.svg: jetfx's modules in their layers, and who imports whom.

The graph is the one tests/test_layout.py checks (tests/import_graph.py: every import, read with
`ast`), drawn with jetfx's own graphviz helper (`jetfx.pictures.svg_of`). Layers are boxes, bottom
to top (invisible edges stack them); an arrow a → b means a imports b. Only the transitive reduction is drawn: an import that
a chain of other imports already implies is left out, so the picture stays readable. Modules of a
sub-package (jetfx.passes.taylor.*) are drawn as their package.

    .venv/bin/python tools/draw_architecture.py            # writes docs/architecture.svg
    .venv/bin/python tools/draw_architecture.py --out x.svg
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import graphviz  # noqa: E402
import networkx as nx  # noqa: E402

import import_graph as G  # noqa: E402
from jetfx.pictures import svg_of  # noqa: E402

LAYER_COLORS = ["#f2f2f2", "#e3eef8", "#e5f3e0", "#fdf0e1", "#f6e3ee", "#ece6f6", "#fbf7dd", "#e0f3f2", "#f7e5e5"]


def drawn(name: str, known) -> str:
    """The node a module is drawn as: itself, or its sub-package's (jetfx.passes.taylor.rules → jetfx.passes.taylor)."""
    layers = G.layer_of(known)
    while name not in layers and name.count(".") > 2:
        name = name.rpartition(".")[0]
    return name


def module_graph(root: Path = G.ROOT) -> tuple[nx.DiGraph, dict[str, int]]:
    """(the reduced import graph over drawn modules, {module: layer index})."""
    known, edges = G.graph(root)
    layers = G.layer_of(known)
    g = nx.DiGraph()
    g.add_nodes_from(m for m in known if m in layers)
    for e in edges:
        a, b = drawn(e.source, known), drawn(e.target, known)
        if a != b:
            g.add_edge(a, b)
    return nx.transitive_reduction(g), layers


def architecture_dot(root: Path = G.ROOT):
    g, layers = module_graph(root)
    dot = graphviz.Digraph("architecture", graph_attr={
        "rankdir": "TB", "fontname": "Helvetica", "newrank": "true", "nodesep": "0.12", "ranksep": "0.45",
        "label": "jetfx: layers bottom to top; a → b: a imports b (transitive reduction)", "labelloc": "t",
        "fontsize": "13"},
        node_attr={"shape": "box", "style": "rounded,filled", "fillcolor": "white", "fontname": "Helvetica",
                   "fontsize": "10", "height": "0.3"},
        edge_attr={"arrowsize": "0.5", "color": "#777777"})
    shown = [i for i in range(len(G.LAYERS)) if any(layers[m] == i for m in g.nodes)]
    for i in shown:
        name, what, _ = G.LAYERS[i]
        members = sorted((m for m in g.nodes if layers[m] == i), key=G.short)
        with dot.subgraph(name=f"cluster_{i}") as c:
            c.attr(label=f"{i + 1}. {name}: {what}", style="filled,rounded", color="#bbbbbb",
                   fillcolor=LAYER_COLORS[i % len(LAYER_COLORS)], fontsize="11", labeljust="l", labelloc="b")
            c.node(f"top{i}", "", style="invis", width="0", height="0")
            c.node(f"bottom{i}", "", style="invis", width="0", height="0")
            for m in members:
                c.node(m, G.short(m) or "jetfx (__init__)", tooltip=m)
                c.edge(f"top{i}", m, style="invis")
                c.edge(m, f"bottom{i}", style="invis")
    for upper, lower in zip(shown[::-1], shown[::-1][1:]):  # each layer's box above the next one down
        dot.edge(f"bottom{upper}", f"top{lower}", style="invis")
    for a, b in sorted(g.edges):
        dot.edge(a, b)
    return dot


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "architecture.svg"))
    args = parser.parse_args(argv)
    Path(args.out).write_text(svg_of(architecture_dot()), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
