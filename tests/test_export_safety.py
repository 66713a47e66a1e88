"""Exported expansions: loading never runs code from the file; exports keep dynamic shapes."""

import ast
import hashlib
import io
import json
import pathlib
import pickle
import zipfile

import pytest
import torch

import jetfx
from jetfx import paths as P
from jetfx import split as S
from jetfx.export import ExportError, UnsafeFileError, export, load_expanded
from jetfx.safe_pt2 import check_sym_expr, check_target
from tiny_models import TwoBlockToy, traced

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this creates the file `marker` (what an attacker's os.system call would do)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def good_export(tmp_path_factory):
    _, gm = traced("gpt2")
    path = tmp_path_factory.mktemp("good") / "ex.jetfx.zip"
    export(jetfx.expand(gm, k=1, paths=P.max_blocks(1)), path)
    return path


def _rewrite(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    """Copy an export, letting `edit(members)` change the program archive, and re-hash it the way an
    attacker would (the hash sits unsigned in the same file)."""
    with zipfile.ZipFile(src) as z:
        manifest = json.loads(z.read("manifest.json"))
        program = z.read("program.pt2")
    with zipfile.ZipFile(io.BytesIO(program)) as pz:
        members = {i.filename: pz.read(i) for i in pz.infolist()}
    root = next(n[: -len("archive_format")] for n in members if n.endswith("archive_format"))
    edit(members, root)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as pz:
        for name, data in members.items():
            pz.writestr(name, data)
    data = buf.getvalue()
    manifest["sha256"] = hashlib.sha256(data).hexdigest()
    with zipfile.ZipFile(dst, "w") as z:
        z.writestr("manifest.json", json.dumps(manifest))
        z.writestr("program.pt2", data)
    return dst


def _edit_json(member: str, change):
    def edit(members, root):
        doc = json.loads(members[root + member])
        change(doc)
        members[root + member] = json.dumps(doc).encode()

    return edit


def _first_param_rename(doc, new: str):
    for spec in doc["graph_module"]["signature"]["input_specs"]:
        if "parameter" in spec:
            spec["parameter"]["parameter_name"] = new
            return


def _first_expr(doc, new: str):
    def visit(o):
        if isinstance(o, dict):
            if "expr_str" in o:
                o["expr_str"] = new
                return True
            return any(visit(v) for v in o.values())
        if isinstance(o, list):
            return any(visit(v) for v in o)
        return False

    assert visit(doc), "the export has no symbolic expression to tamper with"


def _attacks(marker: pathlib.Path):
    payload = pickle.dumps(_Payload(marker))
    code = f"__import__('builtins').open({str(marker)!r}, 'w')"

    def pickled_weight(members, root):
        cfg = json.loads(members[root + "data/weights/model_weights_config.json"])
        fqn, meta = next(iter(cfg["config"].items()))
        meta["use_pickle"] = True
        members[root + "data/weights/" + meta["path_name"]] = payload
        members[root + "data/weights/model_weights_config.json"] = json.dumps(cfg).encode()

    def custom_object(members, root):
        cfg = json.loads(members[root + "data/constants/model_constants_config.json"])
        cfg["config"]["evil"] = {"path_name": "custom_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
        members[root + "data/constants/custom_obj_0"] = payload
        members[root + "data/constants/model_constants_config.json"] = json.dumps(cfg).encode()

    def put(name):
        def edit(members, root):
            members[root + name] = payload
        return edit

    def set_target(members, root):
        doc = json.loads(members[root + "models/model.json"])
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
        members[root + "models/model.json"] = json.dumps(doc).encode()

    return {
        "pickled sample inputs": put("data/sample_inputs/model.pt"),
        "pickled weight": pickled_weight,
        "custom object": custom_object,
        "legacy pickled weights file": put("data/weights/model.pt"),
        "legacy pickled constants file": put("data/constants/model.pt"),
        "extra file": put("extra/evil.pkl"),
        "guard code": _edit_json("models/model.json", lambda d: d.__setitem__("guards_code", [code])),
        "shape expression": _edit_json("models/model.json", lambda d: _first_expr(d, code)),
        "operator": set_target,
        "parameter name": _edit_json("models/model.json", lambda d: _first_param_rename(
            d, f'a")+{code}+("')),
        "range constraint": _edit_json("models/model.json", lambda d: d["range_constraints"].__setitem__(code, {"min_val": 2, "max_val": None})),
    }


@pytest.mark.parametrize("attack", list(_attacks(pathlib.Path("x"))))
def test_tampered_export_never_runs_code(good_export, tmp_path, attack):
    marker = tmp_path / "PWNED"
    bad = _rewrite(good_export, tmp_path / "bad.jetfx.zip", _attacks(marker)[attack])
    with pytest.raises(UnsafeFileError, match="refusing to load an unsafe file"):
        load_expanded(bad)
    assert not marker.exists()


def test_a_pickle_anywhere_in_the_archive_is_refused(good_export, tmp_path):
    """The attack of the audit: a payload in every member torch would unpickle, hash recomputed."""
    marker = tmp_path / "PWNED"
    attacks = _attacks(marker)

    def everything(members, root):
        for name in ("pickled sample inputs", "pickled weight", "custom object", "legacy pickled weights file"):
            attacks[name](members, root)

    bad = _rewrite(good_export, tmp_path / "bad.jetfx.zip", everything)
    with pytest.raises(UnsafeFileError):
        load_expanded(bad)
    assert not marker.exists()


def test_untampered_rewrite_still_loads(good_export, tmp_path):
    """The tampering helper itself keeps a good file good (so the refusals above are the checks')."""
    same = _rewrite(good_export, tmp_path / "same.jetfx.zip", lambda members, root: None)
    again = load_expanded(same)
    ids = torch.randint(0, 100, (2, 5))
    torch.testing.assert_close(again(ids).total(), again(ids).logits, atol=1e-4, rtol=1e-4)


def test_signed_exports(tmp_path, good_export):
    _, gm = traced("gpt2")
    path = export(jetfx.expand(gm, k=0, paths="embed"), tmp_path / "signed.jetfx.zip", key="secret")
    assert load_expanded(path, key="secret").path_names == ("embed",)
    with pytest.raises(ExportError, match="does not verify"):
        load_expanded(path, key="other")
    with pytest.raises(ExportError, match="not signed"):
        load_expanded(good_export, key="secret")
    edited = _rewrite(pathlib.Path(path), tmp_path / "edited.jetfx.zip", lambda m, r: None)
    with pytest.raises(ExportError, match="does not verify"):  # the HMAC covers the program bytes
        load_expanded(edited, key="secret")


@pytest.mark.parametrize("text", [
    "Mul(Integer(64), Symbol('s27', positive=True, integer=True))", "s0 + 2*s1", "Max(1, s3) // 2",
    "Pow(Symbol('s2', integer=True), Integer(2))", "Eq(s1, 1) | Eq(32*s1*s2, s1*s2*Min(32, 32*s1))"])
def test_shape_expressions_torch_writes_are_accepted(text):
    check_sym_expr(text)


@pytest.mark.parametrize("text", [
    "__import__('os').system('x')", "Symbol('s1').__class__", "Pow(Integer(10), Integer(10**12))", "s1 ** 99999999",
    "Symbol('os; x')", "exec('1')", "lambda: 1", "[s1]", "Integer(1)(2)"])
def test_shape_expressions_that_could_run_code_are_refused(text):
    with pytest.raises(UnsafeFileError):
        check_sym_expr(text)


@pytest.mark.parametrize("target", ["torch.os.system", "builtins.eval", "torch.load", "torch.ops.aten.nope.default",
                                    "#evil:op", "torch.ops.jetfx.anything.default"])
def test_only_aten_and_size_arithmetic_are_callable(target):
    with pytest.raises(UnsafeFileError):
        check_target(target)
    check_target("torch.ops.aten.add.Tensor")
    check_target("_operator.getitem")


def _python_files():
    for folder in ("jetfx", "passes", "tools", "tests"):
        yield from (ROOT / folder).rglob("*.py")


def test_no_unsafe_loader_anywhere():
    """No torch.load with its unrestricted unpickler (the weights_only keyword set to False), and no call of torch.load / pickle.load(s) / torch.export.load in jetfx."""
    banned = []
    for file in _python_files():
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "weights_only" and isinstance(node.value, ast.Constant) \
                    and node.value.value is False:
                banned.append(f"{file.name}:{node.value.lineno} {node.arg} set to False")
            if isinstance(node, ast.Call) and file.parts[-2] in ("jetfx", "passes"):
                name = ast.unparse(node.func)
                if name in ("torch.load", "pickle.load", "pickle.loads", "torch.export.load", "dill.load", "marshal.loads"):
                    banned.append(f"{file.name}:{node.lineno} {name}")
    assert banned == []


# ---------------------------------------------------------------------------------------------
# dynamic shapes, every expansion kind


def _kinds():
    _, llama = traced("llama")
    toy = TwoBlockToy()
    toy_gm = jetfx.trace(toy, torch.randint(0, 13, (2, 5)))
    step = jetfx.jet_expand(llama, 1, [jetfx.stream(llama, 0), jetfx.branch(llama, "layers.0.self_attn")], k=1)
    return {
        "exponential k=0": (jetfx.expand(llama, k=0, paths=P.max_blocks(2)), 100),
        "exponential k=1": (jetfx.expand(llama, k=1, paths=P.max_blocks(1)), 100),
        "exponential k=2": (jetfx.expand(llama, k=2, paths=P.max_blocks(1) & P.within("layers.1.*")), 100),
        "split": (jetfx.expand(llama, k=2, split=True, paths=S.within("layers.0.mlp", "layers.1.mlp")
                               & S.total_degree(max=2)), 100),
        "jet_expand": (jetfx.jet_expand(llama, "decoder", step.terms, k=1).compile(), 100),
        "own residual net k=0": (jetfx.expand(toy_gm, k=0), 13),
        "own residual net k=1": (jetfx.expand(toy_gm, k=1), 13),
    }


@pytest.mark.slow
def test_every_expansion_kind_reloads_at_three_shapes(tmp_path):
    for name, (ex, vocab) in _kinds().items():
        path = export(ex, tmp_path / f"{name.replace(' ', '_')}.jetfx.zip", example_tokens=torch.zeros(1, 4, dtype=torch.long))
        again = load_expanded(path)
        for shape in ((1, 3), (2, 7), (5, 2)):
            ids = torch.randint(0, vocab, shape)
            with torch.no_grad():
                a, b = ex(ids), again(ids)
            assert b.stacked.shape[:3] == (len(ex.path_names), *shape), name
            torch.testing.assert_close(b.stacked, a.stacked, atol=1e-5, rtol=1e-5, msg=name)
            torch.testing.assert_close(b.total(), b.logits, atol=1e-4, rtol=1e-4, msg=name)


def test_nested_jets_are_refused_with_the_reason_or_exported_static(tmp_path):
    _, gm = traced("llama")
    ex = jetfx.expand(gm, k=1, paths=P.max_blocks(0), jets="nested")
    with pytest.raises(ExportError, match=r"dynamic batch and sequence length: its jets use nested forward AD"):
        export(ex, tmp_path / "nested.jetfx.zip")
    ids = torch.randint(0, 100, (2, 5))
    again = load_expanded(export(ex, tmp_path / "nested.jetfx.zip", example_tokens=ids, static=True))
    torch.testing.assert_close(again(ids).stacked, ex(ids).stacked, atol=1e-5, rtol=1e-5)
    with pytest.raises(jetfx.InputError, match=r"exported for inputs of shape \(2, 5\) only"):
        again(torch.randint(0, 100, (3, 5)))


def test_reloaded_module_is_device_agnostic(good_export):
    again = load_expanded(good_export)
    assert jetfx.passes.constant_devices(again.module) == []


# ---------------------------------------------------------------------------------------------
# each tensor once in the file


def _weight_entries(path) -> tuple[dict, dict]:
    """The program's weights config {name: entry} and its payload sizes {member: bytes}."""
    with zipfile.ZipFile(path) as z:
        program = z.read("program.pt2")
    with zipfile.ZipFile(io.BytesIO(program)) as pz:
        config_name = next(n for n in pz.namelist() if n.endswith("data/weights/model_weights_config.json"))
        config = json.loads(pz.read(config_name))["config"]
        sizes = {i.filename.rsplit("/", 1)[-1]: i.file_size for i in pz.infolist()
                 if "/data/weights/weight_" in i.filename}
    return config, sizes


def test_export_names_and_stores_each_tensor_once(tmp_path):
    model, gm = traced("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties its unembedding to the embedding
    ex = jetfx.expand(gm, k=1, paths=P.max_blocks(1))
    assert ex.aliases()  # the jets' regions register some of the model's weights again
    path = export(ex, tmp_path / "ex.jetfx.zip")
    config, sizes = _weight_entries(path)
    state = ex.state_dict(keep_vars=True)
    # one entry per tensor of the module (no alias), each with a payload of its own, of the tensor's size
    assert len(config) == len(state) == len(sizes)
    assert sorted(config) == sorted(f"ex.{name}" for name in state)
    assert len({entry["path_name"] for entry in config.values()}) == len(config)
    assert sum(sizes.values()) == sum(t.untyped_storage().nbytes() for t in state.values())
    # the tied (vocab, width) matrix once
    shapes = [tuple(s["as_int"] for s in entry["tensor_meta"]["sizes"]) for entry in config.values()]
    assert shapes.count(tuple(model.lm_head.weight.shape)) == 1
    again = load_expanded(path)
    assert len(again.module.state_dict()) == len(state)
    ids = torch.randint(0, 100, (3, 5))
    with torch.no_grad():
        assert torch.equal(again(ids).stacked, ex(ids).stacked)
