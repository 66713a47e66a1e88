"""Every bad input gets a JetfxError that says what was wrong: a table of input → error type and phrase.

Two tables. CASES: each row builds its input from small fixtures (a tiny random-init GPT-2, an export
of it) and calls the public API the way a user would. CLI_TABLE: bad command lines, each ending with
exit status 2 and one line that says what was wrong and what to do; they run `jetfx.cli.main` in this
process, and rows with `--model no-such-model` prove that the argument is checked *before* the model
is loaded (were the model loaded first, the error would be "unknown model"). Interruption and
concurrency of long runs: tests/test_cli_interrupt.py.
"""

import json
import sqlite3
import zipfile

import pytest
import torch

import jetfx
from jetfx import paths as P
from jetfx import split as S
from jetfx.cli import main
from jetfx.errors import ExpansionError, ExportError, InputError, TraceError
from jetfx.ngram_db import NgramDB
from tiny_models import LinearResNet, save_model_folder, traced


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


def test_a_failure_rounding_cannot_explain_is_told_apart_from_rounding(gm):
    """Terms of the logits' size that miss them by 10 %: not rounding, and the message says what else it is."""
    from jetfx.expanded import ExpansionOutput

    ex = jetfx.expand(gm, k=1, paths=P.max_blocks(1))
    out = ex(torch.tensor([[1, 2, 3, 4]]))
    changed = ExpansionOutput(out.names, out.stacked, out.remainder + 0.1 * out.logits.abs().max(), out.logits)
    with pytest.warns(jetfx.errors.ExactnessWarning, match="rounding cannot explain.*hook"):
        changed.check()


def test_symbolic_view_of_a_deep_model_prints_in_linear_size():
    from tiny_models import LinearResNet

    for layers in (8, 60):
        g = jetfx.trace(LinearResNet(layers=layers, width=3), torch.randint(0, 11, (1, 2)))
        sym = jetfx.expand(g, k=1, paths=P.max_blocks(1)).symbolic()
        text = str(sym)
        assert len(text) < 400 * layers and f"h_{layers}" in text
        assert "print() it" in repr(sym)


# ---- the command line ----

NOPE = "no-such-model"  # loading it fails: an error about anything else came first


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Placeholders of the table: a tiny model folder and files good and bad."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "notes.txt").write_text("hello\n")
    (tmp / "bad_pairs.txt").write_text("1 2\nfoo bar\n")
    (tmp / "no_pairs.txt").write_text("# only a comment\n\n")
    (tmp / "binary.bin").write_bytes(bytes(range(128, 256)))
    (tmp / "far_pairs.txt").write_text("1 2\n3 99999\n")
    (tmp / "good_pairs.txt").write_text("1 2  # a comment\n3 4\n")
    (tmp / "no_keywords.txt").write_text("# nothing here\n")
    con = sqlite3.connect(tmp / "foreign.sqlite")
    con.execute("CREATE TABLE people(name TEXT)")
    con.commit()
    con.close()
    NgramDB(tmp / "empty.sqlite").close()
    return {"tmp": str(tmp), "model": save_model_folder(tmp / "tiny", vocab=64, layers=2),
            "notes": str(tmp / "notes.txt"), "foreign": str(tmp / "foreign.sqlite"),
            "empty_db": str(tmp / "empty.sqlite")}


CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch without CUDA")

# (argv, exit status, a phrase of the message); "{name}" is a placeholder from `files`
CLI_TABLE = [
    # devices: what is wrong, and what to do (phrases shared with jetfx.load's own check)
    (["trace", "--device", "banana", "--model", NOPE], 2, "unknown device 'banana'"),
    pytest.param(["trace", "--device", "cuda", "--model", NOPE], 2,
                 "pip install torch --index-url https://download.pytorch.org/whl/cu", marks=CUDA),
    pytest.param(["expand", "--device", "cuda:1", "--model", NOPE], 2, "CUDA build", marks=CUDA),
    (["lens", "--text", "hi", "--out", "{tmp}/lens", "--device", "cuda:x", "--model", NOPE], 2, "unknown device"),
    (["ngrams", "--device", "banana", "--model", NOPE, "--db", "{tmp}/d.sqlite"], 2, "unknown device"),
    (["interactions", "--device", "tpu", "--model", NOPE], 2, "unknown device"),
    (["trace", "--dtype", "float16"], 2, "argument --dtype: invalid choice"),
    # output paths: checked before the model is loaded (and anything computed)
    (["paths", "--svg", "{tmp}/missing/x.svg", "--model", NOPE], 2, "missing does not exist; create it first"),
    (["paths", "--svg", "{notes}/x.svg", "--model", NOPE], 2, "is not a folder"),
    (["paths", "--svg", "{tmp}", "--model", NOPE], 2, "is a folder; give a file name"),
    (["expand", "--export", "{tmp}/missing/e.jetfx.zip", "--model", NOPE], 2, "does not exist"),
    (["expand", "--export", "{notes}", "--model", NOPE], 2, "is not a jetfx export; refusing to replace it"),
    (["lens", "--text", "hi", "--out", "{notes}/lens", "--model", NOPE], 2, "is a file, so"),
    (["interactions", "--out", "{notes}/x", "--model", NOPE], 2, "is a file, so"),
    (["lens", "--text", " ", "--out", "{tmp}/lens"], 2, "--text is empty"),
    # numbers and id lists: refused by the parser
    (["ngrams", "--chunk-size", "0"], 2, "argument --chunk-size: expected a positive integer, got 0"),
    (["ngrams", "--chunk-size", "-5"], 2, "argument --chunk-size: expected a positive integer, got -5"),
    (["ngrams", "--chunk-size", "many"], 2, "expected a positive integer, got 'many'"),
    (["ngrams", "--top-k", "-1"], 2, "argument --top-k: expected a non-negative integer"),
    (["ngrams", "--max-chunks", "0"], 2, "argument --max-chunks: expected a positive integer"),
    (["ngrams", "--first", "abc"], 2, "argument --first: expected comma-separated token ids such as 1,2,3"),
    (["ngrams", "--second", "1,-2"], 2, "'-2' is not a token id"),
    (["ngrams", "--db-timeout", "0"], 2, "argument --db-timeout: expected a positive number"),
    (["ngrams", "--print", "-1"], 2, "argument --print: expected a non-negative integer"),
    (["paths", "--max-blocks", "-1"], 2, "argument --max-blocks: expected a non-negative integer"),
    (["paths", "--max-blocks", "1.5"], 2, "expected a non-negative integer, got '1.5'"),
    (["paths", "--limit", "-3"], 2, "argument --limit"),
    (["lens", "--k", "-1", "--out", "x"], 2, "argument --k: expected a non-negative integer"),
    (["expand", "--split", "--max-degree", "-1"], 2, "argument --max-degree"),
    (["expand", "--split", "--max-blocks", "1", "--model", NOPE], 2, "--max-blocks and --path select exponential"),
    # the n-gram database: checked before the model is loaded; never created by mistake
    (["ngrams", "--db", "{notes}", "--model", NOPE], 2, "is not an SQLite database"),
    (["ngrams", "--db", "{foreign}", "--model", NOPE], 2, "is an SQLite database but not a jetfx n-gram database"),
    (["ngrams", "--db", "{tmp}/missing/dir/x.sqlite", "--model", NOPE], 2, "does not exist; create it first"),
    (["ngrams", "--db", "{tmp}", "--model", NOPE], 2, "is a folder"),
    (["ngrams", "--top-k", "0", "--model", NOPE, "--db", "{tmp}/d.sqlite"], 2, "keep nothing"),
    (["ngrams", "--model", "{model}", "--db", "{tmp}/d.sqlite", "--path", "layers.9.mlp"], 2,
     "unknown n-gram path 'layers.9.mlp'"),
    (["ngrams", "--model", "{model}", "--db", "{tmp}/d.sqlite", "--path", "embed", "--first", "1,2"], 2,
     "--first/--second restrict trigram contexts"),
    (["ngrams", "--heads", "first"], 2, "argument --heads: expected 'all' or comma-separated head indices"),
    (["ngrams", "--model", "{model}", "--db", "{tmp}/d.sqlite", "--path", "embed", "--trigrams"], 2,
     "--trigrams adds the trigram paths of the heads to --path all"),
    (["ngrams", "--model", "{model}", "--db", "{tmp}/d.sqlite", "--path", "heads", "--heads", "0,4"], 2,
     "no head 4 in layers.0.self_attn: it has 4 heads (0 … 3)"),
    (["diff", "--db", "{tmp}/missing.sqlite", "1", "2"], 2, "there is no n-gram database at"),
    (["diff", "--db", "{notes}", "1", "2"], 2, "is not an SQLite database"),
    (["diff", "--db", "{foreign}", "1", "2"], 2, "not a jetfx n-gram database"),
    (["diff", "--db", "{empty_db}", "1", "2"], 2, "no run 1 in"),
    (["diff", "--db", "{empty_db}", "base:embed", "2"], 2, "no finished run for model='base'"),
    # mass: its files are read before the model is loaded
    (["mass", "--pairs", "{tmp}/missing.txt", "--model", NOPE], 2, "--pairs: {tmp}/missing.txt does not exist"),
    (["mass", "--pairs", "{tmp}/bad_pairs.txt", "--model", NOPE], 2, "line 2 of {tmp}/bad_pairs.txt is 'foo bar'"),
    (["mass", "--pairs", "{tmp}/no_pairs.txt", "--model", NOPE], 2, "holds no pairs"),
    (["mass", "--pairs", "{tmp}/binary.bin", "--model", NOPE], 2, "is not a text file"),
    (["mass", "--pairs", "{tmp}", "--model", NOPE], 2, "is not a file"),
    (["mass", "--keywords", "{tmp}/missing.txt", "--model", NOPE], 2, "--keywords: {tmp}/missing.txt does not exist"),
    (["mass", "--keywords", "{tmp}/no_keywords.txt", "--model", NOPE], 2, "holds no keywords"),
    (["mass", "--keywords", "{tmp}/binary.bin", "--model", NOPE], 2, "is not UTF-8 text"),
    (["mass", "--pairs", "{tmp}/good_pairs.txt", "--db", "{notes}", "--model", NOPE], 2, "is not an SQLite database"),
    (["mass", "--pairs", "{tmp}/far_pairs.txt", "--model", "{model}"], 2, "token ids must lie in [0, 64)"),
    # inputs only the model can judge
    (["interactions", "--model", "{model}", "--out", "{tmp}/io", "--position", "99"], 2, "position 99 is out of range"),
    (["interactions", "--model", "{model}", "--out", "{tmp}/io", "--blocks", "nope"], 2,
     "no block after the first step matches"),
]


def _fill(items, files):
    return [x.format(**files) for x in items]


@pytest.mark.parametrize("argv, rc, phrase", CLI_TABLE, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_command_line(argv, rc, phrase, files, capsys):
    argv = _fill(argv, files)
    try:
        status = main(argv)
    except SystemExit as e:  # argparse: usage, then one line "jetfx …: error: argument …"
        status = e.code
    err = capsys.readouterr().err
    assert status == rc, err
    assert phrase.format(**files) in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err


def test_refused_databases_are_not_created(files, tmp_path):
    """`diff` reads; `ngrams` makes a file, never a folder."""
    missing = tmp_path / "missing.sqlite"
    assert main(["diff", "--db", str(missing), "1", "2"]) == 2 and not missing.exists()
    deep = tmp_path / "a" / "b" / "x.sqlite"
    assert main(["ngrams", "--db", str(deep), "--model", NOPE]) == 2 and not (tmp_path / "a").exists()
    assert main(["lens", "--text", "hi", "--out", str(tmp_path / "lens"), "--model", NOPE]) == 2
    assert not (tmp_path / "lens").exists()  # the folder is made when there is something to put in it


def test_a_database_held_by_another_writer_is_reported_in_use(files, tmp_path, capsys):
    db = tmp_path / "busy.sqlite"
    NgramDB(db).close()
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing, for longer than --db-timeout
    try:
        rc = main(["ngrams", "--model", files["model"], "--db", str(db), "--db-timeout", "0.5", "--no-progress"])
    finally:
        other.execute("ROLLBACK")
        other.close()
    err = capsys.readouterr().err
    assert rc == 2 and f"the n-gram database {db} is in use by another process (still locked after 0.5 s)" in err
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.skipif(not hasattr(jetfx.paths.PathGraph, "_live"),
                    reason="needs the enumeration of prefixes that can be completed (PathGraph._live, on main)")
def test_path_listing_never_walks_rejected_prefixes():
    """2^60 paths: the first paths through the first block, and an empty selection, come at once
    (depth-first search would try the 2^59 prefixes that skip the first block before either)."""
    gm = jetfx.trace(LinearResNet(layers=60, width=3), torch.randint(0, 11, (1, 2)))
    graph = jetfx.path_graph(gm)
    first = graph.structure.blocks[0].name
    assert graph.count() == 2**60
    paths = graph.iter_paths(P.through(first))
    assert [next(paths).name for _ in range(3)] == [first, f"{first}>blocks.59", f"{first}>blocks.58"]
    assert list(graph.iter_paths(P.through(first) & P.avoid(first))) == []
    assert [p.name for p in graph.iter_paths(P.through("blocks.30") & P.max_blocks(1))] == ["blocks.30"]


def test_cli_paths_with_an_empty_selection_lists_nothing(files, capsys):
    assert main(["paths", "--model", files["model"], "--through", "layers.0.mlp", "--avoid", "layers.0.mlp"]) == 0
    out = capsys.readouterr().out
    assert "selects 0" in out and "no path passes every filter" in out


@pytest.mark.parametrize("k, warned", [(1, False), (8, True)])
def test_joint_lens_warns_when_its_jets_do_not_fit(files, tmp_path, capsys, k, warned):
    """At k = 8 the tiny model's optimized joint lens misses the decoder output by ~1e6 times its
    size (mean cosine < 0): said in one line, with what to do; at k = 1 (error 0.05) nothing."""
    argv = ["lens", "--model", files["model"], "--text", "The capital of France is Paris", "--k", str(k), "--joint",
            "--steps", "50", "--out", str(tmp_path)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    warning = [ln for ln in err.splitlines() if ln.startswith("jetfx: warning: ")]
    if warned:
        assert len(warning) == 1 and f"the joint jet lens at k={k} does not fit the decoder's output" in warning[0]
        assert "Use a lower order" in warning[0]
    else:
        assert not warning, err


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    from jetfx.files import write_atomic

    target = tmp_path / "out.json"
    write_atomic(target, "old")
    write_atomic(target, "new")
    assert target.read_text() == "new"
    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError):  # the final rename fails: no temporary file is left behind
        write_atomic(tmp_path / "folder", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "out.json"]
