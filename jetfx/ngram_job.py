"""Jet n-gram tables of one model — one path or the whole model — computed chunk by chunk over the
ranks of a process group (`jetfx.distributed`; one process is a group of one), saved by rank 0.

The work is the list of (path, chunk) pairs not saved yet, in path order: chunks of source tokens
for bigram paths, blocks of contexts (rows of `first` × `second`) for trigram paths. It is dealt out
in rounds: in round r, rank i computes item r·W + i. After each round

- every rank receives every rank's candidates for the top-K (all-gather) and adds them to its running
  top-K of that path, so that every rank prunes against the best K found anywhere so far;
- rank 0 receives the per-context rows (gather) and commits each chunk to its path's checkpoint (a run
  in the SQLite database, or memory) with its index, as one transaction.

When a path's chunks are all saved, rank 0 ranks the candidates of every saved chunk into the final
table. A pair in the true top-K reaches every running K-th best (each is the K-th best of a subset),
so it is among its chunk's candidates: the table is the same for any number of ranks, any order of
chunks and any number of interruptions (ties are broken by token ids). Only rank 0 reads or writes
the database, so the ranks need no shared file system.

The work list is kept as ranges of chunk indices (a whole model's trigrams are millions of chunks):
rank 0 broadcasts the ranges already saved, and every rank derives the same list from them.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from dataclasses import dataclass, field

import torch

from . import ngram_kernels as N
from .distributed import Group, PeerLost
from .errors import InputError, JetfxError, RunInterrupted

WIDTH = 5  # rows cross between ranks as float64 (t1, t2, t3 | -1, logit, logprob) / (t1, rank, t2, logit, logprob)


@dataclass(frozen=True)
class Settings:
    """What, besides model and path, identifies a table (every rank must use the same)."""

    top_k: int = 1000
    per_context: int = 0
    score: str = "logprob"  # bigram paths
    drop_self: bool = False
    chunk_size: int = 2048  # source tokens (bigrams) or contexts (trigrams) a chunk
    first: tuple | None = None  # trigram contexts (None: every token)
    second: tuple | None = None
    trigram_score: str = "logit"  # the pruned search bounds logits
    prune: bool = True
    batch: int = 4096  # trigram contexts evaluated at once
    groups: int | None = None  # balls of the pruned search (None: √V)

    def score_of(self, n: int) -> str:
        return self.score if n == 2 else self.trigram_score

    def selection(self, n: int) -> str:
        """How a trigram run's contexts were restricted (part of what identifies the run)."""
        if n == 2 or (self.first is None and self.second is None):
            return ""
        return json.dumps({"first": None if self.first is None else list(self.first),
                           "second": None if self.second is None else list(self.second)})


@dataclass
class Task:
    """One path's table: its chunks (`rows` source tokens, or rows of first tokens × `second`, a
    chunk), and at rank 0 its checkpoint (`done()`, `is_done(chunk)`, `load()`, `save(chunk,
    cand_rows, ctx_rows)`: a `jetfx.ngram_db.Run`, or memory) and what to do with the complete
    table (`finish`, e.g. store it as the run's result)."""

    path: N.NgramPath
    sources: torch.Tensor  # source tokens (bigrams) or first tokens (trigrams)
    rows: int
    second: torch.Tensor | None = None
    store: object | None = None
    kernel: object | None = None  # built when this rank first computes a chunk of the path
    finish: object | None = None
    run_id: int | None = None
    reused: bool = False  # a finished run: nothing to compute
    table: N.NgramTable | None = None  # rank 0, once the job has run

    @classmethod
    def of(cls, path: N.NgramPath, sources: torch.Tensor, chunk_size: int, second: torch.Tensor | None = None,
           **kw) -> Task:
        """Bigram chunks of `chunk_size` source tokens; trigram chunks of whole rows of first tokens ×
        `second`, about `chunk_size` contexts (at least one row)."""
        rows = chunk_size if second is None else max(1, chunk_size // max(1, second.numel()))
        return cls(path, sources, rows, second, **kw)

    @property
    def n(self) -> int:
        return self.path.n

    @property
    def num_chunks(self) -> int:
        return -(-self.sources.numel() // self.rows)

    def chunk(self, c: int):
        part = self.sources[c * self.rows:(c + 1) * self.rows]
        return part if self.second is None else (part, self.second)

    def contexts(self, start: int, end: int | None = None) -> int:
        """Contexts of chunks start … end − 1 (of chunk `start` alone by default)."""
        end = start + 1 if end is None else end
        count = min(end * self.rows, self.sources.numel()) - start * self.rows
        return count * (1 if self.second is None else self.second.numel())


def chunks_of(gm, path: N.NgramPath, settings: Settings, **kw) -> Task:
    """The task of a path's table (its chunks: the units that are saved, resumed and shared out)."""
    from .tracing import info_of

    info = info_of(gm)
    sources = info.embedding_size or info.vocab_size
    if path.n == 2:
        return Task.of(path, torch.arange(sources), settings.chunk_size, **kw)
    a = torch.arange(sources) if settings.first is None else N._as_ids(settings.first, sources, "first")
    b = torch.arange(sources) if settings.second is None else N._as_ids(settings.second, sources, "second")
    return Task.of(path, a, settings.chunk_size, b, **kw)


@dataclass
class JobStats:
    """What a job did: chunks computed now (all ranks), found saved before, saved meanwhile by
    another process; contexts covered and evaluated exactly (trigram pruning); seconds; and rank
    0's own chunks, per path: [chunks, seconds]."""

    computed: int = 0
    saved_before: int = 0
    saved_elsewhere: int = 0
    contexts: int = 0
    evaluated: int = 0
    seconds: float = 0.0
    group: str = ""
    chunk_seconds: dict = field(default_factory=dict)


class MemoryStore:
    """A checkpoint in memory (a table computed without a database)."""

    def __init__(self):
        self.saved = {}

    def done(self) -> set[int]:
        return set(self.saved)

    def is_done(self, chunk: int) -> bool:
        return chunk in self.saved

    def candidates(self) -> list[tuple]:
        return [r for c in sorted(self.saved) for r in self.saved[c][0]]

    def load(self):
        ctx = sorted((r for c in self.saved for r in self.saved[c][1]), key=lambda r: (r[0], r[1]))
        return self.candidates(), ctx

    def save(self, chunk: int, cand_rows, ctx_rows) -> bool:
        if chunk in self.saved:
            return False
        self.saved[chunk] = (cand_rows, ctx_rows)
        return True


class WorkList:
    """The (task, chunk) pairs left to compute, in order, from the ranges of chunks saved before:
    item g → (task, chunk) by bisection, without a list of millions of pairs."""

    def __init__(self, tasks: list[Task], saved: torch.Tensor, limit: int | None = None):
        spans = {}
        for ti, start, end in saved.tolist():
            spans.setdefault(ti, []).append((start, end))
        self.left = []  # per task: [(start, end)] left to compute
        for ti, task in enumerate(tasks):
            free, at = [], 0
            for start, end in sorted(spans.get(ti, [])):
                if start > at:
                    free.append((at, start))
                at = max(at, end)
            if at < task.num_chunks:
                free.append((at, task.num_chunks))
            self.left.append(free)
        self.counts = [sum(e - s for s, e in free) for free in self.left]
        self.offsets = [0]
        for c in self.counts:
            self.offsets.append(self.offsets[-1] + c)
        self.total = self.offsets[-1] if limit is None else min(limit, self.offsets[-1])
        if limit is not None:  # what the limit leaves out is not computed in this job
            self.counts = [max(0, min(c, self.total - o)) for c, o in zip(self.counts, self.offsets)]

    def __getitem__(self, g: int) -> tuple[int, int]:
        ti = bisect.bisect_right(self.offsets, g) - 1
        j = g - self.offsets[ti]
        for start, end in self.left[ti]:
            if j < end - start:
                return ti, start + j
            j -= end - start
        raise IndexError(g)

    def contexts(self, tasks: list[Task], all: bool = False) -> int:
        """Contexts of the items left (within the limit, unless `all`)."""
        total = 0
        counts = [sum(e - s for s, e in free) for free in self.left] if all else self.counts
        for task, free, count in zip(tasks, self.left, counts):
            for start, end in free:
                take = min(count, end - start)
                if take <= 0:
                    break
                total += task.contexts(start, start + take)
                count -= take
        return total


def _ranges(chunks: set[int]) -> list[tuple[int, int]]:
    """{0, 1, 2, 5, 6} → [(0, 3), (5, 7)]."""
    out = []
    for c in sorted(chunks):
        if out and out[-1][1] == c:
            out[-1] = (out[-1][0], c + 1)
        else:
            out.append((c, c + 1))
    return out


def _kernel(gm, task: Task, settings: Settings, balls: dict):
    if task.n == 2:
        return N.BigramKernel(gm, task.path, top_k=settings.top_k, per_context=settings.per_context,
                              score=settings.score, drop_self=settings.drop_self)
    kernel = N.TrigramKernel(gm, task.path, top_k=settings.top_k, score=settings.trigram_score,
                             prune=settings.prune, batch=settings.batch, groups=settings.groups,
                             balls=balls.get("balls"))
    if settings.prune:  # the balls of U are the same for every head: made once
        balls["balls"] = (kernel.centers, kernel.radii)
    return kernel


def _rows(ids: torch.Tensor, scores: torch.Tensor) -> list[tuple]:
    return [tuple(i) + tuple(s) for i, s in zip(ids.tolist(), scores.tolist())]


def _pack(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    out = torch.full((ids.shape[0], WIDTH), -1.0, dtype=torch.float64, device=ids.device)
    out[:, :ids.shape[1]] = ids.double()
    out[:, 3:] = scores.double()
    return out


def _ranked(rows, n: int, score: str, top_k: int, device) -> N.RunningTopK:
    """The top-K of saved candidate rows (t1, …, tn, logit, logprob)."""
    running = N.RunningTopK(top_k, n, device)
    if rows:
        ids = torch.tensor([r[:n] for r in rows], dtype=torch.long, device=device)
        extra = torch.tensor([r[n:n + 2] for r in rows], dtype=torch.float64, device=device)
        running.add(extra[:, 0 if score == "logit" else 1], ids, extra)
    return running


def _top_rows(running: N.RunningTopK | None) -> list[tuple]:
    if running is None:
        return []
    return [(i + 1, *row, lg, lp) for i, (row, (lg, lp)) in enumerate(zip(running.rows.tolist(), running.extra.tolist()))]


def _table(task: Task, settings: Settings, device, complete: bool) -> N.NgramTable:
    """Rank 0: a path's table ranked from every saved chunk (complete), or from those saved so far."""
    cand, ctx = task.store.load()
    score = settings.score_of(task.n)
    table = N.NgramTable(task.path.name, task.n, score, per_context=ctx, complete=complete,
                         chunks_done=task.num_chunks if complete else len(task.store.done()),
                         num_chunks=task.num_chunks)
    if settings.top_k:
        table.top = _top_rows(_ranked(cand, task.n, score, settings.top_k, device))
    return table


def _finish(task: Task, settings: Settings, device) -> None:
    task.table = _table(task, settings, device, complete=True)
    if task.finish is not None:
        task.finish(task.table)


def _plan(tasks: list[Task], stats: JobStats, settings: Settings, device):
    """Rank 0: the ranges of chunks saved before (task, start, end; all of a finished run's) and
    their candidates (task, t…, scores); paths whose chunks were all saved before are finished here."""
    saved, seed = [], []
    for ti, task in enumerate(tasks):
        if task.reused:  # a finished run: the other ranks learn it here
            saved.append((ti, 0, task.num_chunks))
            continue
        done = task.store.done()
        stats.saved_before += len(done)
        saved += [(ti, s, e) for s, e in _ranges(done)]
        if len(done) == task.num_chunks:  # stopped after its last chunk: nothing left to compute
            _finish(task, settings, device)
            continue
        if done and settings.top_k:
            store = task.store
            for r in store.candidates() if hasattr(store, "candidates") else store.load()[0]:
                seed.append([ti, *r[:task.n], *[-1] * (3 - task.n), *r[task.n:task.n + 2]])
    return (torch.tensor(saved, dtype=torch.long).view(-1, 3),
            torch.tensor(seed, dtype=torch.float64).view(-1, 1 + WIDTH))


def _seeded(tasks: list[Task], seed: torch.Tensor, settings: Settings, device) -> dict:
    """Every path's running top-K, from the candidates saved before (the same on every rank)."""
    running = {}
    if not settings.top_k:
        return running
    for ti, task in enumerate(tasks):
        running[ti] = N.RunningTopK(settings.top_k, task.n, device)
        mine = seed[seed[:, 0] == ti]
        if mine.numel():
            col = 4 if settings.score_of(task.n) == "logit" else 5
            running[ti].add(mine[:, col], mine[:, 1:1 + task.n].long(), mine[:, 4:])
    return running


def _compute(gm, tasks, item, running, settings, balls, group, stats):
    """This rank's chunk of the round: (header, packed candidates, packed per-context rows)."""
    device = group.device
    header = torch.tensor([-1, -1, 0, 0, 0, 0, 0], dtype=torch.long)
    empty = torch.empty(0, WIDTH, dtype=torch.float64, device=device)
    if item is None:
        return header, empty, empty
    ti, ci = item
    task = tasks[ti]
    header[:2] = torch.tensor([ti, ci])
    header[4] = task.contexts(ci)
    if group.main and task.store.is_done(ci):  # saved meanwhile by another process
        return header, empty, empty
    if task.kernel is None:
        for other in tasks:  # one kernel at a time (its buffers are V wide)
            other.kernel = None
        task.kernel = _kernel(gm, task, settings, balls)
    t = time.perf_counter()
    rows = task.kernel(task.chunk(ci), running.get(ti))
    if group.main:
        spent = stats.chunk_seconds.setdefault(task.path.name, [0, 0.0])
        spent[0], spent[1] = spent[0] + 1, spent[1] + time.perf_counter() - t
    cand, ctx = _pack(rows.ids, rows.scores), _pack(rows.ctx_ids, rows.ctx_scores)
    header[2:] = torch.tensor([cand.shape[0], ctx.shape[0], rows.contexts, rows.evaluated, 1])
    return header, cand, ctx


def run_tasks(gm, tasks: list[Task], settings: Settings, group: Group | None = None, *, progress: bool = True,
              max_chunks: int | None = None, stats: JobStats | None = None) -> JobStats:
    """Compute the tasks' unsaved chunks over the ranks of `group` (see the module's docstring);
    at rank 0 each complete task gets its `table` (and `finish` is called), an incomplete one a
    table marked incomplete. Every rank must call this with the same tasks and settings. A
    KeyboardInterrupt or a lost rank (`PeerLost`) leaves every saved chunk saved."""
    from .functions import device_of

    device = device_of(gm)
    group = group or Group(device)
    group.use_device(device)
    stats = stats if stats is not None else JobStats()
    stats.group = group.describe()
    if group.main:
        for task in tasks:
            if task.store is None and not task.reused:
                task.store = MemoryStore()
    error, saved = None, torch.empty(0, 3, dtype=torch.long)
    seed = torch.empty(0, 1 + WIDTH, dtype=torch.float64)
    if group.main:
        try:
            saved, seed = _plan(tasks, stats, settings, device)
        except (JetfxError, OSError) as e:
            error = e
    group.agree(error)
    work = WorkList(tasks, group.broadcast(saved).cpu(), max_chunks)
    running = _seeded(tasks, group.broadcast(seed).to(device), settings, device)
    left = list(work.counts)
    bar = None
    if group.main and progress:
        todo = work.contexts(tasks)
        saved_contexts = sum(t.contexts(0, t.num_chunks) for t in tasks if not t.reused) - work.contexts(tasks, all=True)
        bar = N._progress(saved_contexts + todo, True, "n-grams", initial=saved_contexts, unit="ctx")
    balls, W = {}, group.world
    t0 = time.perf_counter()
    try:
        for r in range(math.ceil(work.total / W)):
            g = r * W + group.rank
            header, cand, ctx = _compute(gm, tasks, work[g] if g < work.total else None, running, settings, balls,
                                         group, stats)
            headers = torch.cat(group.all_gather(header[None].to(group.device), sizes=[1] * W)).cpu().tolist()
            cands = group.all_gather(cand, sizes=[h[2] for h in headers])
            ctxs = group.gather(ctx, sizes=[h[3] for h in headers])
            for rank, (ti, ci, _, _, contexts, evaluated, computed) in enumerate(headers):
                if ti < 0:
                    continue
                task, c = tasks[ti], cands[rank].to(device)
                if c.shape[0] and ti in running:
                    col = 3 if settings.score_of(task.n) == "logit" else 4
                    running[ti].add(c[:, col], c[:, :task.n].long(), c[:, 3:])
                stats.computed += computed
                stats.saved_elsewhere += 1 - computed
                stats.contexts += contexts
                stats.evaluated += evaluated
                left[ti] -= 1
                if not group.main:
                    continue
                if computed:
                    x = ctxs[rank]
                    task.store.save(ci, _rows(c[:, :task.n].long(), c[:, 3:]), _rows(x[:, :3].long(), x[:, 3:]))
                if bar is not None:
                    bar.update(contexts)
                    bar.set_postfix_str(task.path.name, refresh=False)
                if left[ti] == 0 and len(task.store.done()) == task.num_chunks:
                    _finish(task, settings, device)
    finally:
        stats.seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
    if group.main:
        for task in tasks:
            if task.table is None and not task.reused:  # stopped early (max_chunks): what is known so far
                task.table = _table(task, settings, device, complete=False)
    return stats


def extract_paths(db, gm, paths, *, name: str | None = None, settings: Settings = Settings(), group: Group | None = None,
                  recompute: bool = False, progress: bool = True, max_chunks: int | None = None,
                  stats: JobStats | None = None) -> list[Task]:
    """Compute, resume or reuse the tables of `paths` (bigram and trigram paths) in `db`, over the
    ranks of `group`; every rank calls this, only rank 0 passes `db` (the others None).

    Rank 0 gets each task's `run_id` and `table` (`table.reused`: a finished run with these
    settings, not recomputed unless `recompute`; `table.complete` False after `max_chunks`
    chunks). Ctrl-C, SIGTERM or a lost rank raise `RunInterrupted` at rank 0 once every finished
    chunk is committed (re-running resumes); the other ranks see KeyboardInterrupt or `PeerLost`.
    """
    from .functions import device_of
    group = group or Group(device_of(gm))

    def prepare():
        parsed = [N.parse_path(gm, p) if isinstance(p, str) else p for p in paths]
        if group.main and db is None:
            raise InputError("rank 0 writes the tables: give it the database")
        if settings.top_k < 1 and any(p.n == 3 for p in parsed):
            raise InputError("trigram tables are top-K tables: give top_k ≥ 1 (--top-k)")
        return [chunks_of(gm, p, settings) for p in parsed]

    tasks = group.checked(prepare)  # every rank, or none, goes on
    error = None
    if group.main:
        try:
            model_id = db.add_model(gm, name)
            for task in tasks:
                n = task.n
                run = db.start_run(model_id, task.path.name, n=n, score=settings.score_of(n), top_k=settings.top_k,
                                   per_context=settings.per_context if n == 2 else 0,
                                   drop_self=settings.drop_self if n == 2 else False, chunk_size=settings.chunk_size,
                                   num_chunks=task.num_chunks, selection=settings.selection(n), recompute=recompute)
                task.run_id = run.id
                if run.finished:
                    task.reused, task.table = True, db.table(run.id)
                    task.table.reused = True
                else:
                    task.store = run
                    task.finish = lambda table, run=run: db.finish_run(run, table)
        except (JetfxError, OSError) as e:
            error = e
    group.agree(error)
    stats = stats if stats is not None else JobStats()
    try:
        run_tasks(gm, tasks, settings, group, progress=progress, max_chunks=max_chunks, stats=stats)
    except (KeyboardInterrupt, PeerLost) as e:
        if not group.main:
            raise
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"a rank stopped ({e})"
        earlier = 0
        for task in tasks:
            if task.reused or db.run(task.run_id).status == "done":
                earlier += 1
                continue
            raise RunInterrupted(task.run_id, task.path.name, len(task.store.done()), task.num_chunks, db.path,
                                 reason=reason, earlier=earlier) from None
        last = tasks[-1]
        raise RunInterrupted(last.run_id, last.path.name, last.num_chunks, last.num_chunks, db.path, reason=reason,
                             earlier=len(tasks) - 1) from None
    return tasks
