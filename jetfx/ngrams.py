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

The paths, evaluators and kernels are `jetfx.ngram_kernels`' (importable from here); tables are
computed chunk by chunk by `jetfx.ngram_job` (one process or several ranks) and stored by
`jetfx.ngram_db`.
"""

from __future__ import annotations

import torch
from torch import fx

from .ngram_job import Settings, Task, run_tasks
# the paths, evaluators and kernels, importable from here as before
from .ngram_kernels import (ENCODER_PATH, SCORES, BigramKernel, ChunkRows, NgramPath, NgramTable,  # noqa: F401
                            PathEvaluator, RunningTopK, TrigramKernel, _as_ids, _check_table_args, bigram_paths,
                            default_keywords_file, head_paths, keyword_tokens, load_keywords, mass_index, num_heads,
                            pair_scores, parse_path, path_terms, token_texts, vocab_hash, weights_hash)


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
    Several processes: `jetfx.ngram_job` (what `torchrun … -m jetfx ngrams` runs).
    """
    _check_table_args(score, top_k, per_context, chunk_size)
    kernel = BigramKernel(gm, path, top_k=top_k, per_context=per_context, score=score, drop_self=drop_self)
    ev = kernel.ev
    src = torch.arange(ev.sources) if sources is None else _as_ids(sources, ev.sources, "sources")
    settings = Settings(top_k=top_k, per_context=per_context, score=score, drop_self=drop_self, chunk_size=chunk_size)
    task = Task.of(ev.path, src, chunk_size, store=checkpoint, kernel=kernel)
    run_tasks(gm, [task], settings, progress=progress, max_chunks=max_chunks)
    return task.table



@torch.no_grad()
def trigram_table(gm: fx.GraphModule, path: str, *, first=None, second=None, top_k: int = 100,
                  score: str = "logit", prune: bool = True, batch: int = 4096, groups: int | None = None,
                  num_heads: int | None = None, progress: bool = False, chunk_size: int | None = None,
                  checkpoint=None, max_chunks: int | None = None) -> NgramTable:
    """Top-K trigrams (v1, v2 → u) of a head path over contexts first × second (default: all).

    prune=True: a branch-and-bound over context pairs (exact, same result as prune=False). The
    rows w_u of U are grouped (k-means) into G balls (center c_g, radius ρ_g); for the path vector
    n of a context, max_u w_u·n ≤ max_g (c_g·n + ρ_g‖n‖) (Cauchy–Schwarz). Contexts whose bound is
    below the K-th best logit found so far cannot enter the top-K and are skipped; the others
    are evaluated exactly, largest bound first. Only score="logit" can be pruned this way.

    Contexts are taken in blocks of about `chunk_size` (default `batch`; whole rows of `first`),
    evaluated `batch` at a time; `checkpoint` and `max_chunks` work as in `bigram_table`.
    """
    kernel = TrigramKernel(gm, path, top_k=top_k, score=score, prune=prune, batch=batch, groups=groups,
                           num_heads=num_heads)
    chunk_size = batch if chunk_size is None else chunk_size
    _check_table_args(score, top_k, 0, chunk_size)
    ev = kernel.ev
    a = torch.arange(ev.sources) if first is None else _as_ids(first, ev.sources, "first")
    b = torch.arange(ev.sources) if second is None else _as_ids(second, ev.sources, "second")
    settings = Settings(top_k=top_k, trigram_score=score, chunk_size=chunk_size, prune=prune, batch=batch)
    task = Task.of(ev.path, a, chunk_size, b, store=checkpoint, kernel=kernel)
    stats = run_tasks(gm, [task], settings, progress=progress, max_chunks=max_chunks)
    task.table.stats = {"contexts": stats.contexts, "evaluated": stats.evaluated}
    return task.table
