"""Long runs in real processes: `jetfx ngrams` and `jetfx interactions` stopped by SIGINT mid-run
and run again give what an uninterrupted run gives (same rows, scores equal to float tolerance, an
intact file); several `jetfx ngrams` writing one fresh database at once all succeed.

The runs use tiny random-init models saved as model folders (`--model FOLDER`), sized so that the
part worth interrupting lasts a few seconds; the signal is sent once the run has saved something
(polled in its database / checkpoint file), so the test does not depend on timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import jetfx
from jetfx.cli import main
from jetfx.interactions import CHECKPOINT, interactions
from jetfx.ngram_db import NgramDB, extract
from sqlite_reading import query
from tiny_models import save_model_folder

ROOT = Path(__file__).resolve().parents[1]
# one thread per process: on a few shared cores, torch's default thread pool makes these small
# models' operations tens of times slower
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TEXT = " ".join(["The capital of France is"] * 12)  # 60 tokens: a few seconds of cross terms
NGRAMS = ["--chunk-size", "1", "--top-k", "50", "--per-context", "2", "--no-progress", "--print", "3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    return {"wide": save_model_folder(tmp / "wide", vocab=2048, layers=1),  # 2048 one-token chunks
            "deep": save_model_folder(tmp / "deep", vocab=64, layers=8, width=256)}  # 15 receiving blocks


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def start(*args) -> subprocess.Popen:
    """`jetfx ARGS` in a new process that takes SIGINT as a terminal's Ctrl-C does, however the tests were
    started: a shell starts a background job (`make test &`) with SIGINT ignored, which its children inherit."""
    return subprocess.Popen([sys.executable, "-m", "jetfx", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # (Python then installs its KeyboardInterrupt handler)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def interrupt_when(proc: subprocess.Popen, ready, timeout: float = 300) -> tuple[int, str, str]:
    """SIGINT as soon as `ready()` holds (polled); the run must still be going then."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            rc, out, err = finish(proc)
            pytest.fail(f"the run ended (rc {rc}) before it could be interrupted:\n{out}\n{err}")
        assert time.monotonic() < deadline, "the run saved nothing in time"
        time.sleep(0.02)
    state = _signal_state(proc.pid)
    proc.send_signal(signal.SIGINT)
    rc, out, err = finish(proc)
    if rc != 130:  # say what the run's process did with signals when it was sent SIGINT
        err += f"\n[test: SIGINT sent to pid {proc.pid}; its signal masks then: {state}]"
    return rc, out, err


def _signal_state(pid: int) -> str:
    """The process's ignored, blocked and caught signal masks (Linux /proc), for failure messages."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as e:
        return f"unknown ({e})"
    return ", ".join(line for line in lines if line.startswith(("State", "SigBlk", "SigIgn", "SigCgt")))


def intact(db) -> bool:
    return query(db, "PRAGMA integrity_check") == [("ok",)]


def tables(db, path) -> dict:
    """The stored rows of the finished run of `path`: top-K and per-context, as (ids, scores)."""
    (run,) = [r for (r,) in query(db, "SELECT id FROM runs WHERE path=? AND status='done'", path)]
    rows = {}
    for scope, order in (("top", "rank"), ("context", "t1, rank")):
        got = query(db, f"SELECT rank, t1, t2, logit, logprob FROM ngrams WHERE run=? AND scope=? ORDER BY {order}",
                    run, scope)
        rows[scope] = ([r[:3] for r in got], torch.tensor([r[3:] for r in got], dtype=torch.float64))
    return rows


def assert_same_tables(a: dict, b: dict) -> None:
    for scope in ("top", "context"):
        assert a[scope][0] == b[scope][0], scope  # the same n-grams at the same ranks
        torch.testing.assert_close(a[scope][1], b[scope][1], rtol=1e-5, atol=1e-5)  # float32 scores


@pytest.fixture(scope="module")
def reference(folders, tmp_path_factory):
    """Uninterrupted tables of the wide model, computed in this process."""
    db_path = tmp_path_factory.mktemp("ref") / "ref.sqlite"
    with one_thread(), NgramDB(db_path) as db:
        model, tok = jetfx.load(folders["wide"])
        gm = jetfx.trace(model, torch.tensor([[1, 2, 3]]), tokenizer=tok)
        for path in ("embed", "layers.0.mlp"):
            extract(db, gm, path, name=folders["wide"], top_k=50, per_context=2, chunk_size=256, progress=False)
    return {path: tables(db_path, path) for path in ("embed", "layers.0.mlp")}


def test_ngrams_interrupted_and_resumed_equals_uninterrupted(folders, reference, tmp_path, capsys):
    db = tmp_path / "ngrams.sqlite"
    args = ["ngrams", "--model", folders["wide"], "--db", str(db), "--path", "layers.0.mlp", *NGRAMS]
    rc, out, err = interrupt_when(start(*args), lambda: query(db, "SELECT COUNT(*) FROM chunks") >= [(20,)])
    assert rc == 130 and "Traceback" not in err, err
    m = re.search(rf"jetfx: interrupted; (\d+) of 2048 chunks of layers.0.mlp saved in {re.escape(str(db))}, "
                  "re-run the same command to resume", err)
    assert m, err
    saved = int(m[1])
    assert 20 <= saved < 2048 and query(db, "SELECT COUNT(*) FROM chunks") == [(saved,)]
    assert intact(db) and query(db, "SELECT status FROM runs") == [("running",)]

    rc, out, err = finish(start(*args))  # the same command resumes
    assert rc == 0, err
    assert "== run 1: " in out and intact(db)
    assert query(db, "SELECT status FROM runs") == [("done",)]
    assert query(db, "SELECT COUNT(*) FROM ngrams WHERE scope='cand'") == [(0,)]
    assert_same_tables(tables(db, "layers.0.mlp"), reference["layers.0.mlp"])

    # once more: the finished run is recognised, shown, not recomputed and not duplicated
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "run 1 (" in cap.err and "is already complete" in cap.err and "== run 1: " in cap.out
    assert query(db, "SELECT COUNT(*) FROM runs") == [(1,)]


def test_ngrams_processes_writing_one_fresh_database(folders, reference, tmp_path):
    """Two processes at once, each computing both paths in the opposite order: different paths on
    one fresh file, then the same run from both. Both succeed; nothing is stored twice."""
    db = tmp_path / "shared.sqlite"
    common = ["--model", folders["wide"], "--db", str(db), "--chunk-size", "16", "--top-k", "50",
              "--per-context", "2", "--no-progress", "--print", "3"]
    procs = [start("ngrams", "--path", first, "--path", second, *common)
             for first, second in (("embed", "layers.0.mlp"), ("layers.0.mlp", "embed"))]
    results = [finish(p) for p in procs]
    for rc, out, err in results:
        assert rc == 0 and "Traceback" not in err, err
    assert intact(db)
    assert query(db, "SELECT path, status FROM runs ORDER BY path") == [("embed", "done"), ("layers.0.mlp", "done")]
    assert query(db, "SELECT COUNT(*) FROM vocabularies") == [(1,)] and query(db, "SELECT COUNT(*) FROM models") == [(1,)]
    assert query(db, "SELECT COUNT(*) FROM tokens") == [(2048,)]
    for path in ("embed", "layers.0.mlp"):
        got = tables(db, path)
        assert len(got["context"][0]) == 2048 * 2  # each source's top 2, once
        assert_same_tables(got, reference[path])


def test_interactions_interrupted_and_resumed_equals_uninterrupted(folders, tmp_path):
    out_dir = tmp_path / "io"
    checkpoint = out_dir / CHECKPOINT
    args = ["interactions", "--model", folders["deep"], "--text", TEXT, "--out", str(out_dir), "--no-progress"]

    def blocks_saved():
        return checkpoint.is_file() and len(checkpoint.read_text().splitlines()) >= 2  # header and a block

    rc, out, err = interrupt_when(start(*args), blocks_saved)
    assert rc == 130 and "Traceback" not in err, err
    m = re.search(rf"jetfx: interrupted; (\d+) of 15 blocks saved in {re.escape(str(checkpoint))}, "
                  "re-run the same command to resume", err)
    assert m, err
    saved = int(m[1])
    assert 1 <= saved < 15 and len(checkpoint.read_text().splitlines()) == 1 + saved
    assert not (out_dir / "interactions.json").exists()  # no output claims to be whole

    rc, out, err = finish(start(*args))
    assert rc == 0, err
    assert re.search(rf"over 15 blocks in [\d.]+ s, {saved} of them from ", out), out
    assert not checkpoint.exists()
    got = json.loads((out_dir / "interactions.json").read_text())

    with one_thread():
        model, tok = jetfx.load(folders["deep"])
        gm = jetfx.trace(model, TEXT, tokenizer=tok)
        ref = json.loads(interactions(gm, TEXT, progress=False).to_json())
    assert got["complete"] and got["blocks"] == ref["blocks"] and len(got["records"]) == len(ref["records"]) > 500
    key = ("block", "center", "direction", "weight")
    assert [tuple(r[k] for k in key) for r in got["records"]] == [tuple(r[k] for k in key) for r in ref["records"]]
    for value in ("size", "effect"):
        torch.testing.assert_close(torch.tensor([r[value] for r in got["records"]], dtype=torch.float64),
                                   torch.tensor([r[value] for r in ref["records"]], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-6)
    csv_lines = (out_dir / "interactions.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(ref["records"])
