"""The package's import graph is acyclic and goes one way through the layers (docs/architecture.md).

The graph is read with `ast` (tests/import_graph.py): every import counts, also those inside
functions and under `TYPE_CHECKING`, so that no cycle can hide in a function body.
"""

import textwrap
from pathlib import Path

import pytest

import import_graph as G


@pytest.fixture(scope="module")
def graph():
    return G.graph()


def test_import_graph_is_acyclic(graph):
    known, edges = graph
    cycle = G.find_cycle(known, edges)
    assert cycle is None, "import cycle:\n  " + "\n  ".join(map(str, cycle)) + (
        "\nmove the shared code down to the lower module, or pass the feature in (docs/architecture.md)")


def test_submodules_never_import_the_package(graph):
    """jetfx/__init__ re-exports everything: a submodule that imports from it depends on every module."""
    known, edges = graph
    bad = [str(e) for e in edges if e.target == G.PACKAGE and e.source != G.PACKAGE]
    assert not bad, "import the name from the module that defines it:\n  " + "\n  ".join(bad)


def test_every_module_has_a_layer(graph):
    known, _ = graph
    layers = G.layer_of(known)
    missing = sorted(G.short(m) for m in known if m not in layers and not m.startswith("jetfx.passes.taylor."))
    assert not missing, f"add these modules to a layer in tests/import_graph.py (LAYERS): {missing}"


def test_imports_go_down_the_layers(graph):
    known, edges = graph
    layers = G.layer_of(known)

    def layer(m):  # a module of a sub-package (jetfx.passes.taylor.*) is in its package's layer
        while m not in layers and "." in m:
            m = m.rpartition(".")[0]
        return layers.get(m)

    up = [f"{e}: layer {G.LAYERS[layer(e.source)][0]!r} imports {G.LAYERS[layer(e.target)][0]!r}"
          for e in edges if layer(e.source) is not None and layer(e.target) is not None
          and layer(e.target) > layer(e.source)]
    assert not up, "imports up the layers:\n  " + "\n  ".join(up)


# the checker itself, on small packages written here


def _package(tmp_path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    return tmp_path


def test_checker_finds_cycles_inside_functions_and_type_checking(tmp_path):
    root = _package(tmp_path, {
        "jetfx/__init__.py": "from . import a\n",
        "jetfx/a.py": "from .b import f\n",
        "jetfx/b.py": "def f():\n    from jetfx import c\n",
        "jetfx/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import g\n",
        "passes/__init__.py": "",
        "passes/p.py": "from ..c import x\nfrom . import q\n",
        "passes/q.py": "",
        "passes/pkg/__init__.py": "from .r import y\n",
        "passes/pkg/r.py": "from .. import p\nimport jetfx.passes.q\n",
    })
    known, edges = G.graph(root)
    assert set(known) == {"jetfx", "jetfx.a", "jetfx.b", "jetfx.c", "jetfx.passes", "jetfx.passes.p",
                          "jetfx.passes.q", "jetfx.passes.pkg", "jetfx.passes.pkg.r"}
    pairs = {(e.source, e.target) for e in edges}
    assert pairs == {("jetfx", "jetfx.a"), ("jetfx.a", "jetfx.b"), ("jetfx.b", "jetfx.c"), ("jetfx.c", "jetfx.a"),
                     ("jetfx.passes.p", "jetfx.c"), ("jetfx.passes.p", "jetfx.passes.q"),
                     ("jetfx.passes.pkg", "jetfx.passes.pkg.r"), ("jetfx.passes.pkg.r", "jetfx.passes.p"),
                     ("jetfx.passes.pkg.r", "jetfx.passes.q")}
    cycle = G.find_cycle(known, edges)
    assert cycle is not None and {e.source for e in cycle} == {"jetfx.a", "jetfx.b", "jetfx.c"}
    assert all(a.target == b.source for a, b in zip(cycle, cycle[1:] + cycle[:1]))
    assert G.strongly_connected(known, edges) == [["jetfx.a", "jetfx.b", "jetfx.c"]]
    inner = {(e.source, e.target): e.inner for e in edges}
    assert inner[("jetfx.b", "jetfx.c")] and inner[("jetfx.c", "jetfx.a")] and not inner[("jetfx.a", "jetfx.b")]
    acyclic = [e for e in edges if (e.source, e.target) != ("jetfx.c", "jetfx.a")]
    assert G.find_cycle(known, acyclic) is None and G.strongly_connected(known, acyclic) == []


def test_checker_sees_imports_of_the_package_root(tmp_path):
    root = _package(tmp_path, {"jetfx/__init__.py": "def load(): ...\n",
                               "jetfx/a.py": "def f():\n    import jetfx\n    return jetfx.load()\n",
                               "jetfx/b.py": "from . import load\n", "passes/__init__.py": ""})
    known, edges = G.graph(root)
    assert sorted((e.source, e.target) for e in edges) == [("jetfx.a", "jetfx"), ("jetfx.b", "jetfx")]


def test_architecture_picture_shows_every_module(graph):
    """docs/architecture.svg (tools/draw_architecture.py) draws the modules that exist, in their layers."""
    import re

    known, _ = graph
    layers = G.layer_of(known)
    svg = (G.ROOT / "docs" / "architecture.svg").read_text(encoding="utf-8")
    drawn = {t for t in re.findall(r"<title>([^<]*)</title>", svg) if t.startswith(G.PACKAGE) and "&#45;" not in t}
    assert drawn == set(layers), ("docs/architecture.svg is out of date: run tools/draw_architecture.py "
                                  f"(missing {sorted(set(layers) - drawn)}, gone {sorted(drawn - set(layers))})")
