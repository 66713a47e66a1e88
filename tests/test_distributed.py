"""`jetfx ngrams` over torch.distributed, in real `torchrun` processes (gloo on the CPU, one thread a
process) on a tiny saved model folder:

- 2 ranks write the database 1 process writes: the same runs, the same rows at the same ranks, the
  same scores to float tolerance, for a whole-model job (`--path all --trigrams --heads 0,3`: the
  encoder path, every MLP path, two heads of every attention block by the pruned search);
- a job whose ranks are all interrupted, run again with the same command, computes exactly the
  chunks that were not saved and ends with the same rows;
- a job one of whose ranks is killed is restarted by torchrun (`--max-restarts 1`) and resumes
  from the saved chunks, again with the same rows.

The signals are sent once the job has saved enough chunks (polled in the database), so the tests
do not depend on timing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jetfx.cli import main
from sqlite_reading import query
from tiny_models import save_model_folder

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
VOCAB = 128
HEADS = (0, 3)
PATHS = ["embed", "layers.0.mlp", "layers.1.mlp"] + [f"layers.{b}.self_attn:h{h}" for b in (0, 1) for h in HEADS]
CHUNKS = {p: (VOCAB // 32 if ":" not in p else VOCAB) for p in PATHS}  # 32 sources / one row of 128 contexts
TOTAL = sum(CHUNKS.values())


def ngrams_args(folder, db, progress: bool = False) -> list[str]:
    return ["ngrams", "--model", folder, "--db", str(db), "--path", "all", "--trigrams", "--heads",
            ",".join(map(str, HEADS)), "--chunk-size", "32",
            "--top-k", "20", "--per-context", "2", "--print", "1"] + ([] if progress else ["--no-progress"])


def torchrun(*args, nproc: int = 2, restarts: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(nproc), "--max-restarts", str(restarts), "-m", "jetfx", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def saved(db) -> int:
    return (query(db, "SELECT COUNT(*) FROM chunks") or [(0,)])[0][0]


def tables(db) -> dict:
    """Every finished run's rows: path → {scope: (ids at ranks, scores)}."""
    out = {}
    for run, path in query(db, "SELECT id, path FROM runs WHERE status='done' ORDER BY path"):
        out[path] = {}
        for scope, order in (("top", "rank"), ("context", "t1, rank")):
            got = query(db, f"SELECT rank, t1, t2, t3, logit, logprob FROM ngrams WHERE run=? AND scope=? "
                            f"ORDER BY {order}", run, scope)
            out[path][scope] = ([r[:4] for r in got], torch.tensor([r[4:] for r in got], dtype=torch.float64))
    return out


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want) == sorted(PATHS)
    for path in want:
        for scope in ("top", "context"):
            assert got[path][scope][0] == want[path][scope][0], (path, scope)  # same n-grams, same ranks
            torch.testing.assert_close(got[path][scope][1], want[path][scope][1], rtol=1e-5, atol=1e-5)
        assert len(want[path]["top"][0]) == 20
        assert len(want[path]["context"][0]) == (VOCAB * 2 if ":" not in path else 0)


def finished(db) -> None:
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    assert query(db, "SELECT COUNT(*), SUM(status='done') FROM runs") == [(len(PATHS), len(PATHS))]
    assert query(db, "SELECT COUNT(*) FROM ngrams WHERE scope='cand'") == [(0,)]
    assert saved(db) == TOTAL


def interrupt_when(proc: subprocess.Popen, db, chunks: int, send) -> tuple[int, str, str]:
    deadline = time.monotonic() + 300
    while saved(db) < chunks:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the job ended (rc {proc.returncode}) before it could be interrupted:\n{err[-3000:]}")
        assert time.monotonic() < deadline, "the job saved nothing in time"
        time.sleep(0.02)
    send(proc)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def computed(err: str) -> tuple[int, int]:
    """(chunks computed, chunks found saved) from rank 0's summary line."""
    m = re.search(r"jetfx: (\d+) chunks computed by 2 ranks on 1 host \(gloo\) in [\d.]+ s(?:; (\d+) were saved "
                  r"before)?", err)
    assert m, err[-3000:]
    return int(m[1]), int(m[2] or 0)


def saved_when_stopped(err: str, reason: str) -> tuple[int, int]:
    """(chunks saved in all, chunks of the path it stopped in) from rank 0's last line."""
    m = re.search(rf"jetfx: {reason}; (\d+) of (\d+) chunks of (\S+) saved in .*, re-run the same command to "
                  r"resume(?: \((\d+) earlier paths? complete\))?", err)
    assert m, err[-3000:]
    earlier = int(m[4] or 0)
    assert PATHS.index(m[3]) == earlier and int(m[2]) == CHUNKS[m[3]]
    return sum(CHUNKS[p] for p in PATHS[:earlier]) + int(m[1]), int(m[1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_model_folder(tmp_path_factory.mktemp("model") / "tiny", vocab=VOCAB, layers=2)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """The same job in one process (this one, one thread)."""
    db = tmp_path_factory.mktemp("ref") / "one.sqlite"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(ngrams_args(folder, db)) == 0
    finally:
        torch.set_num_threads(threads)
    finished(db)
    return tables(db)


def test_two_ranks_write_what_one_process_writes(folder, reference, tmp_path):
    db = tmp_path / "two.sqlite"
    proc = torchrun(*ngrams_args(folder, db, progress=True))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    # one progress bar (rank 0's: one start, one end), over the contexts of the whole job, with its ETA
    # (text mode turns tqdm's \r redraws into lines)
    contexts = sum(CHUNKS[p] * (32 if ":" not in p else VOCAB) for p in PATHS)
    total = f"{contexts / 1000:.1f}k"
    assert len(re.findall(rf"n-grams:\s+0%.* 0\.00/{total} ", err)) == 1, err[-3000:]
    assert re.findall(r"n-grams:\s+\d+%.*\[[\d:]+<[\d:]+, [\d.]+k?ctx/s, \S+\]", err), err[-3000:]
    assert len(re.findall(rf"n-grams: 100%.* {total}/{total} \[[\d:]+<00:00, ", err)) == 1, err[-3000:]
    assert f"jetfx: 2 ranks on 1 host (gloo); rank 0 (on " in err and f"writes {db}" in err
    assert computed(err) == (TOTAL, 0)
    assert out.count("== run ") == len(PATHS)  # printed once (rank 0)
    finished(db)
    assert_same(tables(db), reference)


def test_all_ranks_interrupted_then_the_same_command_resumes(folder, reference, tmp_path):
    db = tmp_path / "interrupted.sqlite"
    args = ngrams_args(folder, db)
    rc, out, err = interrupt_when(torchrun(*args), db, 60, lambda p: p.send_signal(signal.SIGINT))
    assert rc != 0 and not re.search(r'File ".*jetfx/', err), err[-3000:]  # torchrun reports; no trace from jetfx
    total_saved, _ = saved_when_stopped(err, "interrupted")
    assert 60 <= total_saved == saved(db) < TOTAL
    assert query(db, "PRAGMA integrity_check") == [("ok",)]

    proc = torchrun(*args)  # the same command: only the chunks not saved are computed
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    now, before = computed(err)
    assert now == TOTAL - total_saved and before > 0
    finished(db)
    assert_same(tables(db), reference)


def _kill_rank(rank: int):
    import psutil

    def send(proc):
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    child.send_signal(signal.SIGKILL)
                    return
            except psutil.Error:
                continue
        pytest.fail(f"no process of rank {rank} found")

    return send


def test_a_killed_rank_is_restarted_by_torchrun_and_resumes(folder, reference, tmp_path):
    db = tmp_path / "killed.sqlite"
    rc, out, err = interrupt_when(torchrun(*ngrams_args(folder, db), restarts=1), db, 60, _kill_rank(1))
    assert rc == 0, err[-3000:]  # the second attempt finished the job
    # rank 0 sees the lost rank, or torchrun's SIGTERM first
    total_saved, in_path = saved_when_stopped(err, r"(?:a rank stopped \([^)]*\)|interrupted)")
    now, before = computed(err)
    assert before == in_path and now == TOTAL - total_saved  # nothing saved is computed again
    finished(db)
    assert_same(tables(db), reference)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL across ranks needs two CUDA devices (checked on a multi-GPU machine)")
def test_two_gpu_ranks_write_what_one_gpu_writes(folder, tmp_path):
    one, two = tmp_path / "one.sqlite", tmp_path / "two.sqlite"
    for db, nproc in ((one, 1), (two, 2)):
        proc = torchrun(*ngrams_args(folder, db), "--device", "cuda", nproc=nproc)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    assert "(nccl)" in err
    finished(two)
    assert_same(tables(two), tables(one))


def test_work_list_from_saved_ranges():
    """The job's work list, derived on every rank from the ranges rank 0 found saved: the chunks left,
    in path order, with their contexts; a limit (--max-chunks) cuts its tail."""
    from jetfx.ngram_job import Task, WorkList, _ranges
    from jetfx.ngrams import NgramPath

    bigram = Task.of(NgramPath("embed", 2), torch.arange(10), 3)  # chunks of 3, 3, 3, 1 sources
    trigram = Task.of(NgramPath("b:h0", 3, "b", 0), torch.arange(5), 4, torch.arange(2))  # rows of 2 × 2
    assert (bigram.num_chunks, trigram.num_chunks) == (4, 3)
    assert trigram.chunk(2)[0].tolist() == [4] and trigram.contexts(0, 3) == 10 and bigram.contexts(3) == 1
    assert _ranges({5, 0, 1, 2, 6}) == [(0, 3), (5, 7)]
    tasks = [bigram, trigram]
    work = WorkList(tasks, torch.tensor([[0, 1, 3], [1, 1, 2]]))
    assert [work[g] for g in range(work.total)] == [(0, 0), (0, 3), (1, 0), (1, 2)]
    assert work.counts == [2, 2] and work.contexts(tasks) == 3 + 1 + 4 + 2
    limited = WorkList(tasks, torch.tensor([[0, 1, 3], [1, 1, 2]]), 3)
    assert limited.total == 3 and limited.counts == [2, 1] and limited.contexts(tasks) == 3 + 1 + 4
    assert WorkList(tasks, torch.tensor([[0, 0, 4], [1, 0, 3]])).total == 0


def test_a_refused_database_stops_every_rank_with_one_message(folder, tmp_path):
    """Only rank 0 checks the database; its refusal ends every rank (none waits for it), said once."""
    db = tmp_path / "missing" / "x.sqlite"
    proc = torchrun(*ngrams_args(folder, db))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("jetfx: error:")]
    assert len(lines) == 1 and "missing does not exist; create it first" in lines[0], err[-3000:]
    assert not re.search(r'File ".*jetfx/', err) and not (tmp_path / "missing").exists()
