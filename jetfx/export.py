"""Save and reload expanded modules in a safe, standard format.

`export(ex, path)` writes a zip with two entries:

- `program.pt2`: the expanded module as a torch.export program (`torch.export.save`), with dynamic
  batch and sequence dimensions, no sample inputs, no guard code and no source metadata. Its forward
  returns a dict {path name: logits, …, "remainder", "logits"}, so other tools read any path by name.
- `manifest.json`: format version, path names, k, the model's name, the SHA-256 of `program.pt2` and,
  when a key is given, an HMAC-SHA256 signature.

What protects what:

- the SHA-256 detects corruption (a truncated download, a flipped bit). It sits in the same file, so
  it cannot detect tampering: whoever edits the program can rewrite the hash;
- against tampering, `load_expanded` never runs code from the file, whatever it holds: the program is
  read by `jetfx.safe_pt2`, which refuses pickles, guard code, unknown operators and anything else a
  jetfx export never contains before torch deserializes a byte of it (`torch.export.load` itself
  would unpickle the sample inputs and exec the guard code, and is never called);
- to know *who* made a file, sign it: `export(ex, path, key=b"secret")` and
  `load_expanded(path, key=b"secret")` refuse files whose signature does not verify.

Without jetfx, `torch.export.load` reads the program (it trusts its input: only do that with files
you made):

    import zipfile, io, torch
    program = torch.export.load(io.BytesIO(zipfile.ZipFile(path).read("program.pt2")))
    outputs = program.module()(token_ids)      # dict: path name -> (batch, seq, vocab) logits
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import io
import json
import os
import tempfile
import zipfile

import torch

from . import passes
from .errors import ExportError, InputError
from .expanded import REMAINDER, ExpandedModule, ExpansionOutput, PathHooks, PathInterventions, restack
from .functions import device_of
from .safe_pt2 import UnsafeFileError, read_program

FORMAT = "jetfx-expanded"
VERSION = 2
RESERVED = ("remainder", "logits")
_STRIPPED_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "from_node", "custom")

__all__ = ["ExportError", "LoadedExpansion", "UnsafeFileError", "export", "load_expanded"]


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


def _check_target(path, overwrite: bool) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"export needs a file name (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ExportError(f"{path} is a folder; give a file name such as {os.path.join(path, 'expansion.jetfx.zip')}")
    if not os.path.isdir(folder):
        raise ExportError(f"the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise ExportError(f"the folder {folder} is not writable; choose another place")
    if os.path.exists(path) and not overwrite and not _is_jetfx_export(path):
        raise ExportError(f"{path} exists and is not a jetfx export; refusing to replace it "
                          "(pass overwrite=True to replace it anyway)")
    return path


def _is_jetfx_export(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read("manifest.json")).get("format") == FORMAT
    except (OSError, KeyError, ValueError, AttributeError, zipfile.BadZipFile):
        return False


def _example(ex: ExpandedModule, tokens) -> torch.Tensor:
    """Example ids of batch ≥ 2 and length ≥ 2 (a size-1 example makes torch.export specialize to 1)."""
    device = device_of(ex)
    if tokens is None:
        return torch.zeros(2, 7, dtype=torch.long, device=device)
    from .tracing import as_tokens

    ids = as_tokens(tokens, getattr(ex, "tokenizer", None)).to(device)
    return ids.repeat(2 if ids.shape[0] == 1 else 1, 2 if ids.shape[1] == 1 else 1)


def _float_example(ex: ExpandedModule, traced, given) -> torch.Tensor:
    """An example input for a module of float inputs: the traced example's shape, batch ≥ 2."""
    if given is not None:
        return given.repeat(2, *[1] * (given.dim() - 1)) if given.shape[0] == 1 else given
    shape, dtype = traced.example_inputs[0]
    return torch.randn((max(2, shape[0]), *shape[1:]), device=device_of(ex)).to(dtype)


def _specialized_dims(error: Exception) -> list[str]:
    """Which of the token dimensions torch.export had to fix ("Constraints violated (batch, length)")."""
    head = str(error).split("!")[0]
    if "Constraints violated" not in head:
        return []
    return [label for dim, label in (("batch", "batch"), ("length", "sequence length")) if dim in head]


def _why_static(ex: ExpandedModule) -> str:
    from .jets import NestedJet

    nested = sorted({name for name, m in ex.named_modules() if isinstance(m, NestedJet)})
    fallback = sorted({op for m in ex.modules() for op in getattr(m, "fallback_ops", ()) or ()})
    if nested:
        return (f"its jets use nested forward AD ({', '.join(nested[:3])}), which torch.export specialises to the "
                "example's shapes; expand with jets='taylor'")
    if fallback:
        return (f"its Taylor jets fall back to nested forward AD for {', '.join(fallback[:5])}, which torch.export "
                "specialises to the example's shapes")
    return "an operation in it needs concrete sizes"


def _export_program(ex: ExpandedModule, example: torch.Tensor, static: bool, float_input: bool = False):
    from torch.export import Dim

    if static:
        dims = None
    elif float_input:  # the batch is dynamic; other sizes as torch.export finds them
        dims = {"tokens": {0: Dim("batch", min=1), **{i: Dim.AUTO for i in range(1, example.dim())}}}
    else:
        dims = {"tokens": {0: Dim("batch", min=1), 1: Dim("length", min=1)}}
    try:
        return torch.export.export(_Named(ex), (example,), dynamic_shapes=dims, strict=False)
    except Exception as e:  # torch.export raises many types; report why in the user's terms
        fixed = _specialized_dims(e)
        if fixed:
            raise ExportError(
                f"this expansion cannot be exported with a dynamic {' and '.join(fixed)}: {_why_static(ex)}. "
                f"Or export it for one shape with export(..., static=True) (the file then accepts only token "
                f"tensors of shape {tuple(example.shape)}; pass example_tokens= to choose it)") from None
        raise ExportError(f"torch.export could not export this expansion: {str(e).splitlines()[0][:400]}") from None


def _one_input_per_tensor(program, ex: ExpandedModule):
    """The program with one lifted input per tensor: torch.export lifts every name a parameter is
    registered under (the jets' regions register the model's weights again, see
    `ExpandedModule.aliases`); each alias's uses go to its owner's input, and the alias leaves the
    signature and the state dict, so the file names each tensor once (and stores it once)."""
    from torch.export.graph_signature import ExportGraphSignature, InputKind

    owner_of = {f"ex.{alias}": f"ex.{owner}" for alias, owner in ex.aliases().items()}
    tensors = {**program.state_dict, **program.constants}
    specs = program.graph_signature.input_specs
    lifted = {s.target: s for s in specs if s.kind in (InputKind.PARAMETER, InputKind.BUFFER)}
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    dropped = set()
    for alias, owner in owner_of.items():
        a, o = lifted.get(alias), lifted.get(owner)
        same = alias in tensors and tensors[alias] is tensors.get(owner)
        if a is None or o is None or a.kind != o.kind or not same:
            continue
        node = placeholders[a.arg.name]
        node.replace_all_uses_with(placeholders[o.arg.name])
        program.graph.erase_node(node)
        dropped.add(alias)
    if not dropped:
        return program
    program.graph_module.recompile()
    signature = ExportGraphSignature([s for s in specs if s.target not in dropped or s.kind not in
                                      (InputKind.PARAMETER, InputKind.BUFFER)],
                                     list(program.graph_signature.output_specs))
    return program._update(program.graph_module, signature,
                           state_dict={k: v for k, v in program.state_dict.items() if k not in dropped},
                           constants={k: v for k, v in program.constants.items() if k not in dropped})


def _strip(program) -> None:
    """Leave out what the file does not need and a loader must not trust: sample inputs, guard code,
    source metadata (stack traces hold local paths)."""
    program.example_inputs = None
    program._guards_code = []
    for node in program.graph.nodes:
        for key in _STRIPPED_META:
            node.meta.pop(key, None)


def _signature(key: bytes, manifest: dict, data: bytes) -> str:
    body = json.dumps({k: v for k, v in manifest.items() if k != "hmac"}, sort_keys=True).encode()
    return hmac.new(key, body + b"\0" + data, hashlib.sha256).hexdigest()


def _as_key(key) -> bytes | None:
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ExportError("key must be non-empty bytes or text (the secret shared by who signs and who loads)")
    return bytes(key)


def export(ex: ExpandedModule, path, example_tokens=None, *, static: bool = False, overwrite: bool = False,
           key: bytes | str | None = None) -> str:
    """Write `ex` to `path` (conventionally `*.jetfx.zip`); returns the path.

    The program keeps a dynamic batch and sequence length; an expansion that torch.export can only
    trace for fixed sizes is refused with the reason, unless `static=True` (then the file serves the
    shape of `example_tokens` only). `key` signs the file (HMAC-SHA256). An existing file that is not a
    jetfx export is only replaced with `overwrite=True`.
    """
    if not isinstance(ex, ExpandedModule):
        raise ExportError(f"export takes a module made by jetfx.expand/compile, got {type(ex).__name__}")
    key = _as_key(key)
    path = _check_target(path, overwrite)
    clash = set(RESERVED) & set(ex.path_names)
    if clash:
        raise ExportError(f"path names {sorted(clash)} clash with the reserved outputs")
    traced = getattr(getattr(ex, "source", None), "jetfx", None)
    float_input = getattr(traced, "input_kind", "tokens") == "float"
    example = _float_example(ex, traced, example_tokens) if float_input else _example(ex, example_tokens)
    program = _one_input_per_tensor(_export_program(ex, example, static, float_input), ex)
    _strip(program)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    data = buf.getvalue()
    info = getattr(getattr(ex, "source", None), "jetfx", None)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "sha256": hashlib.sha256(data).hexdigest(),
        "path_names": list(ex.path_names),
        "outputs": [*ex.path_names, *RESERVED],
        "k": ex.k,
        "vocab_size": getattr(info, "embedding_size", None),
        "model": getattr(info, "model_name", None),
        "torch": torch.__version__,
        "static_shape": list(example.shape) if static else None,
        "input": "float" if float_input else "tokens",
    }
    if key is not None:
        manifest["hmac"] = _signature(key, manifest, data)
    fd, tmp = tempfile.mkstemp(prefix=".jetfx-export-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr("manifest.json", json.dumps(manifest, indent=1))
            z.writestr("program.pt2", data)
        os.replace(tmp, path)  # atomic: an interrupted export never leaves half a file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


class LoadedExpansion(PathInterventions, torch.nn.Module):
    """A reloaded expansion. `module` is the plain torch.nn.Module rebuilt from the file (forward returns
    the dict of outputs); calling the expansion returns an `ExpansionOutput`, and its forward passes
    every path through a hook point (`hooks`), as an `ExpandedModule` does: nnsight, forward hooks,
    `intervene`/`ablate`/`patch` work on it the same way."""

    def __init__(self, module: torch.nn.Module, path_names: tuple[str, ...], manifest: dict,
                 vocab_size: int | None = None):
        super().__init__()
        self.module = module
        self.path_names = tuple(path_names)
        self.manifest = manifest
        self.vocab_size = vocab_size
        self.hooks = PathHooks(self.path_names)

    def forward(self, tokens: torch.Tensor):
        if self.manifest.get("input") == "float":
            if not isinstance(tokens, torch.Tensor) or not tokens.is_floating_point():
                raise InputError("this reloaded expansion takes a floating tensor like the model it was made from")
        else:
            tokens = self._checked_tokens(tokens)
        static = self.manifest.get("static_shape")
        if static is not None and list(tokens.shape) != list(static):
            raise InputError(f"this file was exported for inputs of shape {tuple(static)} only (static=True), got "
                             f"{tuple(tokens.shape)}; re-export without static=True if you can")
        out = self.module(tokens)
        rows = [out[n] for n in self.path_names]  # views of one tensor: no copy unless a hook replaces one
        stacked = restack(None, rows, [self.hooks[n](row) for n, row in zip(self.path_names, rows)])
        return stacked, self.hooks[REMAINDER](out["remainder"]), out["logits"]

    def _checked_tokens(self, tokens) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            from .tracing import as_tokens

            tokens = as_tokens(tokens).to(device_of(self.module))
        if tokens.dtype not in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8) or tokens.dim() != 2:
            raise InputError("a reloaded expansion takes token ids: an integer tensor of shape (batch, seq), "
                             f"got {tokens.dtype} of shape {tuple(tokens.shape)}")
        if self.vocab_size is not None and tokens.numel() and tokens.device.type != "meta":
            lo, hi = torch.stack([tokens.min(), tokens.max()]).tolist()  # one transfer
        else:
            lo, hi = 0, 0
        if self.vocab_size is not None and (lo < 0 or hi >= self.vocab_size):
            raise InputError(f"token ids must lie in [0, {self.vocab_size}) for this model")
        return tokens.long()

    def __call__(self, tokens: torch.Tensor) -> ExpansionOutput:
        return ExpansionOutput(self.path_names, *super().__call__(tokens))


def _read_archive(path) -> tuple[dict, bytes]:
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"load_expanded needs a file name, got {type(path).__name__}")
    try:
        z = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ExportError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise ExportError(f"{path} is a folder, not a jetfx export") from None
    except (zipfile.BadZipFile, OSError):
        raise ExportError(f"{path} is not a jetfx export (not a zip archive); nothing was loaded") from None
    with z:
        names = set(z.namelist())
        if not {"manifest.json", "program.pt2"} <= names:
            raise ExportError(f"{path} is not a jetfx export (it has no manifest/program); nothing was loaded")
        try:
            manifest = json.loads(z.read("manifest.json"))
            data = z.read("program.pt2")
        except (ValueError, zipfile.BadZipFile, OSError) as e:
            raise ExportError(f"{path} is damaged ({e}); nothing was loaded") from None
    return manifest, data


def _check_manifest(path, manifest) -> tuple[str, ...]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path} is not a jetfx export (unknown format); nothing was loaded")
    if manifest.get("version") != VERSION:
        raise ExportError(f"{path} has export format version {manifest.get('version')!r}; this jetfx reads version "
                          f"{VERSION}: export the expansion again with this jetfx")
    names = manifest.get("path_names")
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names) or set(names) & set(RESERVED)):
        raise ExportError(f"{path} has a damaged manifest: 'path_names' must be a list of distinct path names")
    static = manifest.get("static_shape")
    if static is not None and not (isinstance(static, list) and len(static) == 2 and all(isinstance(s, int) and s > 0 for s in static)):
        raise ExportError(f"{path} has a damaged manifest: 'static_shape' must be [batch, length] or null")
    return tuple(names)


def _embedding_rows(module: torch.fx.GraphModule) -> int | None:
    """Rows of the token embedding the program indexes with its token input (its vocabulary)."""
    aten = torch.ops.aten
    reshapes = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
                aten.flatten.using_ints, aten.clone.default, aten.to.dtype, aten.to.dtype_layout, aten.alias.default}
    tokens = {n for n in module.graph.nodes if n.op == "placeholder"}
    for node in module.graph.nodes:  # the token ids, reshaped (GPT-2 views them as (-1, seq))
        if node.op == "call_function" and node.target in reshapes and node.args and node.args[0] in tokens:
            tokens.add(node)
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default and node.args[1] in tokens:
            weight = node.args[0]
            if weight.op == "get_attr":
                from .passes._graph import fetch_attr

                return int(fetch_attr(module, weight.target).shape[0])
    return None


def load_expanded(path, *, key: bytes | str | None = None) -> LoadedExpansion:
    """Reload a module written by `export`, refusing foreign, altered or unsafe files.

    Nothing in the file is executed (see the module docstring); with `key`, the file's HMAC
    signature must verify.
    """
    key = _as_key(key)
    manifest, data = _read_archive(path)
    names = _check_manifest(path, manifest)
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise ExportError(f"{path} was altered after export (its program does not match the manifest's SHA-256); "
                          "refusing to load it")
    if key is not None:
        signature = manifest.get("hmac")
        if not isinstance(signature, str):
            raise ExportError(f"{path} is not signed, but a key was given: refusing to load it")
        if not hmac.compare_digest(signature, _signature(key, manifest, data)):
            raise ExportError(f"{path} does not verify with this key: it was altered or signed with another key")
    try:
        program = read_program(data)
    except UnsafeFileError as e:
        raise UnsafeFileError(f"{path}: {e}") from None
    module = program.module()
    outputs = _output_names(module)
    if outputs is not None and list(outputs) != [*names, *RESERVED]:
        raise ExportError(f"{path} has a manifest that does not match its program: the program returns "
                          f"{list(outputs)[:6]}…, the manifest names {list(names)[:6]}…")
    passes.drop_metadata_asserts(module)
    passes.make_device_agnostic(module, anchor="tokens")
    vocab = _embedding_rows(module)
    stated = manifest.get("vocab_size")
    if vocab is not None and stated is not None and stated != vocab:
        raise ExportError(f"{path} has a manifest that does not match its program: vocab_size {stated!r}, "
                          f"but the program's embedding has {vocab} rows")
    return LoadedExpansion(module, names, manifest, vocab)


def _output_names(module) -> list | None:
    spec = getattr(module, "_out_spec", None)
    context = getattr(spec, "context", None)
    return list(context) if isinstance(context, (list, tuple)) else None
