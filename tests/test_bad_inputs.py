"""Every bad input gets a JetfxError that says what was wrong: a table of input → error type and phrase.

Each row builds its input from small fixtures (a tiny random-init GPT-2, an export of it) and calls the
public API the way a user would. CLI inputs are in test_bad_inputs_cli.py.
"""

import json
import zipfile

import pytest
import torch

import jetfx
from jetfx import paths as P
from jetfx import split as S
from jetfx.errors import ExpansionError, ExportError, InputError, TraceError
from tiny_models import traced


@pytest.fixture(scope="module")
def gm():
    return traced("gpt2")[1]


@pytest.fixture(scope="module")
def exported(gm, tmp_path_factory):
    path = tmp_path_factory.mktemp("exp") / "ex.jetfx.zip"
    jetfx.export(jetfx.expand(gm, k=0, paths=P.max_blocks(1)), path)
    return path


def _with_manifest(src, dst, change):
    with zipfile.ZipFile(src) as z:
        manifest, program = json.loads(z.read("manifest.json")), z.read("program.pt2")
    change(manifest)
    with zipfile.ZipFile(dst, "w") as z:
        z.writestr("manifest.json", json.dumps(manifest))
        z.writestr("program.pt2", program)
    return dst


def _rename_first(m):
    m["path_names"][0] = "evil"


class _Tokenizer:
    """The attributes of a Hugging Face tokenizer that padding checks read."""

    pad_token_id, bos_token_id = 0, 1


def _left_padded():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


CASES = {
    # exports and reloads (issue 18)
    "manifest without path_names": (lambda gm, ex, tmp: jetfx.load_expanded(
        _with_manifest(ex, tmp / "a.zip", lambda m: m.pop("path_names"))), ExportError, "damaged manifest"),
    "manifest with a renamed path": (lambda gm, ex, tmp: jetfx.load_expanded(
        _with_manifest(ex, tmp / "a.zip", _rename_first)), ExportError, "does not match its program"),
    "manifest path_names a string": (lambda gm, ex, tmp: jetfx.load_expanded(
        _with_manifest(ex, tmp / "a.zip", lambda m: m.__setitem__("path_names", "embed"))), ExportError, "damaged manifest"),
    "manifest vocab_size edited": (lambda gm, ex, tmp: jetfx.load_expanded(
        _with_manifest(ex, tmp / "a.zip", lambda m: m.__setitem__("vocab_size", 7))), ExportError, "embedding has 100 rows"),
    "manifest of another format version": (lambda gm, ex, tmp: jetfx.load_expanded(
        _with_manifest(ex, tmp / "a.zip", lambda m: m.__setitem__("version", 1))), ExportError, "export the expansion again"),
    "load a folder": (lambda gm, ex, tmp: jetfx.load_expanded(tmp), ExportError, "folder"),
    "load a missing file": (lambda gm, ex, tmp: jetfx.load_expanded(tmp / "nope.zip"), ExportError, "no such file"),
    "load a number": (lambda gm, ex, tmp: jetfx.load_expanded(5), ExportError, "needs a file name"),
    "export over an unrelated file": (lambda gm, ex, tmp: (tmp / "precious.txt").write_text("mine") and jetfx.export(
        jetfx.expand(gm, k=0, paths="embed"), tmp / "precious.txt"), ExportError, "overwrite=True"),
    "export to a number": (lambda gm, ex, tmp: jetfx.export(jetfx.expand(gm, k=0, paths="embed"), 123),
                           ExportError, "needs a file name"),
    "export into a missing folder": (lambda gm, ex, tmp: jetfx.export(jetfx.expand(gm, k=0, paths="embed"),
                                                                      tmp / "no" / "x.zip"), ExportError, "does not exist"),
    "export something else": (lambda gm, ex, tmp: jetfx.export(gm, tmp / "x.zip"), ExportError, "made by jetfx.expand"),
    "export with an empty key": (lambda gm, ex, tmp: jetfx.export(jetfx.expand(gm, k=0, paths="embed"), tmp / "x.zip",
                                                                  key=b""), ExportError, "key must be"),
    # models and devices
    "hub name without organization, offline": (lambda gm, ex, tmp: jetfx.load("gpt2"), InputError,
                                               "full id with the organization"),
    "unknown model": (lambda gm, ex, tmp: jetfx.load("no-such-model"), InputError, "built-in models are smollm2-135m"),
    "device banana": (lambda gm, ex, tmp: jetfx.load("smollm2-135m", device="banana"), InputError, "unknown device"),
    "dtype int": (lambda gm, ex, tmp: jetfx.load("smollm2-135m", dtype=torch.int64), InputError, "floating"),
    # path filters
    "unknown path name next to a known one": (lambda gm, ex, tmp: jetfx.expand(gm, k=0, paths=["embed", "nope"]),
                                              ExpansionError, "'nope', which is not a block"),
    "duplicate path name": (lambda gm, ex, tmp: jetfx.expand(gm, k=0, paths=["embed", "embed"]), ExpansionError,
                            "given twice"),
    "path against the step order": (lambda gm, ex, tmp: jetfx.expand(gm, k=0, paths=["h.1.mlp>h.0.mlp"]),
                                    ExpansionError, "follow the residual steps"),
    "max_blocks(-1)": (lambda gm, ex, tmp: P.max_blocks(-1), ExpansionError, "non-negative integer"),
    "max_blocks(1.5)": (lambda gm, ex, tmp: P.max_blocks(1.5), ExpansionError, "non-negative integer"),
    "min_blocks(True)": (lambda gm, ex, tmp: P.min_blocks(True), ExpansionError, "non-negative integer"),
    "through a block that does not exist": (lambda gm, ex, tmp: jetfx.path_graph(gm).count(P.through("h.99.*")),
                                            ExpansionError, "matches no block"),
    "avoid(nothing)": (lambda gm, ex, tmp: P.avoid(), ExpansionError, "at least one block name"),
    "within(a number)": (lambda gm, ex, tmp: P.within(3), ExpansionError, "non-empty strings"),
    "paths=an int": (lambda gm, ex, tmp: jetfx.expand(gm, k=0, paths=5), ExpansionError, "paths= takes"),
    "split within a block that does not exist": (lambda gm, ex, tmp: jetfx.expand(
        gm, k=1, split=True, paths=S.within("h.99.mlp")), ExpansionError, "matches no block"),
    "split filter of the wrong kind": (lambda gm, ex, tmp: jetfx.expand(gm, k=1, split=True, paths=P.max_blocks(1)),
                                       ExpansionError, "filters of jetfx.split"),
    "branch of a float": (lambda gm, ex, tmp: jetfx.branch(gm, 1.0), ExpansionError, "block name"),
    "branch index out of range": (lambda gm, ex, tmp: jetfx.branch(gm, 9), ExpansionError, "out of range"),
    # orders, weights, centers (earlier audits)
    "negative order": (lambda gm, ex, tmp: jetfx.expand(gm, k=-1), ExpansionError, "non-negative integer"),
    "fractional order": (lambda gm, ex, tmp: jetfx.expand(gm, k=1.5), ExpansionError, "non-negative integer"),
    "weights off the simplex": (lambda gm, ex, tmp: jetfx.jet_expand(
        gm, 0, [jetfx.stream(gm, 0)] * 2, k=1, weights=[0.9, 0.9]), ExpansionError, "simplex"),
    "unknown block name": (lambda gm, ex, tmp: jetfx.branch(gm, "h.9.mlp"), ExpansionError, "no block named"),
    "stream index out of range": (lambda gm, ex, tmp: jetfx.stream(gm, 99), ExpansionError, "out of range"),
    "too many paths": (lambda gm, ex, tmp: jetfx.expand(gm, k=1, max_paths=4), ExpansionError, "max_paths=4"),
    # tokens
    "text without a tokenizer": (lambda gm, ex, tmp: jetfx.expand(gm, k=0, paths="embed")("hello"), InputError,
                                 "no tokenizer"),
    "token id outside the vocabulary": (lambda gm, ex, tmp: jetfx.expand(gm, k=0, paths="embed")(
        torch.tensor([[1, 100]])), InputError, "outside the vocabulary"),
    "float tokens": (lambda gm, ex, tmp: jetfx.tracing.as_tokens(torch.ones(2, 3)), InputError, "integers"),
    "no tokens": (lambda gm, ex, tmp: jetfx.tracing.as_tokens(torch.zeros(1, 0, dtype=torch.long)), InputError, "no tokens"),
    "longer than the context": (lambda gm, ex, tmp: gm(torch.zeros(1, 65, dtype=torch.long)), InputError, "context of 64"),
    "left-padded tokenizer output": (lambda gm, ex, tmp: jetfx.tracing.as_tokens(_left_padded()), InputError,
                                     "left-padded"),
    "texts of different lengths": (lambda gm, ex, tmp: jetfx.tracing.as_tokens(
        ["a b", "a"], lambda t: {"input_ids": [1] * len(t.split())}), InputError, "padding_side='right'"),
    "a reloaded expansion given floats": (lambda gm, ex, tmp: jetfx.load_expanded(ex)(torch.ones(1, 3)), InputError,
                                          "integer tensor"),
    "a reloaded expansion given ids outside the vocabulary": (lambda gm, ex, tmp: jetfx.load_expanded(ex)(
        torch.tensor([[5, 100]])), InputError, r"\[0, 100\)"),
    "trace a function": (lambda gm, ex, tmp: jetfx.trace(lambda x: x), TraceError, "torch.nn.Module"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_clear_error(case, gm, exported, tmp_path):
    make, error, phrase = CASES[case]
    with pytest.raises(error, match=phrase) as info:
        make(gm, exported, tmp_path)
    assert isinstance(info.value, jetfx.JetfxError)
    assert "Traceback" not in str(info.value)


def test_export_replaces_its_own_files_and_others_only_when_asked(gm, tmp_path):
    ex = jetfx.expand(gm, k=0, paths="embed")
    path = jetfx.export(ex, tmp_path / "x.jetfx.zip")
    jetfx.export(ex, path)  # a jetfx export is replaced
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    with pytest.raises(ExportError):
        jetfx.export(ex, precious)
    assert precious.read_text() == "mine"
    jetfx.export(ex, precious, overwrite=True)
    assert jetfx.load_expanded(precious).path_names == ("embed",)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".jetfx-export-")] == []


def test_left_padding_in_a_tensor_is_reported(gm):
    ex = jetfx.expand(gm, k=0, paths="embed")
    ex.tokenizer = _Tokenizer()
    with pytest.warns(jetfx.tracing.PaddingWarning, match="left-padded"):
        ex(torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]))


def test_right_padded_tokenizer_output_is_exact_at_the_real_tokens(gm):
    """Right padding is accepted: a causal model's logits at real tokens ignore what follows them."""
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    batch = jetfx.tracing.as_tokens({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])})
    ex = jetfx.expand(gm, k=1, paths=P.max_blocks(1))
    with torch.no_grad():
        padded, alone = ex(batch), ex(torch.tensor([[9, 10]]))
    torch.testing.assert_close(padded.stacked[:, 1, :2], alone.stacked[:, 0], atol=1e-5, rtol=1e-5)


def test_high_order_loss_of_exactness_is_reported():
    """A k-jet far outside its radius of convergence: paths of 10^6 cancel in float32, and the module says so."""
    from tiny_models import hf_model, tokens

    model = hf_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.05)  # η far from h_L: the decoder's Taylor series diverges at y = h_L
    g = jetfx.trace(model, tokens())
    ex = jetfx.expand(g, k=8, paths=P.max_blocks(0))
    with pytest.warns(jetfx.errors.ExactnessWarning, match="not exact in float32.*float64"):
        out = ex(tokens())
    assert out.relative_error() > 1e-2
    g64 = jetfx.trace(model, tokens(), dtype=torch.float64)
    out64 = jetfx.expand(g64, k=8, paths=P.max_blocks(0))(tokens())  # no warning: float64 keeps the identity
    assert out64.relative_error() < 1e-8


def test_symbolic_view_of_a_deep_model_prints_in_linear_size():
    from tiny_models import LinearResNet

    for layers in (8, 60):
        g = jetfx.trace(LinearResNet(layers=layers, width=3), torch.randint(0, 11, (1, 2)))
        sym = jetfx.expand(g, k=1, paths=P.max_blocks(1)).symbolic()
        text = str(sym)
        assert len(text) < 400 * layers and f"h_{layers}" in text
        assert "print() it" in repr(sym)
