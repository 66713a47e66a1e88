"""Read a torch.export `.pt2` archive without running any code that the file brings.

`torch.export.load` trusts its input: it unpickles the sample inputs (falling back to torch.load's
unrestricted unpickler), unpickles custom objects and pickled weights, `exec`s the archive's guard code
when the module is built, `sympify`s (that is, `eval`s) symbolic-shape strings, and resolves node
targets by `getattr` from the `torch` module (`torch.os.system` resolves). This reader accepts only
what a jetfx export holds and refuses everything else *before* torch sees it:

- members: the format and version markers, one program JSON, raw weight and tensor-constant payloads
  and their JSON configs, and an empty sample-inputs member. Anything else (pickled sample inputs,
  custom or opaque objects, legacy pickled weight files, AOTInductor libraries, extra files) is refused;
- tensors are read from raw bytes (`torch.frombuffer`) and checked against their size, stride and
  offset; a payload marked as pickled is refused;
- the program JSON is parsed into torch's schema dataclasses (plain data), then checked: node targets
  against an allow-list (ATen operators, `operator`/`math` arithmetic on sizes, torch.sym_* and the
  vmap markers torch.export emits), every symbolic expression against a grammar of integers, size
  symbols, arithmetic and a fixed set of sympy functions (no names, attributes, strings or calls
  beyond those), every module and parameter name against a dotted-identifier pattern, output
  specs against the plain containers; guard code and named-tuple definitions must be absent, and
  all node metadata is dropped.

Only then is the checked program handed to torch's deserializer, without sample inputs.
"""

from __future__ import annotations

import ast
import io
import json
import re
import sys
import zipfile
from dataclasses import fields, is_dataclass

import torch

from .errors import ExportError

_FQN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_SYMBOL = re.compile(r"[a-z]{1,6}[0-9]+")
_PAYLOAD = {"weights": re.compile(r"weight_[0-9]+"), "constants": re.compile(r"tensor_[0-9]+")}
_SYMPY_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "StrictLessThan", "StrictGreaterThan",
    "LessThan", "GreaterThan", "Equality", "Unequality", "BooleanTrue", "BooleanFalse", "Infinity",
    "NegativeInfinity", "IntInfinity", "NegativeIntInfinity", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "Max", "Min", "Abs", "Eq", "Ne", "Ge", "Gt", "Le", "Lt",
    "And", "Or", "Not", "floor", "ceiling", "oo", "True", "False", "true", "false",
})
_SYMBOL_FLAGS = frozenset({"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
                           "zero", "nonzero", "even", "odd", "commutative"})
_BIN_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd, ast.BitOr)
_OPERATOR_TARGETS = frozenset(f"_operator.{n}" for n in (
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le", "gt", "ge",
    "and_", "or_", "not_", "pos", "abs"))
_OTHER_TARGETS = frozenset({
    "math.ceil", "math.floor", "math.trunc", "math.sqrt",
    "torch.sym_int", "torch.sym_float", "torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_ite",
    "torch.sym_sum", "torch.sym_sqrt", "torch._sym_sqrt",
    "torch._C._set_grad_enabled",
}) | frozenset(  # torch.export keeps vmap and jvp as these markers around the transformed region
    f"torch._functorch.predispatch.{n}" for n in (
        "lazy_load_decompositions", "_vmap_increment_nesting", "_vmap_decrement_nesting", "_add_batch_dim",
        "_remove_batch_dim", "_jvp_increment_nesting", "_jvp_decrement_nesting", "_enter_dual_level",
        "_exit_dual_level", "_make_dual", "_unpack_dual", "_unwrap_for_grad"))
_ATEN = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)")
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"})


class UnsafeFileError(ExportError):
    """A file holds something that loading could execute, or that jetfx exports never contain."""


def _unsafe(what: str) -> UnsafeFileError:
    return UnsafeFileError(f"refusing to load an unsafe file: {what}. jetfx exports never contain this; the file "
                           "was made by another program or tampered with, and nothing in it was run")


# ---------------------------------------------------------------------------------------------
# checks on the program JSON


def check_sym_expr(text: str) -> None:
    """Refuse a symbolic-shape expression that is not integers, size symbols and allowed functions.

    torch writes these in sympy's `srepr` form (`Mul(Integer(4), Symbol('s27', positive=True,
    integer=True))`) and reads them with `sympify`, which evaluates Python. The text is parsed (never
    evaluated) here, and only calls of known sympy functions on integer literals, size symbols and
    boolean keyword flags pass; powers need a small literal exponent, so nothing huge is computed.
    """
    if not isinstance(text, str) or len(text) > 4000:
        raise _unsafe("an over-long or non-text symbolic expression")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        raise _unsafe(f"an unreadable symbolic expression {text[:60]!r}") from None
    stack = [tree.body]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Constant):
            ok = (isinstance(node.value, bool) or (isinstance(node.value, int) and abs(node.value) < 2**63)
                  or (isinstance(node.value, float)) or (isinstance(node.value, str) and _SYMBOL.fullmatch(node.value)))
        elif isinstance(node, ast.Name):
            ok = node.id in _SYMPY_NAMES or bool(_SYMBOL.fullmatch(node.id))
        elif isinstance(node, ast.Call):
            ok = (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_NAMES
                  and all(k.arg in _SYMBOL_FLAGS and isinstance(k.value, ast.Constant) and isinstance(k.value.value, bool)
                          for k in node.keywords))
            if ok and node.func.id in ("Pow", "PowByNatural", "FloatPow") and len(node.args) == 2:
                ok = _small_exponent(node.args[1])
            stack.extend(node.args)
        elif isinstance(node, ast.BinOp):
            ok = isinstance(node.op, _BIN_OPS) and (not isinstance(node.op, ast.Pow) or _small_exponent(node.right))
            stack.extend((node.left, node.right))
        elif isinstance(node, ast.UnaryOp):
            ok = isinstance(node.op, (ast.USub, ast.UAdd, ast.Not, ast.Invert))
            stack.append(node.operand)
        elif isinstance(node, ast.Compare):
            ok = all(isinstance(op, (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)) for op in node.ops)
            stack.extend((node.left, *node.comparators))
        elif isinstance(node, ast.BoolOp):
            ok = True
            stack.extend(node.values)
        else:
            ok = False
        if not ok:
            raise _unsafe(f"a symbolic expression with {ast.unparse(node)[:60]!r}")


def _small_exponent(node) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer" and len(node.args) == 1:
        node = node.args[0]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool) and node.value <= 64


def check_target(target: str) -> None:
    """Refuse a node target outside the ATen operators and the few Python callables export emits."""
    if target in _OPERATOR_TARGETS or target in _OTHER_TARGETS:
        return
    m = _ATEN.fullmatch(target) if isinstance(target, str) else None
    if m is not None:
        packet = getattr(torch.ops.aten, m.group(1), None)
        if packet is not None and isinstance(getattr(packet, m.group(2), None), torch._ops.OpOverload):
            return
    raise _unsafe(f"a graph node calling {str(target)[:80]!r}, which is not an ATen operator")


def _check_name(name, what: str) -> None:
    if name is None or name == "":
        return
    if not isinstance(name, str) or len(name) > 500 or not _FQN.fullmatch(name):
        raise _unsafe(f"a {what} named {str(name)[:80]!r}")


def _check_treespec(text: str) -> None:
    try:
        protocol, spec = json.loads(text)
    except (TypeError, ValueError):
        raise _unsafe("an unreadable input/output specification") from None
    stack = [spec]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or node.get("type") not in _TREESPEC_TYPES:
            raise _unsafe(f"an input/output container of type {str(node.get('type') if isinstance(node, dict) else node)[:60]!r}")
        stack.extend(node.get("children_spec") or [])


_NAME_FIELDS = frozenset({"name", "as_name", "parameter_name", "buffer_name", "tensor_constant_name", "fqn",
                          "forward_arg_names"})


def _walk(obj) -> None:
    """Check every node, expression and name in the program dataclasses; drop node metadata."""
    from torch._export.serde import schema
    from torch._export.serde.union import _Union

    if isinstance(obj, _Union):
        tag = str.__str__(obj.type)  # a plain str: the union's tag type refuses unknown comparisons
        if tag in ("as_custom_obj", "custom_obj"):
            raise _unsafe("a custom object")
        if tag == "as_operator":
            check_target(obj.value)
        _walk(obj.value)
        return
    if isinstance(obj, schema.Node):
        check_target(obj.target)
        obj.metadata = {}
    elif isinstance(obj, schema.GraphModule):
        if obj.treespec_namedtuple_fields:
            raise _unsafe("named-tuple type definitions")
        obj.metadata = {}
    elif isinstance(obj, schema.ModuleCallSignature):
        _check_treespec(obj.in_spec)
        _check_treespec(obj.out_spec)
    if is_dataclass(obj):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.name == "expr_str":
                check_sym_expr(value)
            elif f.name in _NAME_FIELDS:
                for name in value if isinstance(value, list) else [value]:
                    _check_name(name, f.name.replace("_", " "))
            _walk(value)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _walk(item)
    elif isinstance(obj, dict):
        for value in obj.values():
            _walk(value)


def check_program(program) -> None:
    """Check a parsed `schema.ExportedProgram` in place (see the module docstring)."""
    if program.guards_code:
        raise _unsafe("guard code, which torch.export would execute")
    for key in program.range_constraints:
        if not _SYMBOL.fullmatch(key):
            raise _unsafe(f"a shape range for {key[:60]!r}")
    for v in program.verifiers:
        if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z_]*", v):
            raise _unsafe(f"a verifier named {str(v)[:60]!r}")
    _walk(program.graph_module)


# ---------------------------------------------------------------------------------------------
# tensors from raw payloads


def _tensors(members: dict[str, bytes], root: str, kind: str) -> dict[str, torch.Tensor]:
    from torch._export.serde import schema
    from torch._export.serde.serialize import (_dict_to_dataclass, deserialize_scalar_type, deserialize_size,
                                               deserialize_storage_offset, deserialize_stride)

    config_name = f"{root}data/{kind}/model_{kind}_config.json"
    if config_name not in members:
        raise _unsafe(f"no {kind} configuration")
    try:
        config = _dict_to_dataclass(schema.PayloadConfig, json.loads(members[config_name]))
    except Exception as e:  # noqa: BLE001 - any malformed JSON is a damaged file
        raise _unsafe(f"an unreadable {kind} configuration ({type(e).__name__})") from None
    flat: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for fqn, meta in config.config.items():
        _check_name(fqn, "tensor")
        if meta.use_pickle or meta.tensor_meta is None:
            raise _unsafe(f"a pickled {kind[:-1]} ({fqn[:60]})")
        if not _PAYLOAD[kind].fullmatch(meta.path_name):
            raise _unsafe(f"a {kind[:-1]} payload named {meta.path_name[:60]!r}")
        tm = meta.tensor_meta
        dtype = deserialize_scalar_type(tm.dtype)
        if meta.path_name not in flat:
            raw = members.get(f"{root}data/{kind}/{meta.path_name}")
            if raw is None:
                raise _unsafe(f"a missing {kind[:-1]} payload {meta.path_name}")
            size = torch._utils._element_size(dtype)
            if len(raw) % size:
                raise _unsafe(f"a {kind[:-1]} payload of {len(raw)} bytes for dtype {dtype}")
            flat[meta.path_name] = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        base = flat[meta.path_name]
        if base.dtype != dtype:
            raise _unsafe(f"a {kind[:-1]} payload read with two dtypes ({meta.path_name})")
        sizes, strides = list(deserialize_size(tm.sizes)), list(deserialize_stride(tm.strides))
        offset = deserialize_storage_offset(tm.storage_offset)
        if len(sizes) != len(strides) or min(sizes + strides + [offset], default=0) < 0:
            raise _unsafe(f"a {kind[:-1]} with an invalid shape ({fqn[:60]})")
        if all(sizes):
            last = offset + sum((s - 1) * st for s, st in zip(sizes, strides))
            if last >= base.numel():
                raise _unsafe(f"a {kind[:-1]} reaching past its payload ({fqn[:60]})")
        tensor = torch.as_strided(base, sizes, strides, offset)
        out[fqn] = torch.nn.Parameter(tensor, requires_grad=tm.requires_grad) if meta.is_param else tensor
    return out


# ---------------------------------------------------------------------------------------------
# the archive


def _members(data: bytes) -> tuple[dict[str, bytes], str]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            if len(infos) > 100_000:
                raise _unsafe(f"{len(infos)} members")
            members = {i.filename: z.read(i) for i in infos}
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ExportError(f"the program is not a readable torch.export archive ({e})") from None
    roots = [n[: -len("archive_format")] for n in members if n.endswith("archive_format") and n.count("/") <= 1]
    if len(roots) != 1:
        raise ExportError("the program is not a torch.export archive (no single archive_format member)")
    return members, roots[0]


_ALLOWED_MEMBER = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/model_weights_config\.json|data/weights/weight_[0-9]+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_[0-9]+|data/sample_inputs/model\.pt)")


def read_program(data: bytes) -> torch.export.ExportedProgram:
    """The ExportedProgram in a `.pt2` archive (bytes), or `UnsafeFileError`; nothing in it runs."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    members, root = _members(data)
    for name in members:
        rel = name[len(root):] if name.startswith(root) else None
        if rel is None or not _ALLOWED_MEMBER.fullmatch(rel):
            raise _unsafe(f"an archive member {name[:80]!r}")
    if members.get(f"{root}data/sample_inputs/model.pt", b""):
        raise _unsafe("pickled sample inputs, which torch.export.load would unpickle")
    if members.get(f"{root}archive_format", b"").strip() != b"pt2":
        raise ExportError("the program is not a torch.export archive (unknown archive format)")
    byteorder = members.get(f"{root}byteorder", b"little").strip().decode("ascii", "replace")
    if byteorder != sys.byteorder:
        raise ExportError(f"the program was written on a {byteorder}-endian machine; this one is {sys.byteorder}-endian")
    try:
        program = _dict_to_dataclass(schema.ExportedProgram, json.loads(members[f"{root}models/model.json"]))
    except KeyError:
        raise ExportError("the archive has no program (models/model.json)") from None
    except Exception as e:  # noqa: BLE001 - malformed JSON of any kind
        raise ExportError(f"the program JSON is damaged ({type(e).__name__}: {str(e)[:200]})") from None
    check_program(program)
    state_dict = _tensors(members, root, "weights")
    constants = _tensors(members, root, "constants")
    try:
        return ExportedProgramDeserializer().deserialize(program, state_dict, constants, None)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many types for inconsistent programs
        raise ExportError(f"torch could not rebuild the program ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
