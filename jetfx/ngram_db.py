"""SQLite storage of jet n-gram tables: many models and paths in one file, resumable runs, diffs.

Schema (docs/ngrams.md):

    vocabularies(hash PK, size)                      tokens(vocab, id, text)
    models(id PK, name, weights_hash, vocab, tied)   UNIQUE(name, weights_hash)
    runs(id PK, model, path, n, score, top_k, per_context, drop_self, chunk_size, num_chunks,
         status 'running'|'done', created, selection)
    chunks(run, chunk)                               finished chunks (resume skips them)
    ngrams(run, scope 'top'|'context'|'cand', rank, t1, t2, t3, logit, logprob)
    masses(model, path, name, mass, mean_per_source, pairs, created)

Several processes may write one file at once (e.g. `jetfx ngrams` for different paths): the file is
in WAL mode, every write is one `BEGIN IMMEDIATE` transaction (a chunk's rows and its entry in
`chunks` commit together or not at all), inserts of shared rows (vocabularies, tokens, models) are
idempotent, and a writer waits up to `timeout` seconds for another one before it reports that the
database is in use. An interrupted process leaves the file consistent; re-running the same command
resumes its run.
"""

from __future__ import annotations

import datetime
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .errors import InputError, RunInterrupted  # noqa: F401  (importable from here, as before)

SCHEMA = """
CREATE TABLE IF NOT EXISTS vocabularies(hash TEXT PRIMARY KEY, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tokens(vocab TEXT NOT NULL, id INTEGER NOT NULL, text TEXT, PRIMARY KEY(vocab, id));
CREATE TABLE IF NOT EXISTS models(id INTEGER PRIMARY KEY, name TEXT NOT NULL, weights_hash TEXT NOT NULL,
    vocab TEXT NOT NULL REFERENCES vocabularies(hash), tied INTEGER, UNIQUE(name, weights_hash));
CREATE TABLE IF NOT EXISTS runs(id INTEGER PRIMARY KEY, model INTEGER NOT NULL REFERENCES models(id),
    path TEXT NOT NULL, n INTEGER NOT NULL, score TEXT NOT NULL, top_k INTEGER, per_context INTEGER,
    drop_self INTEGER, chunk_size INTEGER, num_chunks INTEGER, status TEXT NOT NULL, created TEXT,
    selection TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS chunks(run INTEGER NOT NULL, chunk INTEGER NOT NULL, PRIMARY KEY(run, chunk));
CREATE TABLE IF NOT EXISTS ngrams(run INTEGER NOT NULL, scope TEXT NOT NULL, rank INTEGER, t1 INTEGER NOT NULL,
    t2 INTEGER NOT NULL, t3 INTEGER, logit REAL, logprob REAL);
CREATE INDEX IF NOT EXISTS ngrams_run ON ngrams(run, scope, rank);
CREATE TABLE IF NOT EXISTS masses(model INTEGER NOT NULL, path TEXT NOT NULL, name TEXT NOT NULL, mass REAL,
    mean_per_source REAL, pairs INTEGER, created TEXT);
"""
TABLES = {"vocabularies", "tokens", "models", "runs", "chunks", "ngrams", "masses"}
SQLITE_HEADER = b"SQLite format 3\x00"
TIMEOUT = 60.0  # seconds a writer waits for another process's transaction before "in use"


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
    """A run's checkpoint: finished chunks and their rows (what `bigram_table(checkpoint=)` and
    `jetfx.ngram_job` use). Candidate rows are (t1, t2, logit, logprob), or (t1, t2, t3, logit,
    logprob) for a trigram run (n = 3).

    Saving a chunk is idempotent: a chunk another process saved first is not stored twice.
    `finished` tells whether the run was already complete when it was opened.
    """

    def __init__(self, db: NgramDB, run_id: int, finished: bool = False, n: int | None = None):
        self.db, self.id, self.finished = db, run_id, finished
        if n is None:
            row = db.con.execute("SELECT n FROM runs WHERE id=?", (run_id,)).fetchone()
            n = row[0] if row else 2
        self.n = n
        self._ids = "t1, t2" if n == 2 else "t1, t2, t3"

    def done(self) -> set[int]:
        return {r[0] for r in self.db.con.execute("SELECT chunk FROM chunks WHERE run=?", (self.id,))}

    def is_done(self, chunk: int) -> bool:
        return self.db.con.execute("SELECT 1 FROM chunks WHERE run=? AND chunk=?", (self.id, chunk)).fetchone() is not None

    def load(self):
        """(candidates (t1, t2[, t3], logit, logprob), per-context rows (t1, rank, t2, logit, logprob)) of
        the saved chunks; for a run another process has finished meanwhile, its final top-K rows."""
        with self.db._read():
            cand = self.db.con.execute(f"SELECT {self._ids}, logit, logprob FROM ngrams WHERE run=? AND "
                                       "scope IN ('cand', 'top')", (self.id,)).fetchall()
            ctx = self.db.con.execute("SELECT t1, rank, t2, logit, logprob FROM ngrams WHERE run=? AND "
                                      "scope='context' ORDER BY t1, rank", (self.id,)).fetchall()
        return cand, ctx

    def candidates(self) -> list[tuple]:
        """The candidate rows of `load()` alone (what a resumed run starts its running top-K from)."""
        return self.db.con.execute(f"SELECT {self._ids}, logit, logprob FROM ngrams WHERE run=? AND "
                                   "scope IN ('cand', 'top')", (self.id,)).fetchall()

    def save(self, chunk: int, cand_rows, ctx_rows) -> bool:
        """Commit one chunk's rows with its entry in `chunks`; False if it was saved already."""
        with self.db._write() as con:
            if con.execute("INSERT OR IGNORE INTO chunks VALUES (?, ?)", (self.id, chunk)).rowcount == 0:
                return False
            marks = ", ".join("?" * (self.n + 2))
            con.executemany(f"INSERT INTO ngrams(run, scope, rank, {self._ids}, logit, logprob) "
                            f"VALUES (?, 'cand', NULL, {marks})", [(self.id, *r) for r in cand_rows])
            con.executemany("INSERT INTO ngrams(run, scope, t1, rank, t2, logit, logprob) "
                            "VALUES (?, 'context', ?, ?, ?, ?, ?)", [(self.id, *r) for r in ctx_rows])
        return True


class NgramDB:
    """An n-gram database file. `NgramDB(path)` creates it if missing (its folder must exist);
    `NgramDB(path, create=False)` only opens an existing one; ":memory:" works too.

    `timeout`: seconds to wait for another process's write before an `InputError` says the
    database is in use.
    """

    def __init__(self, path, *, create: bool = True, timeout: float = TIMEOUT):
        self.path = str(path)
        self.timeout = float(timeout)
        memory = self.path == ":memory:"
        if not memory:
            self.check_file(self.path, create=create)
        target = self.path if memory else f"file:{quote(os.path.abspath(self.path))}?mode={'rwc' if create else 'rw'}"
        try:
            self.con = sqlite3.connect(target, uri=not memory, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise InputError(f"could not open the n-gram database {self.path}: {e}") from None
        try:
            self._open(create)
        except BaseException:
            self.con.close()
            raise

    @staticmethod
    def check_file(path, *, create: bool = True) -> None:
        """Refuse, before anything is computed, a path that cannot hold an n-gram database: a folder,
        a file that is not SQLite, a missing file when `create` is False, a missing folder."""
        from .files import check_output_file

        p = Path(path)
        if p.is_dir():
            raise InputError(f"the n-gram database {p} is a folder; give a file name such as {p / 'ngrams.sqlite'}")
        if p.exists():
            with open(p, "rb") as fh:
                head = fh.read(len(SQLITE_HEADER))
            if head and head != SQLITE_HEADER:
                raise InputError(f"{p} is not an SQLite database (it starts with {head[:8]!r}); give the n-gram "
                                 "database made by `jetfx ngrams`, or a new file name")
            if head:
                con = sqlite3.connect(f"file:{quote(os.path.abspath(p))}?mode=ro", uri=True, timeout=TIMEOUT)
                try:
                    NgramDB._check_tables(p, NgramDB._tables(con, p))
                finally:
                    con.close()
        elif not create:
            raise InputError(f"there is no n-gram database at {p}; `jetfx ngrams --db {p}` makes one")
        else:
            check_output_file(p, "n-gram database")

    @staticmethod
    def _tables(con: sqlite3.Connection, name) -> set[str]:
        try:
            return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            raise InputError(f"{name} is not a usable SQLite database ({e}); give the n-gram database made by "
                             "`jetfx ngrams`, or a new file name") from None

    @staticmethod
    def _check_tables(path, tables: set[str]) -> None:
        if tables and not TABLES <= tables:
            raise InputError(f"{path} is an SQLite database but not a jetfx n-gram database (it has the tables "
                             f"{', '.join(sorted(tables))}); give another file name")

    def _open(self, create: bool) -> None:
        tables = self._tables(self.con, self.path)
        self._check_tables(self.path, tables)
        if not create:
            if not tables:
                raise InputError(f"{self.path} holds no n-gram tables; `jetfx ngrams --db {self.path}` fills it")
            return
        if self.path != ":memory:":
            try:
                # WAL: readers never wait for the writer, and a commit is an append (no fsync per chunk)
                self.con.execute("PRAGMA journal_mode=WAL")
                self.con.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.OperationalError as e:
                raise self._error(e) from None
        with self._write() as con:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
            columns = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
            if "selection" not in columns:  # files made before the column existed
                con.execute("ALTER TABLE runs ADD COLUMN selection TEXT NOT NULL DEFAULT ''")

    def _error(self, e: sqlite3.Error) -> InputError:
        text = str(e)
        if "locked" in text or "busy" in text:
            return InputError(f"the n-gram database {self.path} is in use by another process (still locked after "
                              f"{self.timeout:g} s); wait for it to finish, or use another database file")
        return InputError(f"could not write to the n-gram database {self.path}: {text}")

    @contextmanager
    def _write(self):
        """One write transaction, taken before its first read (BEGIN IMMEDIATE: no lock upgrade that
        could deadlock with another writer); rolled back on any exception, Ctrl-C included."""
        try:
            self.con.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise self._error(e) from None
        try:
            yield self.con
            self.con.execute("COMMIT")
        except BaseException as e:
            if self.con.in_transaction:
                self.con.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError):
                raise self._error(e) from None
            raise

    @contextmanager
    def _read(self):
        """A consistent snapshot across several queries."""
        self.con.execute("BEGIN")
        try:
            yield self.con
        finally:
            if self.con.in_transaction:
                self.con.execute("COMMIT")

    def close(self):
        self.con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # models ----------------------------------------------------------------------------------
    def add_model(self, gm, name: str | None = None) -> int:
        """The id of the model (by name and weights hash), adding it and its vocabulary if new."""
        from . import ngram_kernels as N
        from .tracing import info_of

        info = info_of(gm)
        name = name or info.model_name
        wh, vh = N.weights_hash(gm), N.vocab_hash(gm)
        row = self.con.execute("SELECT id FROM models WHERE name=? AND weights_hash=?", (name, wh)).fetchone()
        if row:
            return row[0]
        known = self.con.execute("SELECT 1 FROM vocabularies WHERE hash=?", (vh,)).fetchone()
        texts = None if known else N.token_texts(gm)  # decoded outside the transaction
        tied = None if info.tied_embeddings is None else int(bool(info.tied_embeddings))
        with self._write() as con:
            if con.execute("INSERT OR IGNORE INTO vocabularies VALUES (?, ?)", (vh, info.vocab_size)).rowcount:
                con.executemany("INSERT OR IGNORE INTO tokens VALUES (?, ?, ?)",
                                [(vh, i, t) for i, t in enumerate(texts or N.token_texts(gm))])
            con.execute("INSERT OR IGNORE INTO models(name, weights_hash, vocab, tied) VALUES (?, ?, ?, ?)",
                        (name, wh, vh, tied))
            return con.execute("SELECT id FROM models WHERE name=? AND weights_hash=?", (name, wh)).fetchone()[0]

    def models(self) -> list[tuple]:
        return self.con.execute("SELECT id, name, weights_hash, vocab, tied FROM models ORDER BY id").fetchall()

    # runs ------------------------------------------------------------------------------------
    _SAME = "model=? AND path=? AND n=? AND score=? AND top_k=? AND per_context=? AND drop_self=? AND selection=?"

    def finished_run(self, model_id: int, path: str, *, n: int = 2, score: str, top_k: int, per_context: int = 0,
                     drop_self: bool = False, selection: str = "") -> int | None:
        """The id of the finished run with these settings (any chunk size), or None."""
        row = self.con.execute(f"SELECT id FROM runs WHERE {self._SAME} AND status='done' ORDER BY id DESC",
                               (model_id, path, n, score, top_k, per_context, int(drop_self), selection)).fetchone()
        return row[0] if row else None

    def start_run(self, model_id: int, path: str, *, n: int = 2, score: str, top_k: int, per_context: int,
                  drop_self: bool, chunk_size: int, num_chunks: int, selection: str = "",
                  recompute: bool = False) -> Run:
        """The finished run with these settings (`Run.finished`; unless `recompute`), else the
        unfinished one with the same chunk size (to resume), else a new one."""
        same = (model_id, path, n, score, top_k, per_context, int(drop_self), selection)
        with self._write() as con:
            if not recompute:
                row = con.execute(f"SELECT id FROM runs WHERE {self._SAME} AND status='done' ORDER BY id DESC",
                                  same).fetchone()
                if row:
                    return Run(self, row[0], finished=True, n=n)
            row = con.execute(f"SELECT id FROM runs WHERE {self._SAME} AND chunk_size=? AND status='running' "
                              "ORDER BY id DESC", (*same, chunk_size)).fetchone()
            if row:
                return Run(self, row[0], n=n)
            cur = con.execute("INSERT INTO runs(model, path, n, score, top_k, per_context, drop_self, selection, "
                              "chunk_size, num_chunks, status, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                              "'running', ?)", (*same, chunk_size, num_chunks, _now()))
            return Run(self, cur.lastrowid, n=n)

    def unfinished_runs(self, model_id: int, path: str, *, n: int = 2, score: str, top_k: int, per_context: int,
                        drop_self: bool, selection: str = "") -> list[tuple[int, int, int, int]]:
        """(run id, chunk size, chunks done, number of chunks) of unfinished runs with these settings."""
        return self.con.execute(
            f"SELECT r.id, r.chunk_size, (SELECT COUNT(*) FROM chunks c WHERE c.run = r.id), r.num_chunks FROM runs r "
            f"WHERE {self._SAME} AND status='running' ORDER BY id",
            (model_id, path, n, score, top_k, per_context, int(drop_self), selection)).fetchall()

    def chunks_done(self, run_id: int) -> int:
        return self.con.execute("SELECT COUNT(*) FROM chunks WHERE run=?", (run_id,)).fetchone()[0]

    def finish_run(self, run: Run, table) -> None:
        """Store the final top-K of a complete table, drop the run's candidates and any older finished
        run with the same settings (a recomputation replaces it). A no-op if another process finished
        the run first."""
        with self._write() as con:
            row = con.execute("SELECT model, path, n, score, top_k, per_context, drop_self, selection, status "
                              "FROM runs WHERE id=?", (run.id,)).fetchone()
            if row is None or row[-1] == "done":
                return
            con.execute("DELETE FROM ngrams WHERE run=? AND scope IN ('cand', 'top')", (run.id,))
            if table.n == 2:
                rows = [(run.id, r[0], r[1], r[2], None, r[3], r[4]) for r in table.top]
            else:
                rows = [(run.id, r[0], r[1], r[2], r[3], r[4], r[5]) for r in table.top]
            con.executemany("INSERT INTO ngrams(run, scope, rank, t1, t2, t3, logit, logprob) "
                            "VALUES (?, 'top', ?, ?, ?, ?, ?, ?)", rows)
            con.execute("UPDATE runs SET status='done' WHERE id=?", (run.id,))
            for (old,) in con.execute(f"SELECT id FROM runs WHERE {self._SAME} AND status='done' AND id != ?",
                                      (*row[:-1], run.id)).fetchall():
                self._delete_run(con, old)

    @staticmethod
    def _delete_run(con, run_id: int) -> None:
        con.execute("DELETE FROM ngrams WHERE run=?", (run_id,))
        con.execute("DELETE FROM chunks WHERE run=?", (run_id,))
        con.execute("DELETE FROM runs WHERE id=?", (run_id,))

    def save_table(self, model_id: int, table, *, top_k: int, per_context: int = 0, drop_self: bool = False,
                   selection: str = "", recompute: bool = False) -> int:
        """Store a table computed without a checkpoint (e.g. trigrams) as a finished run."""
        run = self.start_run(model_id, table.path, n=table.n, score=table.score, top_k=top_k,
                             per_context=per_context, drop_self=drop_self, chunk_size=0, num_chunks=0,
                             selection=selection, recompute=recompute)
        if run.finished:
            return run.id
        if table.per_context:
            run.save(0, [], table.per_context)
        self.finish_run(run, table)
        return run.id

    def table(self, run_id: int):
        """The stored final table of a finished run (an `NgramTable`)."""
        from .ngram_kernels import NgramTable

        info = self.run(run_id)
        rows = self.con.execute("SELECT rank, t1, t2, t3, logit, logprob FROM ngrams WHERE run=? AND scope='top' "
                                "ORDER BY rank", (run_id,)).fetchall()
        top = [(r[0], r[1], r[2], r[4], r[5]) if info.n == 2 else tuple(r) for r in rows]
        ctx = self.con.execute("SELECT t1, rank, t2, logit, logprob FROM ngrams WHERE run=? AND scope='context' "
                               "ORDER BY t1, rank", (run_id,)).fetchall()
        num = self.con.execute("SELECT num_chunks FROM runs WHERE id=?", (run_id,)).fetchone()[0] or 0
        return NgramTable(info.path, info.n, info.score, top=top, per_context=ctx, complete=info.status == "done",
                          chunks_done=self.chunks_done(run_id), num_chunks=num)

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
        """Record a mass index; it replaces an earlier one of the same model, path and pair set."""
        with self._write() as con:
            con.execute("DELETE FROM masses WHERE model=? AND path=? AND name=?", (model_id, result["path"], name))
            con.execute("INSERT INTO masses VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (model_id, result["path"], name, result["mass"], result["mean_per_source"],
                         result["pairs"], _now()))

    def masses(self) -> list[tuple]:
        return self.con.execute("SELECT m.name, m.weights_hash, x.path, x.name, x.mass, x.mean_per_source, x.pairs "
                                "FROM masses x JOIN models m ON m.id = x.model ORDER BY x.rowid").fetchall()


def extract(db: NgramDB, gm, path: str = "embed", *, name: str | None = None, top_k: int = 1000,
            per_context: int = 0, score: str = "logprob", drop_self: bool = False, chunk_size: int = 2048,
            progress: bool = True, max_chunks: int | None = None, recompute: bool = False, first=None,
            second=None):
    """Compute, resume or reuse the table of one path in `db`; returns (run id, table).

    A finished run with the same settings is reused (`table.reused`; nothing is computed) unless
    `recompute`, whose new run replaces it once complete. An unfinished one with the same chunk
    size is resumed. Ctrl-C raises `RunInterrupted` (a KeyboardInterrupt) after the last finished
    chunk is committed. A trigram path ('<attn block>:h<k>', contexts `first` × `second`, default
    all) is ranked by logit with the pruned search. Several paths, several processes:
    `jetfx.ngram_job.extract_paths`.
    """
    from . import ngram_kernels as N
    from .ngram_job import Settings, extract_paths  # (here: the database module imports no torch, for the CLI)

    p = N.parse_path(gm, path)
    N._check_table_args(score, top_k, per_context, chunk_size)
    if p.n == 2 and (first is not None or second is not None):
        raise InputError(f"first/second restrict trigram contexts; {p.name} is a bigram path")
    settings = Settings(top_k=top_k, per_context=per_context, score=score, drop_self=drop_self, chunk_size=chunk_size,
                        first=None if first is None else tuple(first), second=None if second is None else tuple(second))
    (task,) = extract_paths(db, gm, [p], name=name, settings=settings, recompute=recompute, progress=progress,
                            max_chunks=max_chunks)
    return task.run_id, task.table
