"""SQLite storage of jet n-gram tables: many models and paths in one file, resumable runs, diffs.

Schema (docs/ngrams.md):

    vocabularies(hash PK, size)                      tokens(vocab, id, text)
    models(id PK, name, weights_hash, vocab, tied)   UNIQUE(name, weights_hash)
    runs(id PK, model, path, n, score, top_k, per_context, drop_self, chunk_size, num_chunks,
         status 'running'|'done', created)
    chunks(run, chunk)                               finished chunks (resume skips them)
    ngrams(run, scope 'top'|'context'|'cand', rank, t1, t2, t3, logit, logprob)
    masses(model, path, name, mass, mean_per_source, pairs, created)
"""

from __future__ import annotations

import datetime
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

SCHEMA = """
CREATE TABLE IF NOT EXISTS vocabularies(hash TEXT PRIMARY KEY, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tokens(vocab TEXT NOT NULL, id INTEGER NOT NULL, text TEXT, PRIMARY KEY(vocab, id));
CREATE TABLE IF NOT EXISTS models(id INTEGER PRIMARY KEY, name TEXT NOT NULL, weights_hash TEXT NOT NULL,
    vocab TEXT NOT NULL REFERENCES vocabularies(hash), tied INTEGER, UNIQUE(name, weights_hash));
CREATE TABLE IF NOT EXISTS runs(id INTEGER PRIMARY KEY, model INTEGER NOT NULL REFERENCES models(id),
    path TEXT NOT NULL, n INTEGER NOT NULL, score TEXT NOT NULL, top_k INTEGER, per_context INTEGER,
    drop_self INTEGER, chunk_size INTEGER, num_chunks INTEGER, status TEXT NOT NULL, created TEXT);
CREATE TABLE IF NOT EXISTS chunks(run INTEGER NOT NULL, chunk INTEGER NOT NULL, PRIMARY KEY(run, chunk));
CREATE TABLE IF NOT EXISTS ngrams(run INTEGER NOT NULL, scope TEXT NOT NULL, rank INTEGER, t1 INTEGER NOT NULL,
    t2 INTEGER NOT NULL, t3 INTEGER, logit REAL, logprob REAL);
CREATE INDEX IF NOT EXISTS ngrams_run ON ngrams(run, scope, rank);
CREATE TABLE IF NOT EXISTS masses(model INTEGER NOT NULL, path TEXT NOT NULL, name TEXT NOT NULL, mass REAL,
    mean_per_source REAL, pairs INTEGER, created TEXT);
"""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunInfo:
    id: int
    model: str
    weights_hash: str
    vocab: str
    path: str
    n: int
    score: str
    top_k: int
    per_context: int
    drop_self: bool
    status: str


class Run:
    """A run's checkpoint: finished chunks and their rows (what `bigram_table(checkpoint=)` uses)."""

    def __init__(self, db: NgramDB, run_id: int):
        self.db, self.id = db, run_id

    def done(self) -> set[int]:
        return {r[0] for r in self.db.con.execute("SELECT chunk FROM chunks WHERE run=?", (self.id,))}

    def load(self):
        cand = self.db.con.execute("SELECT t1, t2, logit, logprob FROM ngrams WHERE run=? AND scope='cand'",
                                   (self.id,)).fetchall()
        ctx = self.db.con.execute("SELECT t1, rank, t2, logit, logprob FROM ngrams WHERE run=? AND scope='context'",
                                  (self.id,)).fetchall()
        return cand, ctx

    def save(self, chunk: int, cand_rows, ctx_rows) -> None:
        with self.db.con:
            self.db.con.executemany("INSERT INTO ngrams(run, scope, rank, t1, t2, logit, logprob) "
                                    "VALUES (?, 'cand', NULL, ?, ?, ?, ?)", [(self.id, *r) for r in cand_rows])
            self.db.con.executemany("INSERT INTO ngrams(run, scope, t1, rank, t2, logit, logprob) "
                                    "VALUES (?, 'context', ?, ?, ?, ?, ?)", [(self.id, *r) for r in ctx_rows])
            self.db.con.execute("INSERT OR IGNORE INTO chunks VALUES (?, ?)", (self.id, chunk))


class NgramDB:
    """An n-gram database file. `NgramDB(path)`; ":memory:" works too."""

    def __init__(self, path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.con = sqlite3.connect(self.path)
        self.con.executescript(SCHEMA)

    def close(self):
        self.con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # models ----------------------------------------------------------------------------------
    def add_model(self, gm, name: str | None = None) -> int:
        from . import ngrams as N
        from .tracing import info_of

        info = info_of(gm)
        name = name or info.model_name
        wh, vh = N.weights_hash(gm), N.vocab_hash(gm)
        row = self.con.execute("SELECT id FROM models WHERE name=? AND weights_hash=?", (name, wh)).fetchone()
        if row:
            return row[0]
        with self.con:
            if not self.con.execute("SELECT 1 FROM vocabularies WHERE hash=?", (vh,)).fetchone():
                self.con.execute("INSERT INTO vocabularies VALUES (?, ?)", (vh, info.vocab_size))
                self.con.executemany("INSERT INTO tokens VALUES (?, ?, ?)",
                                     [(vh, i, t) for i, t in enumerate(N.token_texts(gm))])
            tied = None if info.tied_embeddings is None else int(bool(info.tied_embeddings))
            cur = self.con.execute("INSERT INTO models(name, weights_hash, vocab, tied) VALUES (?, ?, ?, ?)",
                                   (name, wh, vh, tied))
        return cur.lastrowid

    def models(self) -> list[tuple]:
        return self.con.execute("SELECT id, name, weights_hash, vocab, tied FROM models ORDER BY id").fetchall()

    # runs ------------------------------------------------------------------------------------
    def start_run(self, model_id: int, path: str, *, n: int = 2, score: str, top_k: int, per_context: int,
                  drop_self: bool, chunk_size: int, num_chunks: int) -> Run:
        """The unfinished run with these settings (to resume), else a new one."""
        key = (model_id, path, n, score, top_k, per_context, int(drop_self), chunk_size)
        row = self.con.execute("SELECT id FROM runs WHERE model=? AND path=? AND n=? AND score=? AND top_k=? AND "
                               "per_context=? AND drop_self=? AND chunk_size=? AND status='running' "
                               "ORDER BY id DESC", key).fetchone()
        if row:
            return Run(self, row[0])
        with self.con:
            cur = self.con.execute("INSERT INTO runs(model, path, n, score, top_k, per_context, drop_self, chunk_size, "
                                   "num_chunks, status, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?)",
                                   (*key, num_chunks, _now()))
        return Run(self, cur.lastrowid)

    def finish_run(self, run: Run, table) -> None:
        """Store the final top-K of a complete table and drop the run's candidates."""
        with self.con:
            self.con.execute("DELETE FROM ngrams WHERE run=? AND scope IN ('cand', 'top')", (run.id,))
            if table.n == 2:
                rows = [(run.id, r[0], r[1], r[2], None, r[3], r[4]) for r in table.top]
            else:
                rows = [(run.id, r[0], r[1], r[2], r[3], r[4], r[5]) for r in table.top]
            self.con.executemany("INSERT INTO ngrams(run, scope, rank, t1, t2, t3, logit, logprob) "
                                 "VALUES (?, 'top', ?, ?, ?, ?, ?, ?)", rows)
            self.con.execute("UPDATE runs SET status='done' WHERE id=?", (run.id,))

    def save_table(self, model_id: int, table, *, top_k: int, per_context: int = 0, drop_self: bool = False) -> int:
        """Store a table computed without a checkpoint (e.g. trigrams) as a finished run."""
        run = self.start_run(model_id, table.path, n=table.n, score=table.score, top_k=top_k,
                             per_context=per_context, drop_self=drop_self, chunk_size=0, num_chunks=0)
        if table.per_context:
            run.save(0, [], table.per_context)
        self.finish_run(run, table)
        return run.id

    def runs(self) -> list[RunInfo]:
        rows = self.con.execute(
            "SELECT r.id, m.name, m.weights_hash, m.vocab, r.path, r.n, r.score, r.top_k, r.per_context, r.drop_self, "
            "r.status FROM runs r JOIN models m ON m.id = r.model ORDER BY r.id").fetchall()
        return [RunInfo(*r[:9], bool(r[9]), r[10]) for r in rows]

    def run(self, run_id: int) -> RunInfo:
        for r in self.runs():
            if r.id == run_id:
                return r
        raise InputError(f"no run {run_id} in {self.path}; runs: {[r.id for r in self.runs()]}")

    def find_run(self, model: str | None = None, path: str | None = None) -> RunInfo:
        """The latest finished run of a model name (or weights hash) and path."""
        cands = [r for r in self.runs() if r.status == "done" and (model is None or model in (r.model, r.weights_hash))
                 and (path is None or r.path == path)]
        if not cands:
            raise InputError(f"no finished run for model={model!r} path={path!r} in {self.path}")
        return cands[-1]

    # queries ---------------------------------------------------------------------------------
    def text(self, vocab: str, ids) -> list[str]:
        out = []
        for i in ids:
            if i is None:
                out.append(None)
                continue
            row = self.con.execute("SELECT text FROM tokens WHERE vocab=? AND id=?", (vocab, i)).fetchone()
            out.append(row[0] if row else f"<{i}>")
        return out

    def top(self, run_id: int, limit: int | None = None, *, with_text: bool = True) -> list[dict]:
        """Global top-K rows of a run: rank, ids, texts, logit, logprob."""
        info = self.run(run_id)
        q = "SELECT rank, t1, t2, t3, logit, logprob FROM ngrams WHERE run=? AND scope='top' ORDER BY rank"
        rows = self.con.execute(q + (" LIMIT ?" if limit else ""), (run_id, limit) if limit else (run_id,)).fetchall()
        return [self._row(info, r, with_text) for r in rows]

    def context(self, run_id: int, source: int, limit: int | None = None) -> list[dict]:
        """Per-context top-n of one source token."""
        info = self.run(run_id)
        rows = self.con.execute("SELECT rank, t1, t2, NULL, logit, logprob FROM ngrams WHERE run=? AND "
                                "scope='context' AND t1=? ORDER BY rank", (run_id, source)).fetchall()
        return [self._row(info, r, True) for r in rows[:limit]]

    def _row(self, info: RunInfo, r, with_text: bool) -> dict:
        ids = [t for t in r[1:4] if t is not None]
        d = {"rank": r[0], "ids": ids, "logit": r[4], "logprob": r[5]}
        if with_text:
            d["text"] = self.text(info.vocab, ids)
        return d

    # diffs -----------------------------------------------------------------------------------
    def diff(self, run_a: int, run_b: int, limit: int = 20) -> dict:
        """Compare the top-K of two runs over the same vocabulary (e.g. base vs fine-tuned).

        entering: in B's top-K, not A's; leaving: in A's, not B's; promoted / suppressed: in both,
        rank improved / worsened in B (largest changes first), with score changes.
        """
        a, b = self.run(run_a), self.run(run_b)
        if a.vocab != b.vocab:
            raise InputError(f"runs {run_a} ({a.model}) and {run_b} ({b.model}) use different vocabularies "
                             f"({a.vocab} vs {b.vocab}): n-gram tables can only be compared over the same tokens")
        if a.n != b.n:
            raise InputError(f"run {run_a} holds {a.n}-grams and run {run_b} {b.n}-grams")
        if a.status != "done" or b.status != "done":
            raise InputError("both runs must be finished (resume the unfinished one first)")
        ta = {tuple(r["ids"]): r for r in self.top(run_a, with_text=False)}
        tb = {tuple(r["ids"]): r for r in self.top(run_b, with_text=False)}
        key = "logit" if a.score == "logit" else "logprob"

        def entry(k, ra=None, rb=None):
            e = {"ids": list(k), "text": self.text(a.vocab, k)}
            if ra:
                e["rank_a"], e[f"{key}_a"] = ra["rank"], ra[key]
            if rb:
                e["rank_b"], e[f"{key}_b"] = rb["rank"], rb[key]
            if ra and rb:
                e["rank_change"] = ra["rank"] - rb["rank"]  # > 0: promoted
                e[f"{key}_change"] = rb[key] - ra[key]
            return e

        both = [entry(k, ta[k], tb[k]) for k in ta.keys() & tb.keys()]
        promoted = sorted([e for e in both if e["rank_change"] > 0], key=lambda e: (-e["rank_change"], e["ids"]))
        suppressed = sorted([e for e in both if e["rank_change"] < 0], key=lambda e: (e["rank_change"], e["ids"]))
        entering = sorted([entry(k, rb=tb[k]) for k in tb.keys() - ta.keys()], key=lambda e: e["rank_b"])
        leaving = sorted([entry(k, ra=ta[k]) for k in ta.keys() - tb.keys()], key=lambda e: e["rank_a"])
        return {"a": run_a, "b": run_b, "score": key, "common": len(both), "top_k": (len(ta), len(tb)),
                "entering": entering[:limit], "leaving": leaving[:limit], "promoted": promoted[:limit],
                "suppressed": suppressed[:limit], "num_entering": len(entering), "num_leaving": len(leaving)}

    # mass index ------------------------------------------------------------------------------
    def add_mass(self, model_id: int, name: str, result: dict) -> None:
        with self.con:
            self.con.execute("INSERT INTO masses VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (model_id, result["path"], name, result["mass"], result["mean_per_source"],
                              result["pairs"], _now()))

    def masses(self) -> list[tuple]:
        return self.con.execute("SELECT m.name, m.weights_hash, x.path, x.name, x.mass, x.mean_per_source, x.pairs "
                                "FROM masses x JOIN models m ON m.id = x.model ORDER BY x.rowid").fetchall()


def extract(db: NgramDB, gm, path: str = "embed", *, name: str | None = None, top_k: int = 1000,
            per_context: int = 0, score: str = "logprob", drop_self: bool = False, chunk_size: int = 2048,
            progress: bool = True, max_chunks: int | None = None):
    """Compute (or resume) a bigram table into `db`; returns (run id, table)."""
    from . import ngrams as N

    p = N.parse_path(gm, path)
    model_id = db.add_model(gm, name)
    ev_sources = N.PathEvaluator(gm, p).sources
    num_chunks = -(-ev_sources // chunk_size)
    run = db.start_run(model_id, p.name, n=2, score=score, top_k=top_k, per_context=per_context,
                       drop_self=drop_self, chunk_size=chunk_size, num_chunks=num_chunks)
    table = N.bigram_table(gm, p.name, top_k=top_k, per_context=per_context, score=score, drop_self=drop_self,
                           chunk_size=chunk_size, progress=progress, checkpoint=run, max_chunks=max_chunks)
    if table.complete:
        db.finish_run(run, table)
    return run.id, table
