"""jetfx: jet expansions of residual computation, as a torch.fx compiler.

    gm = jetfx.trace(model, tokens)     # ATen graph + residual structure
    ex = jetfx.expand(gm, k=1)          # paths + exact remainder, one GraphModule
    out = ex(tokens); out.paths, out.remainder

See README.md for a tour.
"""

from . import functions, jets, paths, pictures, split, weights  # noqa: F401  (jetfx.functions, … as attributes; pictures: PathGraph.render)
from .errors import ExpansionError, InputError, JetfxError, MissingDependencyError, StructureError, TraceError
from .expanded import ExpandedModule, ExpansionOutput
from .decomposition import ResidDecomposition, decompose_resid
from .export import export, load_expanded  # noqa: E402  (rebinds jetfx.export to the function)
from .expansion import JetExpansion, branch, constant, encoder, expand, exponential, jet_expand, stream
from .jets import jet, jet_coefficients
from .paths import Path, PathGraph
from .structure import ResidualStructure
from .tracing import as_traced, info_of, residual_of, trace

__version__ = "0.1.0"


def load(name_or_path: str = "smollm2-135m", **kw):
    """A causal LM and its tokenizer: `model, tokenizer = jetfx.load(...)` (see jetfx.models)."""
    from .models import load as _load

    return _load(name_or_path, **kw)


def path_graph(gm) -> PathGraph:
    """The path graph of a traced model (its paths are those of the exponential expansion)."""
    return PathGraph(residual_of(gm))


__all__ = [
    "ExpandedModule", "ExpansionError", "ExpansionOutput", "InputError", "JetExpansion", "JetfxError",
    "MissingDependencyError", "Path", "PathGraph", "ResidualStructure", "StructureError", "TraceError",
    "ResidDecomposition", "as_traced", "branch", "constant", "decompose_resid", "encoder", "expand", "exponential", "info_of", "jet", "jet_coefficients",
    "export", "jet_expand", "load", "load_expanded", "path_graph", "paths", "residual_of", "split", "stream", "trace",
    "weights",
]
