"""Bad command lines: each gets exit status 2 and one line that says what was wrong and what to do.

The table runs `jetfx.cli.main` in this process. Rows with `--model no-such-model` prove that the
argument is checked *before* the model is loaded: were the model loaded first, the error would be
"unknown model". Interruption and concurrency of long runs: tests/test_cli_interrupt.py.
"""

from __future__ import annotations

import sqlite3

import pytest
import torch

import jetfx
from jetfx import paths as P
from jetfx.cli import main
from jetfx.ngram_db import NgramDB
from tiny_models import LinearResNet, save_model_folder

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
TABLE = [
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


@pytest.mark.parametrize("argv, rc, phrase", TABLE, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
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
