"""The import graph of the jetfx package, read from the source with `ast` (nothing is imported).

Modules are jetfx/**.py and passes/**.py, the latter as `jetfx.passes.*` (how they are installed).
Every import counts, wherever it is written: at the top of a file, inside a function, under
`if TYPE_CHECKING:`. `from X import a` is an edge to the module `X.a` when `a` is a module, else to
`X`. The parents a Python import runs implicitly (`jetfx/__init__`, `passes/__init__`) are not
edges: only what a file names. Used by tests/test_layout.py and tools/draw_architecture.py.

LAYERS, bottom to top, are the order of the pipeline (docs/architecture.md): a module imports
from its own layer or the layers below it, never from a layer above.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "jetfx"

# (layer name, what it holds, its modules) bottom to top; a module named here that does not exist
# is ignored (so that a file can move between branches), a module that exists but is named
# nowhere fails tests/test_layout.py
LAYERS: list[tuple[str, str, tuple[str, ...]]] = [
    ("foundation", "errors, weight constraints, files, devices, safe loading, process groups",
     ("errors", "constraints", "files", "devices", "safe_pt2", "distributed")),
    ("graph passes", "GraphModule → GraphModule rewrites and node annotations; the residual structure",
     ("passes._graph", "passes.dependence", "passes.stream", "passes.cleanup", "passes.decompose", "passes.dtype",
      "passes.device", "passes.peephole", "passes.batching", "passes.partial", "passes.regions", "structure", "passes.residual_form",
      "passes.residual", "passes")),
    ("trace", "a model as one ATen graph with its residual structure",
     ("tracing", "models")),
    ("regions", "sub-graphs as functions: blocks, decoder, captures; per-head split",
     ("functions", "passes.heads")),
    ("jets", "Taylor-mode and nested-AD jets of a function",
     ("passes.taylor", "passes.mixed", "jets")),
    ("terms and paths", "the symbolic plan (terms), path sets and their filters, jet-weight sites, pictures",
     ("terms", "symbolic", "paths", "split_filters", "split_paths", "weight_sites", "pictures")),
    ("expanded module", "terms compiled into one GraphModule with hook points; export",
     ("expanded", "passes.materialize", "export")),
    ("user API", "expansions (Algorithms 1 and 2, split), decompositions, lenses, weights, n-grams, interactions",
     ("step_expansion", "split", "decomposition", "lens_view", "lens", "weights", "expansion",
      "ngram_kernels", "ngram_job", "ngram_db", "ngrams", "interactions")),
    ("command line", "the jetfx command and the demo; the package's namespace",
     ("cli_args", "cli_lens", "cli_ngrams", "cli", "demo", "__main__", "")),
]

def qualified(short: str) -> str:
    """"passes.heads" → "jetfx.passes.heads"; "" → "jetfx" (the package's __init__)."""
    return f"{PACKAGE}.{short}" if short else PACKAGE


def short(name: str) -> str:
    return name[len(PACKAGE) + 1:] if name != PACKAGE else ""


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    inner: bool  # written inside a function or under a condition, not at the top of the file

    def __str__(self) -> str:
        return f"{self.source} → {self.target} (line {self.line}{', inside a function' if self.inner else ''})"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted name: file} of jetfx/**.py and passes/**.py (as jetfx.passes.*)."""
    out: dict[str, Path] = {}
    for folder, package in (("jetfx", PACKAGE), ("passes", f"{PACKAGE}.passes")):
        base = root / folder
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base)
            if folder == "jetfx" and rel.parts[0] == "passes":  # the symlink to ../passes
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = f
    return out


def _package_of(name: str, file: Path) -> str:
    return name if file.stem == "__init__" else name.rpartition(".")[0]


def _top_level(tree: ast.Module) -> set[int]:
    return {id(node) for node in tree.body}


def imports(name: str, file: Path, known: dict[str, Path]) -> list[Edge]:
    """The edges from module `name` (its file `file`) to the modules in `known`."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    top = _top_level(tree)
    package = _package_of(name, file)
    edges: list[Edge] = []

    def add(target: str, node: ast.AST) -> None:
        if target in known and target != name:
            edges.append(Edge(name, target, node.lineno, id(node) not in top))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                add(sub if sub in known else target, node)
    return edges


def graph(root: Path = ROOT) -> tuple[dict[str, Path], list[Edge]]:
    """(modules, edges) of the package; one edge per import statement and target."""
    known = modules(root)
    edges = [e for name, f in known.items() for e in imports(name, f, known)]
    return known, edges


def find_cycle(nodes, edges: list[Edge]) -> list[Edge] | None:
    """A cycle of the graph as its edges (None if it is acyclic): depth-first search, three colors."""
    out: dict[str, list[Edge]] = {n: [] for n in nodes}
    for e in edges:
        out.setdefault(e.source, []).append(e)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(out):
        if state.get(start):
            continue
        path: list[Edge] = []
        stack = [(start, iter(out[start]))]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            e = next(it, None)
            if e is None:
                state[node] = 2
                stack.pop()
                if path:
                    path.pop()
                continue
            if state.get(e.target) == 1:  # back to a module on the current path: a cycle
                i = [n for n, _ in stack].index(e.target)
                return path[i:] + [e]
            if not state.get(e.target):
                state[e.target] = 1
                path.append(e)
                stack.append((e.target, iter(out.get(e.target, ()))))
    return None


def strongly_connected(nodes, edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    out: dict[str, list[str]] = {n: [] for n in nodes}
    for e in edges:
        out.setdefault(e.source, []).append(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(out):
        if root in index:
            continue
        work = [(root, iter(out[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(out.get(w, ()))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return sorted(found)


def layer_of(known) -> dict[str, int]:
    """{module: index of its layer in LAYERS} for the modules that exist."""
    out = {}
    for i, (_, _, members) in enumerate(LAYERS):
        for m in members:
            if qualified(m) in known:
                out[qualified(m)] = i
    return out


if __name__ == "__main__":  # the strongly connected components, for a quick look
    known, edges = graph()
    comps = strongly_connected(known, edges)
    print(f"{len(known)} modules, {len({(e.source, e.target) for e in edges})} edges, "
          f"{len(comps)} strongly connected components")
    for c in comps:
        print(" ", sorted(short(m) for m in c))
