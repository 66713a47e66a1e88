"""Save and reload expanded modules in a safe, standard format.

`export(ex, path)` writes a zip with two entries:

- `program.pt2`: the expanded module as a torch.export program (`torch.export.save`), with dynamic
  batch and sequence dimensions. Its forward returns a dict {path name: logits, …, "remainder",
  "logits"}, so other tools can read any path output by name.
- `manifest.json`: format version, path names, k, the model's name and the SHA-256 of
  `program.pt2`.

`load_expanded(path)` checks the manifest and the hash before handing the program to
`torch.export.load`, which rebuilds the graph from its serialized schema and loads tensors without
unpickling code. A file that is not a jetfx export, or whose program was altered, is refused
before anything is deserialized. Without jetfx, the program loads with plain PyTorch:

    import zipfile, io, torch
    program = torch.export.load(io.BytesIO(zipfile.ZipFile(path).read("program.pt2")))
    outputs = program.module()(token_ids)      # dict: path name -> (batch, seq, vocab) logits
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import zipfile
import torch

from .errors import InputError, JetfxError
from .expanded import REMAINDER, ExpandedModule, ExpansionOutput, PathHooks, PathInterventions
from .functions import device_of

FORMAT = "jetfx-expanded"
VERSION = 1


class ExportError(JetfxError):
    """An expanded module could not be exported, or a file is not a valid jetfx export."""


class _Named(torch.nn.Module):
    """forward(tokens) -> {path name: logits, "remainder": …, "logits": …} for export."""

    def __init__(self, ex: ExpandedModule):
        super().__init__()
        self.ex = _without_token_checks(ex)
        self.names = tuple(ex.path_names)

    def forward(self, tokens):
        stacked, remainder, logits = self.ex(tokens)
        out = {name: stacked[i] for i, name in enumerate(self.names)}
        out["remainder"] = remainder
        out["logits"] = logits
        return out


def _without_token_checks(ex: ExpandedModule) -> torch.fx.GraphModule:
    """A plain GraphModule copy of `ex` without the token-range check (a data-dependent host
    check that torch.export cannot keep); the reloaded module's wrapper checks ids instead."""
    from .tracing import check_tokens

    graph = copy.deepcopy(ex.graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is check_tokens:
            graph.erase_node(node)
    return torch.fx.GraphModule(ex, graph, class_name="ExpandedForExport")


def export(ex: ExpandedModule, path: str, example_tokens: torch.Tensor | None = None) -> str:
    """Write `ex` to `path` (conventionally `*.jetfx.zip`); returns the path."""
    if not isinstance(ex, ExpandedModule):
        raise ExportError(f"export takes a module made by jetfx.expand/compile, got {type(ex).__name__}")
    clash = {"remainder", "logits"} & set(ex.path_names)
    if clash:
        raise ExportError(f"path names {sorted(clash)} clash with the reserved outputs")
    traced = getattr(getattr(ex, "source", None), "jetfx", None)
    float_input = getattr(traced, "input_kind", "tokens") == "float"
    if example_tokens is None and float_input:  # a module of float inputs: its traced example's shape
        shape, dtype = traced.example_inputs[0]
        example_tokens = torch.randn((max(2, shape[0]), *shape[1:]), device=device_of(ex)).to(dtype)
    if example_tokens is None:
        example_tokens = torch.zeros(2, 7, dtype=torch.long, device=device_of(ex))
    dims = {"tokens": {i: torch.export.Dim.AUTO for i in range(example_tokens.dim())}}
    try:
        program = torch.export.export(_Named(ex), (example_tokens,), dynamic_shapes=dims, strict=False)
    except Exception as e:  # torch.export raises many types; report the first line of why
        raise ExportError(f"torch.export could not export this expansion: {str(e).splitlines()[0][:400]}. "
                          "Expansions with Taylor-mode jets (jets='taylor', the default) export; nested-AD "
                          "jets do not") from None
    buf = io.BytesIO()
    torch.export.save(program, buf)
    data = buf.getvalue()
    info = getattr(ex, "source", None)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "sha256": hashlib.sha256(data).hexdigest(),
        "path_names": list(ex.path_names),
        "outputs": [*ex.path_names, "remainder", "logits"],
        "k": ex.k,
        "vocab_size": getattr(getattr(info, "jetfx", None), "embedding_size", None),
        "model": getattr(getattr(info, "jetfx", None), "model_name", None),
        "torch": torch.__version__,
        "input": "float" if float_input else "tokens",
    }
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("manifest.json", json.dumps(manifest, indent=1))
        z.writestr("program.pt2", data)
    return path


class LoadedExpansion(PathInterventions, torch.nn.Module):
    """A reloaded expansion. `module` is the plain torch.nn.Module from torch.export (forward returns
    the dict of outputs); calling the expansion returns an `ExpansionOutput`, and its forward passes
    every path through a hook point (`hooks`), as an `ExpandedModule` does: nnsight, forward hooks,
    `intervene`/`ablate`/`patch` work on it the same way."""

    def __init__(self, module: torch.nn.Module, path_names: tuple[str, ...], manifest: dict):
        super().__init__()
        self.module = module
        self.path_names = tuple(path_names)
        self.manifest = manifest
        self.hooks = PathHooks(self.path_names)

    def forward(self, tokens: torch.Tensor):
        if self.manifest.get("input") == "float":
            if not isinstance(tokens, torch.Tensor) or not tokens.is_floating_point():
                raise InputError("this reloaded expansion takes a floating tensor like the model it was made from")
        else:
            tokens = self._checked_tokens(tokens)
        out = self.module(tokens)
        stacked = torch.stack([self.hooks[n](out[n]) for n in self.path_names])
        return stacked, self.hooks[REMAINDER](out["remainder"]), out["logits"]

    def _checked_tokens(self, tokens) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int):
            raise InputError("a reloaded expansion takes token ids (an integer tensor of shape (batch, seq))")
        vocab = self.manifest.get("vocab_size")
        if vocab is not None and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise InputError(f"token ids must lie in [0, {vocab}) for this model")
        return tokens.long()

    def __call__(self, tokens: torch.Tensor) -> ExpansionOutput:
        return ExpansionOutput(self.path_names, *super().__call__(tokens))


def load_expanded(path: str) -> LoadedExpansion:
    """Reload a module written by `export`, refusing foreign or altered files."""
    try:
        z = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ExportError(f"no such file: {path}") from None
    except zipfile.BadZipFile:
        raise ExportError(f"{path} is not a jetfx export (not a zip archive); nothing was loaded") from None
    with z:
        names = set(z.namelist())
        if not {"manifest.json", "program.pt2"} <= names:
            raise ExportError(f"{path} is not a jetfx export (it has no manifest/program); nothing was loaded")
        try:
            manifest = json.loads(z.read("manifest.json"))
            data = z.read("program.pt2")
        except (ValueError, zipfile.BadZipFile) as e:
            raise ExportError(f"{path} is damaged ({e}); nothing was loaded") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path} is not a jetfx export (unknown format); nothing was loaded")
    if manifest.get("version") != VERSION:
        raise ExportError(f"{path} has export format version {manifest.get('version')}; this jetfx reads {VERSION}")
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise ExportError(f"{path} was altered after export (its program does not match the manifest's SHA-256); "
                          "refusing to load it")
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as e:
        raise ExportError(f"torch.export could not load the program in {path}: {str(e).splitlines()[0][:300]}") from None
    return LoadedExpansion(program.module(), tuple(manifest["path_names"]), manifest)
