"""Jet n-gram paths and their full-vocabulary evaluation: paths, evaluators, kernels, tables.

The user-facing module is `jetfx.ngrams` (its docstring has the paths' definitions); this one holds
what the tables are computed with — `NgramPath`/`parse_path`, `PathEvaluator` (the k = 0 path
lowered through the model's own regions, the decoder split so that the d→V unembedding runs chunk
by chunk), `BigramKernel`/`TrigramKernel` (one chunk of contexts), `RunningTopK` and `NgramTable`
— below `jetfx.ngram_job`, which runs kernels over chunks and ranks, and `jetfx.ngram_db`, which
stores them. Its public names are importable from `jetfx.ngrams` too.
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
        heads = num_heads(gm, b.name)
        if int(m["head"]) >= heads:
            raise InputError(f"no head {int(m['head'])} in {b.name}: it has {heads} heads (h0 … h{heads - 1})")
        return NgramPath(f"{b.name}:h{int(m['head'])}", 3, b.name, int(m["head"]))
    try:
        b = structure.block(name)
    except ExpansionError as e:
        raise InputError(f"unknown n-gram path {name!r}: {e}; or use 'embed'") from None
    return NgramPath(b.name, 2, b.name)


def bigram_paths(gm: fx.GraphModule, kinds: Sequence[str] = ("mlp",)) -> list[str]:
    """'embed' and every block of the given kinds (default: the MLPs), in depth order."""
    return [ENCODER_PATH] + [b.name for b in residual_of(gm).blocks if b.kind in kinds]


def num_heads(gm: fx.GraphModule, block: str) -> int:
    """The head count of an attention block, read from its graph (`jetfx.passes.heads`)."""
    from .passes.heads import analyze

    try:
        return analyze(gm, block).num_heads
    except ExpansionError as e:
        raise InputError(f"{block}: {e}") from None


def head_paths(gm: fx.GraphModule, heads: Sequence[int] | None = None) -> list[str]:
    """The trigram paths '<attention block>:h<k>' of every attention block, for every head k (or
    the heads in `heads`, which every attention block must have), in depth order."""
    out = []
    for b in residual_of(gm).blocks:
        if b.kind != "attn":
            continue
        count = num_heads(gm, b.name)
        wanted = range(count) if heads is None else heads
        for h in wanted:
            if not isinstance(h, int) or isinstance(h, bool) or not 0 <= h < count:
                raise InputError(f"no head {h!r} in {b.name}: it has {count} heads (0 … {count - 1})")
        out += [f"{b.name}:h{h}" for h in wanted]
    return out


def path_terms(gm: fx.GraphModule, path: str | NgramPath):
    """The bigram path as Algorithm-1 terms at the decoder (a `JetExpansion`; `.compile()` runs it).

    Trigram (per-head) paths have no block of their own in the residual structure; their terms are
    evaluated through `jetfx.passes.heads.head_branch` (see docs/ngrams.md).
    """
    from .step_expansion import jet_expand, stream

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

    def copy(self) -> RunningTopK:
        out = RunningTopK.__new__(RunningTopK)
        out.k, out.scores, out.rows, out.extra = self.k, self.scores, self.rows, self.extra  # add() replaces them
        return out

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


@dataclass
class ChunkRows:
    """What one chunk of a table yields: the candidates for the global top-K (ids (N, n), scores
    (N, 2): logit, logprob, float64), the per-context top-n (ids (M, 3): context, rank, target;
    scores (M, 2)), and how many contexts it covered and evaluated exactly."""

    ids: torch.Tensor
    scores: torch.Tensor
    ctx_ids: torch.Tensor
    ctx_scores: torch.Tensor
    contexts: int = 0
    evaluated: int = 0


class BigramKernel:
    """One chunk of a bigram table: the path's logits for a block of source tokens, their log
    normalizers, the candidates for the global top-K and the per-source top-n."""

    def __init__(self, gm: fx.GraphModule, path: str | NgramPath = ENCODER_PATH, *, top_k: int = 1000,
                 per_context: int = 0, score: str = "logprob", drop_self: bool = False):
        self.ev = ev = PathEvaluator(gm, path)
        if ev.path.n != 2:
            raise InputError(f"{ev.path.name} is a trigram path: use trigram_table")
        self.top_k, self.per_context, self.score, self.drop_self = top_k, per_context, score, drop_self
        self.buf = None
        self.scratch = torch.empty(_scratch_rows(ev.device, ev.vocab), ev.vocab, device=ev.device)

    @torch.no_grad()
    def __call__(self, chunk: torch.Tensor, running: RunningTopK | None) -> ChunkRows:
        """Candidates are the pairs that reach the K-th best score in `running` (every pair that can
        still enter the top-K); `running` itself is not changed."""
        ev, V, device = self.ev, self.ev.vocab, self.ev.device
        score, top_k, per_context, drop_self = self.score, self.top_k, self.per_context, self.drop_self
        hidden = ev.hidden(chunk.view(-1, 1))
        if ev.decoder.W is not None:
            if self.buf is None or self.buf.shape[0] < hidden.shape[0]:
                self.buf = torch.empty(hidden.shape[0], V, device=device, dtype=hidden.dtype)
            z = ev.decoder.logits(hidden, out=self.buf[:hidden.shape[0]])
        else:
            z = hidden
        rows_src = chunk.to(device)
        # P(u|v) is normalized over every u: log P = (z − m) − δ, δ in float64
        m, delta = _row_log_normalizer(z, self.scratch)
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
        pairs = torch.empty(0, 2, dtype=torch.long, device=device)
        extra = torch.empty(0, 2, dtype=torch.float64, device=device)
        ctx_ids = torch.empty(0, 3, dtype=torch.long, device=device)
        ctx_scores = torch.empty(0, 2, dtype=torch.float64, device=device)
        if top_k:
            theta = exact = running.threshold if running is not None else -math.inf
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
            if exact > -math.inf:  # the margin let in entries that cannot enter the top-K (ties can)
                keep = vals >= exact
                r, u, logit, logprob = r[keep], u[keep], logit[keep], logprob[keep]
            pairs = torch.stack([rows_src[r], u], 1)
            extra = torch.stack([logit, logprob], 1)
        if per_context:
            n = min(per_context, V)
            vals, u = torch.topk(z, n, dim=1)
            lp = (vals.double() - m.double()[:, None]) - delta[:, None]
            ranks = torch.arange(1, n + 1, device=device).expand(len(rows_src), n)
            ctx_ids = torch.stack([rows_src[:, None].expand(-1, n), ranks, u], 2).reshape(-1, 3)
            ctx_scores = torch.stack([vals.double(), lp], 2).reshape(-1, 2)
        if drop_self:
            z[pos, self_idx] = saved
        return ChunkRows(pairs, extra, ctx_ids, ctx_scores, contexts=len(chunk), evaluated=len(chunk))


def _check_table_args(score: str, top_k, per_context, chunk_size) -> None:
    if score not in SCORES:
        raise InputError(f"score must be one of {SCORES}, got {score!r}")
    if not isinstance(top_k, int) or top_k < 0 or not isinstance(per_context, int) or per_context < 0:
        raise InputError("top_k and per_context must be non-negative integers")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _progress(total: int, enabled: bool, desc: str, initial: int = 0, unit: str = "chunk"):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s, refresh=True):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit != "chunk")


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


class TrigramKernel:
    """One chunk of a trigram table: a block of contexts (first × second), their path vectors, and
    the n-grams that can enter the top-K — exhaustively, or by the pruned search (docs/ngrams.md)."""

    def __init__(self, gm: fx.GraphModule, path: str | NgramPath, *, top_k: int = 100, score: str = "logit",
                 prune: bool = True, batch: int = 4096, groups: int | None = None, num_heads: int | None = None,
                 balls: tuple | None = None):
        if score not in SCORES:
            raise InputError(f"score must be one of {SCORES}, got {score!r}")
        if prune and score != "logit":
            raise InputError("the pruned trigram search bounds logits only; use score='logit' or prune=False")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise InputError(f"a trigram table needs top_k ≥ 1, got {top_k!r}")
        self.ev = ev = PathEvaluator(gm, path, num_heads=num_heads)
        if ev.path.n != 3:
            raise InputError(f"{ev.path.name} is not a trigram path; use '<attention block>:h<head>'")
        if prune and ev.decoder.W is None:
            raise InputError("pruning needs a decoder ending in a linear unembedding; use prune=False")
        self.top_k, self.score, self.prune, self.batch = top_k, score, prune, max(1, int(batch))
        if prune:  # `balls`: (centers, radii) made before for the same U
            self.centers, self.radii = balls if balls is not None else _balls(ev.decoder.W.float(), groups)

    @torch.no_grad()
    def __call__(self, chunk: tuple[torch.Tensor, torch.Tensor], running: RunningTopK | None) -> ChunkRows:
        """Candidates: the n-grams that reach the K-th best score known when they are found
        (`running`, then this chunk's own); `running` itself is not changed."""
        first, second = chunk
        ev, device = self.ev, self.ev.device
        local = running.copy() if running is not None else RunningTopK(self.top_k, 3, device)
        ctx = torch.stack([first.repeat_interleave(second.numel()), second.repeat(first.numel())], 1)
        ids, scores, evaluated = [], [], 0
        for i in range(0, ctx.shape[0], self.batch):
            sub = ctx[i:i + self.batch].to(device)
            hid = ev.hidden(sub).float()
            if self.prune:
                bound = (hid @ self.centers.t() + hid.norm(dim=1, keepdim=True) * self.radii[None]).amax(1)
                order = torch.argsort(bound, descending=True)
                for j in range(0, order.numel(), 256):
                    idx = order[j:j + 256]
                    idx = idx[bound[idx] >= local.threshold]  # a bound below the K-th best: nothing to find
                    if idx.numel() == 0:
                        break
                    found = _score_contexts(ev, hid[idx], sub[idx], local, self.score)
                    ids.append(found[0]), scores.append(found[1])
                    evaluated += idx.numel()
            else:
                found = _score_contexts(ev, hid, sub, local, self.score)
                ids.append(found[0]), scores.append(found[1])
                evaluated += sub.shape[0]
        empty = torch.empty(0, 3, dtype=torch.long, device=device)
        return ChunkRows(torch.cat(ids) if ids else empty,
                         torch.cat(scores) if scores else torch.empty(0, 2, dtype=torch.float64, device=device),
                         empty, torch.empty(0, 2, dtype=torch.float64, device=device),
                         contexts=ctx.shape[0], evaluated=evaluated)


def _score_contexts(ev, hid, ctx, running, score):
    """Scores the contexts' rows exactly; returns the n-grams that reach `running`'s K-th best
    (ids (N, 3), (logit, logprob) (N, 2)) and adds them to it."""
    z = ev.decoder.logits(hid.to(ev.decoder.W.dtype) if ev.decoder.W is not None else hid).float()
    m, delta = _log_normalizer(z)
    b = delta.float() if score == "logprob" else torch.zeros_like(m)
    s = z if score == "logit" else (z - m[:, None]) - b[:, None]  # float32: picks candidates (bigram_table)
    k = min(running.k, s.numel())
    exact = running.threshold
    theta = max(float(torch.topk(s.flatten(), k).values[-1]), exact)
    r, u = torch.nonzero(s >= _lowered(theta, b)[:, None], as_tuple=True)
    logit = z[r, u].double()
    logprob = (logit - m[r].double()) - delta[r]
    vals = logprob if score == "logprob" else logit
    keep = vals >= exact
    rows = torch.cat([ctx[r[keep]], u[keep, None]], 1)
    extra = torch.stack([logit[keep], logprob[keep]], 1)
    running.add(vals[keep], rows, extra)
    return rows, extra


@torch.no_grad()
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
