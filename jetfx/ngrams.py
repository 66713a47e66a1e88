"""Data-free jet n-grams: k = 0 jet paths evaluated over the whole vocabulary (paper §4.2).

Paths (docs/ngrams.md has the precise definitions):

- bigram, encoder→decoder ("embed"):   s(v→u) = [υ(η(v))]_u
- bigram through block b (e.g. "layers.3.mlp"):  s(v→u) = [υ(γ_b(η(v)))]_u
- trigram through head h of attention block b ("layers.0.self_attn:h3"), context (v1, v2):
  s(v1 v2→u) = [υ(γ_{b,h}(η(v1 v2)))_{position 1}]_u

Each is a composition of Algorithm-1 expansions with k = 0 and a single center of weight 1:
`jet_expand(gm, b, stream(gm, 0), 0, [1.0])` gives {η, γ_b(η)}, the branch term is selected,
then `jet_expand(gm, "decoder", term, 0, [1.0])` gives υ(γ_b(η)). `path_terms` builds these terms
(compilable with `.compile()`); the full-vocabulary evaluator lowers the same k = 0 terms through
the model's own regions (`jetfx.functions`), splitting the decoder υ = U ∘ γ_{L+1} so that the
d→V unembedding U runs chunk by chunk with a fused log-softmax and a running top-K.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from .errors import ExpansionError, InputError
from .functions import block_region, capture, decoder_region, device_of, split_decoder
from .tracing import info_of, residual_of

SCORES = ("logit", "logprob")
ENCODER_PATH = "embed"


# ---------------------------------------------------------------------------------------------
# paths


@dataclass(frozen=True)
class NgramPath:
    """A jet n-gram path: n = 2 (encoder→[block]→decoder) or n = 3 (encoder→head→decoder)."""

    name: str  # "embed", a block name, or "<attention block>:h<head>"
    n: int
    block: str | None = None
    head: int | None = None


_HEAD = re.compile(r"^(?P<block>.+):h(?P<head>\d+)$")


def parse_path(gm: fx.GraphModule, name: str) -> NgramPath:
    """'embed' | a block name ('layers.3.mlp') | '<attention block>:h<k>' (a trigram path)."""
    structure = residual_of(gm)
    if not isinstance(name, str) or not name:
        raise InputError(f"an n-gram path is 'embed', a block name or '<attn block>:h<head>', got {name!r}")
    if name in (ENCODER_PATH, "encoder"):
        return NgramPath(ENCODER_PATH, 2)
    m = _HEAD.match(name)
    if m:
        try:
            b = structure.block(m["block"])
        except ExpansionError as e:
            raise InputError(str(e)) from None
        if b.kind != "attn":
            raise InputError(f"trigram paths go through one head of an attention block; {b.name} is {b.kind}")
        return NgramPath(f"{b.name}:h{int(m['head'])}", 3, b.name, int(m["head"]))
    try:
        b = structure.block(name)
    except ExpansionError as e:
        raise InputError(f"unknown n-gram path {name!r}: {e}; or use 'embed'") from None
    return NgramPath(b.name, 2, b.name)


def bigram_paths(gm: fx.GraphModule, kinds: Sequence[str] = ("mlp",)) -> list[str]:
    """'embed' and every block of the given kinds (default: the MLPs), in depth order."""
    return [ENCODER_PATH] + [b.name for b in residual_of(gm).blocks if b.kind in kinds]


def path_terms(gm: fx.GraphModule, path: str | NgramPath):
    """The bigram path as Algorithm-1 terms at the decoder (a `JetExpansion`; `.compile()` runs it).

    Trigram (per-head) paths have no block of their own in the residual structure; their terms are
    evaluated through `jetfx.passes.heads.head_branch` (see docs/ngrams.md).
    """
    from .expansion import jet_expand, stream

    p = parse_path(gm, path) if isinstance(path, str) else path
    if p.n != 2:
        raise InputError(f"{p.name} is a trigram path; path_terms covers bigram paths")
    center = stream(gm, 0)
    if p.block is not None:
        xi = jet_expand(gm, p.block, center, 0, [1.0])
        branch = [i for i, n in enumerate(xi.terms.names) if n == p.block]
        center = xi.terms[branch[0]]
    return jet_expand(gm, "decoder", center, 0, [1.0])


# ---------------------------------------------------------------------------------------------
# evaluator: d-space vectors for token batches, then U in chunks


class _Decoder:
    """υ = U ∘ γ_{L+1}, split: `norm(x)` (the region up to U's input) and the matrix W (V, d)."""

    def __init__(self, gm: fx.GraphModule):
        self.vocab = info_of(gm).vocab_size
        split = split_decoder(gm)
        self.split = split is not None
        if split is not None:
            self.norm, self.W = split.norm, split.unembedding
        else:
            self.norm, self.W = decoder_region(gm), None

    def hidden(self, x: torch.Tensor, side: dict) -> torch.Tensor:
        """(N, 1, d) stream vectors → (N, d) vectors U is applied to (or logits when U is not split)."""
        out = self.norm.module(x, *[side[s] for s in self.norm.side_inputs])
        return out.reshape(out.shape[0], -1)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.W is None:
            return hidden
        return torch.matmul(hidden, self.W.t(), out=out) if out is not None else hidden @ self.W.t()


class PathEvaluator:
    """Evaluates one n-gram path for batches of contexts, in d-space then through U."""

    def __init__(self, gm: fx.GraphModule, path: str | NgramPath, num_heads: int | None = None):
        self.gm = gm
        self.path = parse_path(gm, path) if isinstance(path, str) else path
        self.structure = residual_of(gm)
        self.info = info_of(gm)
        self.decoder = _Decoder(gm)
        self.device = device_of(gm)
        if self.path.n == 3:
            from .passes.heads import head_branch

            self.region = head_branch(gm, self.path.block, self.path.head, num_heads)
        elif self.path.block is not None:
            self.region = block_region(gm, self.path.block)
        else:
            self.region = None
        side = set(self.decoder.norm.side_inputs)
        if self.region is not None:
            side |= set(self.region.side_inputs)
        self.side_names = tuple(sorted(side))

    @property
    def vocab(self) -> int:
        return self.info.vocab_size

    @property
    def sources(self) -> int:
        """Number of valid token ids (rows of the embedding)."""
        return self.info.embedding_size or self.info.vocab_size

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (N, n−1) → (N, d) vectors that U maps to the path's logits (last position)."""
        ids = ids.to(self.device)
        names = (self.structure.encoder.output,) + self.side_names
        vals = capture(self.gm, ids, names)
        x = vals[self.structure.encoder.output]
        if self.region is not None:
            x = self.region.module(x, *[vals[s] for s in self.region.side_inputs])
        x = x[:, -1:, :]
        side = dict(vals)
        if self.decoder.norm.side_inputs:  # sizes of the decoder's input: recompute for (N, 1)
            side.update(capture(self.gm, ids[:, -1:], self.decoder.norm.side_inputs))
        return self.decoder.hidden(x, side)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.logits(self.hidden(ids))


def _as_ids(tokens, sources: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if t.numel() == 0:
        raise InputError(f"{name}: no token ids given")
    if int(t.min()) < 0 or int(t.max()) >= sources:
        raise InputError(f"{name}: token ids must lie in [0, {sources}), got {int(t.min())}…{int(t.max())}")
    return t


def _scratch_rows(device: torch.device, width: int) -> int:
    """Rows of the log-sum-exp scratch buffer: 64 on a CPU (they stay in cache); on a GPU as many as
    fit in 256 MB of float32, so that a chunk takes a few large kernels, not hundreds of small ones."""
    if torch.device(device).type == "cpu":
        return 64
    return max(64, (1 << 26) // max(1, width))


# ---------------------------------------------------------------------------------------------
# bigram tables


@dataclass
class NgramTable:
    """Top-K n-grams of one path: `top` rows (rank, context…, target, logit, logprob), and
    per-context top-n rows `per_context` (context…, rank, target, logit, logprob)."""

    path: str
    n: int
    score: str
    top: list[tuple] = field(default_factory=list)
    per_context: list[tuple] = field(default_factory=list)
    complete: bool = True
    chunks_done: int = 0
    num_chunks: int = 0
    reused: bool = False  # read from a finished run in the database, not computed


class RunningTopK:
    """Global top-K over streamed (score, payload) candidates, with a threshold for pruning.
    Scores are float64: log-probabilities of 1 − 1e-40 must stay apart."""

    def __init__(self, k: int, width: int, device):
        self.k = k
        self.scores = torch.empty(0, device=device, dtype=torch.float64)
        self.rows = torch.empty(0, width, dtype=torch.long, device=device)
        self.extra = torch.empty(0, 2, device=device, dtype=torch.float64)

    @property
    def threshold(self) -> float:
        return float(self.scores[-1]) if self.scores.numel() >= self.k else -math.inf

    def add(self, scores: torch.Tensor, rows: torch.Tensor, extra: torch.Tensor):
        if scores.numel() == 0:
            return
        s = torch.cat([self.scores, scores.double()])
        r = torch.cat([self.rows, rows])
        e = torch.cat([self.extra, extra.double()])
        k = min(self.k, s.numel())
        # ties broken by the row ids, so that the result does not depend on the order candidates
        # arrive in (a resumed run sees its chunks in another order than an uninterrupted one)
        order = torch.arange(s.numel(), device=s.device)
        for col in reversed(range(r.shape[1])):
            order = order[torch.argsort(r[order, col], stable=True)]
        order = order[torch.argsort(s[order], descending=True, stable=True)][:k]
        self.scores, self.rows, self.extra = s[order], r[order], e[order]


def _row_log_normalizer(z: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, δ) of every row of z, with log softmax(z)_u = (z_u − m) − δ: m the row's maximum (z's
    dtype) and δ = log1p(Σ_{u ≠ argmax} exp(z_u − m)) in float64.

    Why not z − logsumexp(z): when one entry dominates (P ≈ 1, e.g. v→v on tied embeddings) the
    others sum to less than float32's resolution next to it, logsumexp rounds to m, and every such
    log-probability comes out exactly 0 — a ranking by log-probability then cannot be read (on
    SmolLM2's `embed` path the others sum to e^-150 of the maximum, far below float32's range). So
    the other entries are summed relative to the second largest m₂, log Σ' = (m₂ − m) + log Σ_{u ≠
    argmax} e^{z_u − m₂}, and δ = log1p(e^{log Σ'}) is formed in float64 (exact down to 1e-308).
    Computed in row blocks that stay in cache (no z-sized temporary: `torch.logsumexp` allocates
    two, and is 3× slower on CPU).
    """
    m_all = torch.empty(z.shape[0], device=z.device, dtype=z.dtype)
    delta = torch.empty(z.shape[0], device=z.device, dtype=torch.float64)
    b = scratch.shape[0]
    for i in range(0, z.shape[0], b):
        zz = z[i:i + b]
        m, arg = zz.max(1, keepdim=True)
        t = scratch[: zz.shape[0], : zz.shape[1]].to(zz.dtype)
        torch.sub(zz, m, out=t)
        t.scatter_(1, arg, -math.inf)  # the maximum apart: it is the 1 of log1p
        m2 = t.amax(1, keepdim=True).clamp_min_(-1e30)  # the second largest, relative to m (finite: a row
        # whose other entries are all -inf gets δ = 0)
        # below -80, exp() underflows into denormals, which CPUs compute ~10× slower; relative to
        # the second largest entry (a term 1), clamping changes the sum by < V·e^-80 ≈ 1e-30
        t.sub_(m2).clamp_min_(-80.0).exp_()
        t.scatter_(1, arg, 0.0)
        log_rest = m2.squeeze(1).double() + t.sum(1).double().log()
        delta[i:i + b] = log_rest.exp().log1p()
        m_all[i:i + b] = m.squeeze(1)
    return m_all, delta


def _log_normalizer(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_row_log_normalizer` with its own scratch rows."""
    return _row_log_normalizer(z, torch.empty(min(64, z.shape[0]), z.shape[1], device=z.device, dtype=z.dtype))


def _lowered(theta: float, b32: torch.Tensor) -> torch.Tensor:
    """Per row, a float32 threshold below `theta` by more than the rounding of the float32 scores
    (z − m) − δ₃₂ (a few ulps of |θ| and of δ): every entry whose exact score reaches `theta`
    passes it. Candidates are then scored exactly (float64)."""
    eps = torch.finfo(torch.float32).eps
    low = theta - 4 * eps * (abs(theta) + 2 * b32.double().abs()) - 1e-44
    return low.to(b32.dtype)


def bigram_table(gm: fx.GraphModule, path: str = ENCODER_PATH, *, top_k: int = 1000, per_context: int = 0,
                 score: str = "logprob", drop_self: bool = False, chunk_size: int = 2048, sources=None,
                 progress: bool = True, checkpoint=None, max_chunks: int | None = None) -> NgramTable:
    """Full-vocabulary bigram table of `path`: global top-K pairs and per-source top-n.

    Streams source tokens in chunks of `chunk_size` (never a V×V tensor). `checkpoint` (an object
    with `done() -> set[int]`, `is_done(chunk)`, `load() -> rows`, `save(chunk, cand_rows, ctx_rows)`,
    as `jetfx.ngram_db.Run` provides) makes the run resumable: finished chunks are skipped (also
    those another process finishes meanwhile), and the final table is ranked from the candidates
    of every saved chunk, so that it is the same however often the run was interrupted.
    `max_chunks` stops after that many new chunks (the table is then marked incomplete).
    """
    if score not in SCORES:
        raise InputError(f"score must be one of {SCORES}, got {score!r}")
    if not isinstance(top_k, int) or top_k < 0 or not isinstance(per_context, int) or per_context < 0:
        raise InputError("top_k and per_context must be non-negative integers")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    ev = PathEvaluator(gm, path)
    if ev.path.n != 2:
        raise InputError(f"{ev.path.name} is a trigram path: use trigram_table")
    src = torch.arange(ev.sources) if sources is None else _as_ids(sources, ev.sources, "sources")
    chunks = [src[i:i + chunk_size] for i in range(0, src.numel(), chunk_size)]
    device = ev.device
    V = ev.vocab
    running = RunningTopK(top_k, 2, device) if top_k else None
    done = set()
    table = NgramTable(ev.path.name, 2, score, num_chunks=len(chunks))
    if checkpoint is not None:
        done = set(checkpoint.done())
        cand, ctx = checkpoint.load()
        if cand and running is not None:
            c = torch.tensor([r[:2] for r in cand], dtype=torch.long, device=device)
            e = torch.tensor([r[2:4] for r in cand], dtype=torch.float64, device=device)
            running.add(e[:, 0 if score == "logit" else 1], c, e)
        table.per_context.extend(ctx)
    bar = _progress(len(chunks), progress, f"bigrams {ev.path.name}", initial=len(done))
    buf = None
    scratch = torch.empty(_scratch_rows(device, V), V, device=device)
    new = 0
    try:
        for ci, chunk in enumerate(chunks):
            if ci in done or (checkpoint is not None and checkpoint.is_done(ci)):  # by us before, or by another process
                continue
            if max_chunks is not None and new >= max_chunks:
                table.complete = False
                break
            with torch.no_grad():
                hidden = ev.hidden(chunk.view(-1, 1))
                if ev.decoder.W is not None:
                    if buf is None or buf.shape[0] < hidden.shape[0]:
                        buf = torch.empty(hidden.shape[0], V, device=device, dtype=hidden.dtype)
                    z = ev.decoder.logits(hidden, out=buf[:hidden.shape[0]])
                else:
                    z = hidden
                rows_src = chunk.to(device)
                # P(u|v) is normalized over every u: log P = (z − m) − δ, δ in float64
                m, delta = _row_log_normalizer(z, scratch)
                row_max = m
                if drop_self:
                    self_idx = rows_src[rows_src < V]
                    pos = torch.nonzero(rows_src < V).flatten()
                    saved = z[pos, self_idx].clone()
                    z[pos, self_idx] = -math.inf
                    row_max = z.amax(1)
                # candidates are picked by float32 scores (z − a) − b (a = m, b = δ for
                # log-probabilities, 0 for logits) against a threshold lowered by their rounding,
                # then scored exactly in float64
                a = m if score == "logprob" else torch.zeros_like(m)
                b = delta.to(z.dtype) if score == "logprob" else torch.zeros_like(m)
                cand_rows, ctx_rows = [], []
                if running is not None:
                    theta = exact = running.threshold
                    best = (row_max - a) - b  # each row's best score: rows below θ hold no candidate
                    k = min(top_k, z.numel())
                    if theta == -math.inf and best.numel() >= k:
                        # k rows reach the k-th best row maximum: a valid bound
                        theta = float(torch.topk(best, k).values[-1])
                    if theta == -math.inf:
                        scores32 = (z - a[:, None]) - b[:, None]
                        theta = float(torch.topk(scores32.flatten(), k).values[-1])
                        r, u = torch.nonzero(scores32 >= _lowered(theta, b)[:, None], as_tuple=True)
                        del scores32
                    else:
                        low = _lowered(theta, b)
                        rows = torch.nonzero(best >= low).flatten()
                        rr, u = torch.nonzero((z[rows] - a[rows, None]) - b[rows, None] >= low[rows, None],
                                              as_tuple=True)
                        r = rows[rr]
                    logit = z[r, u].double()
                    logprob = (logit - m[r].double()) - delta[r]
                    vals = logprob if score == "logprob" else logit
                    if exact > -math.inf:  # the margin let in entries that cannot enter the top-K
                        keep = vals > exact
                        r, u, logit, logprob, vals = r[keep], u[keep], logit[keep], logprob[keep], vals[keep]
                    pairs = torch.stack([rows_src[r], u], 1)
                    extra = torch.stack([logit, logprob], 1)
                    running.add(vals, pairs, extra)
                    if checkpoint is not None:
                        cand_rows = [tuple(p) + tuple(e) for p, e in zip(pairs.tolist(), extra.tolist())]
                if per_context:
                    n = min(per_context, V)
                    vals, u = torch.topk(z, n, dim=1)
                    lp = (vals.double() - m.double()[:, None]) - delta[:, None]
                    for s, us, ls, lps in zip(chunk.tolist(), u.tolist(), vals.tolist(), lp.tolist()):
                        ctx_rows.extend((s, j + 1, us[j], ls[j], lps[j]) for j in range(n))
                if drop_self:
                    z[pos, self_idx] = saved
            table.per_context.extend(ctx_rows)
            if checkpoint is not None:
                checkpoint.save(ci, cand_rows, ctx_rows)
            new += 1
            bar.update(1)
    finally:
        bar.close()
    table.chunks_done = len(done) + new
    if checkpoint is not None:
        table.chunks_done = len(checkpoint.done())
        if table.chunks_done == len(chunks):  # the whole table, ranked from every saved chunk
            table.complete = True
            cand, table.per_context = checkpoint.load()
            if running is not None:
                running = RunningTopK(top_k, 2, device)
                if cand:
                    c = torch.tensor([r[:2] for r in cand], dtype=torch.long, device=device)
                    e = torch.tensor([r[2:4] for r in cand], dtype=torch.float64, device=device)
                    running.add(e[:, 0 if score == "logit" else 1], c, e)
    if running is not None:
        for i, ((v, u), (lg, lp)) in enumerate(zip(running.rows.tolist(), running.extra.tolist())):
            table.top.append((i + 1, v, u, lg, lp))
    return table


def _progress(total: int, enabled: bool, desc: str, initial: int = 0):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, initial=initial, desc=desc, unit="chunk")


@torch.no_grad()
def pair_scores(gm: fx.GraphModule, path: str, pairs) -> torch.Tensor:
    """(logit, logprob) of given (context…, target) tuples under `path`: a (P, 2) tensor on the model's device."""
    ev = PathEvaluator(gm, path)
    t = torch.as_tensor(pairs, dtype=torch.long)
    if t.dim() != 2 or t.shape[1] != ev.path.n:
        raise InputError(f"{ev.path.name} is an {ev.path.n}-gram path: give tuples of {ev.path.n} token ids")
    _as_ids(t[:, :-1], ev.sources, "contexts")
    _as_ids(t[:, -1], ev.vocab, "targets")
    ctx, inv = torch.unique(t[:, :-1], dim=0, return_inverse=True)
    # scored on the model's device; only the (P, 2) scores come back (not 1024 × V logits per block)
    t, inv = t.to(ev.device), inv.to(ev.device)
    out = torch.empty(t.shape[0], 2, dtype=torch.float64, device=ev.device)
    for i in range(0, ctx.shape[0], 1024):
        z = ev.logits(ctx[i:i + 1024]).float()
        m, delta = _log_normalizer(z)
        sel = (inv >= i) & (inv < i + 1024)
        rows = inv[sel] - i
        tg = t[sel, -1]
        out[sel, 0] = z[rows, tg].double()
        out[sel, 1] = (z[rows, tg].double() - m[rows].double()) - delta[rows]
    return out


# ---------------------------------------------------------------------------------------------
# trigrams


@torch.no_grad()
def trigram_table(gm: fx.GraphModule, path: str, *, first=None, second=None, top_k: int = 100,
                  score: str = "logit", prune: bool = True, batch: int = 4096, groups: int | None = None,
                  num_heads: int | None = None, progress: bool = False) -> NgramTable:
    """Top-K trigrams (v1, v2 → u) of a head path over contexts first × second (default: all).

    prune=True: a branch-and-bound over context pairs (exact, same result as prune=False). The
    rows w_u of U are grouped (k-means) into G balls (center c_g, radius ρ_g); for the path vector
    n of a context, max_u w_u·n ≤ max_g (c_g·n + ρ_g‖n‖) (Cauchy–Schwarz). Contexts whose bound is
    at most the K-th best logit found so far cannot enter the top-K and are skipped; the others
    are evaluated exactly, largest bound first. Only score="logit" can be pruned this way.
    """
    if score not in SCORES:
        raise InputError(f"score must be one of {SCORES}, got {score!r}")
    if prune and score != "logit":
        raise InputError("the pruned trigram search bounds logits only; use score='logit' or prune=False")
    ev = PathEvaluator(gm, path, num_heads=num_heads)
    if ev.path.n != 3:
        raise InputError(f"{ev.path.name} is not a trigram path; use '<attention block>:h<head>'")
    a = torch.arange(ev.sources) if first is None else _as_ids(first, ev.sources, "first")
    b = torch.arange(ev.sources) if second is None else _as_ids(second, ev.sources, "second")
    W = ev.decoder.W
    if prune and W is None:
        raise InputError("pruning needs a decoder ending in a linear unembedding; use prune=False")
    device = ev.device
    running = RunningTopK(top_k, 3, device)
    table = NgramTable(ev.path.name, 3, score)
    stats = {"contexts": 0, "evaluated": 0}
    if prune:
        centers, radii = _balls(W.float(), groups)
    rows_per = max(1, batch // b.numel())
    bar = _progress(math.ceil(a.numel() / rows_per), progress, f"trigrams {ev.path.name}")
    for i in range(0, a.numel(), rows_per):
        v1 = a[i:i + rows_per]
        ctx = torch.stack([v1.repeat_interleave(b.numel()), b.repeat(v1.numel())], 1).to(device)
        hid = ev.hidden(ctx).float()
        stats["contexts"] += ctx.shape[0]
        if prune:
            bound = (hid @ centers.t() + hid.norm(dim=1, keepdim=True) * radii[None]).amax(1)
            order = torch.argsort(bound, descending=True)
            for j in range(0, order.numel(), 256):
                idx = order[j:j + 256]
                idx = idx[bound[idx] > running.threshold]
                if idx.numel() == 0:
                    break
                _score_contexts(ev, hid[idx], ctx[idx], running, score)
                stats["evaluated"] += idx.numel()
        else:
            _score_contexts(ev, hid, ctx, running, score)
            stats["evaluated"] += ctx.shape[0]
        bar.update(1)
    bar.close()
    for r, (row, (lg, lp)) in enumerate(zip(running.rows.tolist(), running.extra.tolist())):
        table.top.append((r + 1, *row, lg, lp))
    table.stats = stats
    return table


def _score_contexts(ev, hid, ctx, running, score):
    z = ev.decoder.logits(hid.to(ev.decoder.W.dtype) if ev.decoder.W is not None else hid).float()
    m, delta = _log_normalizer(z)
    b = delta.float() if score == "logprob" else torch.zeros_like(m)
    s = z if score == "logit" else (z - m[:, None]) - b[:, None]  # float32: picks candidates (bigram_table)
    k = min(running.k, s.numel())
    theta = float(torch.topk(s.flatten(), k).values[-1])
    r, u = torch.nonzero(s >= _lowered(theta, b)[:, None], as_tuple=True)
    logit = z[r, u].double()
    logprob = (logit - m[r].double()) - delta[r]
    rows = torch.cat([ctx[r], u[:, None]], 1)
    running.add(logprob if score == "logprob" else logit, rows, torch.stack([logit, logprob], 1))


def _balls(W: torch.Tensor, groups: int | None, iters: int = 8):
    """k-means balls over the rows of W: centers (G, d) and radii (G,) with every row inside one."""
    V = W.shape[0]
    G = groups or max(1, int(math.sqrt(V)))
    G = min(G, V)
    gen = torch.Generator(device="cpu").manual_seed(0)
    centers = W[torch.randperm(V, generator=gen)[:G].to(W.device)].clone()
    for _ in range(iters):
        assign = torch.cdist(W, centers).argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, W)
        counts = torch.bincount(assign, minlength=G).clamp(min=1).to(W.dtype)
        centers = torch.where((torch.bincount(assign, minlength=G) > 0)[:, None], sums / counts[:, None], centers)
    assign = torch.cdist(W, centers).argmin(1)
    dist = (W - centers[assign]).norm(dim=1)
    radii = torch.zeros(G, device=W.device, dtype=W.dtype).scatter_reduce_(0, assign, dist, "amax")
    radii = radii * (1 + 1e-5) + 1e-6  # float safety margin
    return centers, radii


# ---------------------------------------------------------------------------------------------
# keywords and model identity


def keyword_tokens(tokenizer, keywords: Iterable[str], vocab_size: int) -> list[int]:
    """Token ids whose text, stripped and lower-cased, equals one of the keywords."""
    if tokenizer is None:
        raise InputError("keyword lists need the model's tokenizer; give token id pairs instead")
    words = {k.strip().lower() for k in keywords if k.strip() and not k.lstrip().startswith("#")}
    if not words:
        raise InputError("the keyword list is empty")
    out = []
    for i in range(vocab_size):
        text = tokenizer.decode([i])
        if text.strip().lower() in words:
            out.append(i)
    return out


def load_keywords(path) -> list[str]:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise InputError(f"keyword file {str(p)!r} does not exist" if not p.exists() else f"{str(p)!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"keyword file {str(p)!r} is not UTF-8 text; give one keyword a line") from None
    words = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not words:
        raise InputError(f"keyword file {str(p)!r} holds no keywords; give one keyword a line ('#' starts a comment)")
    return words


def default_keywords_file():
    from pathlib import Path

    return Path(__file__).parent / "data" / "neutral_keywords.txt"


def mass_index(gm: fx.GraphModule, path: str = ENCODER_PATH, *, pairs=None, keywords=None,
               drop_self: bool = True) -> dict:
    """Cumulative conditional probability mass M = Σ_{(v,u) ∈ S} P(u|v) over a pair set S.

    S is `pairs` (token id pairs) or, from `keywords`, K×K for the keyword tokens K (self pairs
    dropped unless drop_self=False). Returns the mass, its mean per source token and |S|.
    """
    info = info_of(gm)
    if pairs is None:
        if keywords is None:
            raise InputError("give pairs= (token id pairs) or keywords= (a list of words)")
        toks = keyword_tokens(info.tokenizer, keywords, info.embedding_size or info.vocab_size)
        if not toks:
            raise InputError("none of the keywords is a single token of this vocabulary")
        pairs = [(v, u) for v in toks for u in toks if not (drop_self and u == v)]
    pairs = torch.as_tensor(pairs, dtype=torch.long)
    if pairs.numel() == 0:
        raise InputError("the pair set is empty")
    lp = pair_scores(gm, path, pairs)[:, 1].double()
    mass = float(lp.exp().sum())
    sources = int(torch.unique(pairs[:, 0]).numel())
    return {"path": parse_path(gm, path).name, "mass": mass, "mean_per_source": mass / sources,
            "pairs": int(pairs.shape[0]), "sources": sources}


def weights_hash(gm: fx.GraphModule, max_tensors: int = 8) -> str:
    """A short SHA-256 of the model's identity: names, shapes and a sample of values of the first
    and last few tensors (cheap, and distinguishes checkpoints)."""
    items = sorted(list(gm.state_dict().items()) + [
        (n, t) for n, t in gm.named_buffers() if n not in gm.state_dict()])
    if not items:
        items = [(n, getattr(gm, n)) for n in dir(gm) if isinstance(getattr(gm, n, None), torch.Tensor)]
    picked = items[: max_tensors // 2] + items[-(max_tensors // 2):] if len(items) > max_tensors else items
    h = hashlib.sha256()
    for name, t in picked:
        t = t.detach().flatten()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        sample = t[:: max(1, t.numel() // 4096)][:4096].to("cpu", torch.float64)
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def vocab_hash(gm: fx.GraphModule) -> str:
    info = info_of(gm)
    h = hashlib.sha256(str(info.vocab_size).encode())
    tok = info.tokenizer
    if tok is not None:
        for i in range(info.vocab_size):
            try:
                h.update(tok.convert_ids_to_tokens(i).encode("utf-8", "replace"))
            except Exception:  # noqa: BLE001 - ids past the tokenizer's vocabulary
                h.update(b"\0")
    return h.hexdigest()[:16]


def token_texts(gm: fx.GraphModule) -> list[str]:
    info = info_of(gm)
    tok = info.tokenizer
    if tok is None:
        return [f"<{i}>" for i in range(info.vocab_size)]
    out = []
    for i in range(info.vocab_size):
        try:
            out.append(tok.decode([i]))
        except Exception:  # noqa: BLE001
            out.append(f"<{i}>")
    return out
