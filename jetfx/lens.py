"""Jet lenses (paper §4.1): what the residual stream "says" at each layer, read through the decoder.

The decoder is υ = U ∘ γ_{L+1} (final norm, then unembedding). For stream nodes h_0 … h_L:

- logit lens at i:            U γ_{L+1}(h_i)                   (= `iterative_lens(..., k=0)`)
- iterative jet lens at i:    U · J^k γ_{L+1}(h_i)(h_L)         (the true final stream is the variate;
                                                                at i = L it equals the logits, any k)
- joint jet lens:             Σ_i w_i · U · J^k γ_{L+1}(x_i)(h_L), with centers x_i that sum to h_L:
                              the encoder output η and every block output γ_b(h) (granularity
                              "branch"), or η and the per-layer increments (granularity "layer");
                              or, over chosen rows (`layers=[0, 10, 20, 30]`), what the stream gained
                              since the previous chosen row (the first: η and everything before it).
                              Weights on the simplex, uniform or optimized per token to minimize
                              ‖γ_{L+1}(h_L) − Σ w_i J^k γ_{L+1}(x_i)(h_L)‖² in the metric UᵀU (Remark 3).

Because U is linear, J^k(U∘γ) = U∘J^k γ: jets are taken of the final norm alone, in the stream's
width d, and U is applied last (only to build the returned logits). The weight optimization works
with d-space vectors and the Gram matrix G = UᵀU (d × d), so nothing vocabulary-sized is formed for
its loss. When the decoder has no linear unembedding that could be split off, jets of the whole
decoder are taken and the loss is the plain Euclidean one in logit space (with a warning).

    lens = jetfx.lens.iterative_lens(gm, "The cat sat", k=1)
    lens.top(3); lens.cosine; lens.html(); lens.save("out/")
    joint = jetfx.lens.joint_lens(gm, "The cat sat", k=1, weights="optimized")
    joint.weights; joint.loss_curve; joint.uniform_loss, joint.optimized_loss
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from .constraints import check_weights
from .errors import ExpansionError, InputError, check_order
from .files import write_atomic
from .tracing import as_tokens, info_of, residual_of

GRANULARITIES = ("layer", "branch")
WEIGHTINGS = ("uniform", "optimized")
PAPER_SENTENCE = "new simple neural architecture, the Transformer"


# ---------------------------------------------------------------------------------------------
# the decoder, split into norm and unembedding


@dataclass(frozen=True)
class _Decoder:
    """γ_{L+1} as a region module in d-space and U as a function (or the whole decoder)."""

    region: Any  # passes.regions.Region: f(x, *side)
    weight: torch.Tensor | None  # U as (V, d) (None: no split, jets of the whole υ)
    has_norm: bool
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # the traced module's (`cache_of`)

    @property
    def split(self) -> bool:
        return self.weight is not None

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """U·x in U's dtype (a bfloat16 model's logits are bfloat16: no float32 copy of U is made)."""
        if self.weight is None:
            return x
        with torch.no_grad():  # lens logits are data: no autograd graph keeps U's inputs alive
            return x.to(self.weight.dtype) @ self.weight.t()

    def gram(self, dtype=torch.float64) -> torch.Tensor | None:
        """G = UᵀU (d × d), the metric of logit space pulled back to the stream (blocked: no float64
        copy of U), kept on the traced module until U changes (4 TFLOP in float64 at V = 128256,
        d = 4096)."""
        from .functions import gram

        if self.weight is None:
            return None
        version = self.weight._version  # shared with the parameter: bumped by in-place updates
        kept = self.cache.get(("gram", dtype))
        if kept is None or kept[0] != version:
            kept = self.cache[("gram", dtype)] = (version, gram(self.weight, dtype))
        return kept[1]


def _decoder(gm: fx.GraphModule) -> _Decoder:
    from .functions import cache_of, decoder_region, split_decoder

    has_norm = residual_of(gm).decoder.has_norm
    split = split_decoder(gm)
    if split is None:
        return _Decoder(decoder_region(gm), None, has_norm)
    return _Decoder(split.norm, split.unembedding, has_norm, cache_of(gm))


# ---------------------------------------------------------------------------------------------
# rows: stream nodes and centers


def _layer_of(name: str) -> str:
    """"h.3.attn" → "h.3", "layers.3.mlp" → "layers.3": blocks of one transformer layer."""
    m = re.match(r"^(.*?\d+)(?:\.[^.]+)?$", name)
    return m.group(1) if m else name


def _layers(structure) -> list[list]:
    """Blocks grouped by transformer layer (consecutive steps whose blocks share a layer prefix)."""
    groups: list[list] = []
    prev = None
    for step in structure.steps:
        key = _layer_of(step.blocks[0].name) if step.blocks else str(step.index)
        if groups and key == prev:
            groups[-1].append(step)
        else:
            groups.append([step])
        prev = key
    return groups


def _check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ExpansionError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}: 'layer' "
                             "groups each transformer layer's blocks (attention + MLP), 'branch' keeps every block")
    return granularity


def stream_rows(gm: fx.GraphModule, granularity: str = "layer") -> list[tuple[int, str]]:
    """(stream index i, label) of the rows of an iterative lens: layer boundaries or every h_i."""
    return _stream_rows(residual_of(gm), granularity)


def _stream_rows(structure, granularity: str) -> list[tuple[int, str]]:
    _check_granularity(granularity)
    L = len(structure.steps)
    if granularity == "branch":
        rows = [(0, "embed")]
        rows += [(s.index + 1, " + ".join(b.name for b in s.blocks)) for s in structure.steps]
        return rows
    rows = [(0, "embed")]
    for group in _layers(structure):
        last = group[-1]
        rows.append((last.index + 1, _layer_of(last.blocks[0].name) if last.blocks else f"step {last.index}"))
    assert rows[-1][0] == L
    return rows


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class LensResult:
    """A lens over a batch of token sequences; R rows (layers/blocks), B sequences, T positions.

    `row_logits` (R, B, T, V): per row, U·J^k γ_{L+1}(x_r)(h_L) (joint: unweighted terms).
    `logits`: the lens's logits to compare with the model — (R, B, T, V) for the iterative lens
    (each row is a lens), (B, T, V) for the joint lens (Σ_r w_r · row_logits[r]).
    `cosine`, `agreement`: faithfulness (cosine similarity, top-1 agreement with `model_logits`),
    shaped like `logits` without V. `weights` (R, B, T): the jet weights (1 for iterative rows).
    Every tensor is on the model's device; `top`, `to_dict` and the pictures move only what they show.
    """

    kind: str  # "iterative" or "joint"
    k: int
    granularity: str
    rows: list[str]
    tokens: torch.Tensor
    row_logits: torch.Tensor
    logits: torch.Tensor
    model_logits: torch.Tensor
    weights: torch.Tensor
    cosine: torch.Tensor
    agreement: torch.Tensor
    weighting: str = "uniform"
    loss_curve: list[float] = field(default_factory=list)
    uniform_loss: float | None = None
    optimized_loss: float | None = None
    tokenizer: Any = field(default=None, repr=False)
    model_name: str = ""

    # -- tokens --------------------------------------------------------------------------------
    def token_text(self, ids) -> list[str]:
        ids = [int(i) for i in (ids.flatten().tolist() if isinstance(ids, torch.Tensor) else ids)]
        if self.tokenizer is None:
            return [f"#{i}" for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]

    def positions(self, batch: int = 0) -> list[str]:
        return self.token_text(self.tokens[batch])

    # -- summaries -----------------------------------------------------------------------------
    def top(self, n: int = 5, batch: int = 0) -> list[list[list[tuple[str, int, float]]]]:
        """[row][position] → n × (token string, id, logit), from `row_logits` (top-k on the device;
        only the R × T × n winners are moved)."""
        vals, ids = self.row_logits[:, batch].topk(n, dim=-1)
        vals, ids = vals.float().tolist(), ids.tolist()
        out = []
        for r in range(len(vals)):
            row = []
            for t in range(len(vals[r])):
                texts = self.token_text(ids[r][t])
                row.append([(s, int(i), float(v)) for s, i, v in zip(texts, ids[r][t], vals[r][t])])
            out.append(row)
        return out

    @property
    def mean_cosine(self) -> float:
        """Faithfulness in one number: the joint lens's, or the iterative lens's averaged over rows."""
        return float(self.cosine.mean())

    @property
    def mean_agreement(self) -> float:
        return float(self.agreement.float().mean())

    def to_dict(self, n: int = 5, batch: int = 0) -> dict:
        top = self.top(n, batch)
        model_top = self.model_logits[batch].argmax(-1)
        lens_top = self.logits[batch].argmax(-1) if self.kind == "joint" else self.logits[-1, batch].argmax(-1)
        weights = self.weights[:, batch].float().tolist()  # one transfer, not one per cell
        d = {
            "kind": self.kind, "k": self.k, "granularity": self.granularity, "weighting": self.weighting,
            "model": self.model_name,
            "tokens": self.tokens[batch].tolist(), "positions": self.positions(batch), "rows": list(self.rows),
            "cells": [[{"top": [{"token": s, "id": i, "logit": v} for s, i, v in top[r][t]],
                        "weight": weights[r][t]}
                       for t in range(len(top[r]))] for r in range(len(top))],
            "model_top": self.token_text(model_top), "lens_top": self.token_text(lens_top),
            "cosine": self.cosine[..., batch, :].tolist(), "agreement": self.agreement[..., batch, :].int().tolist(),
            "mean_cosine": self.mean_cosine, "mean_agreement": self.mean_agreement,
        }
        if self.kind == "joint":
            d.update(loss_curve=self.loss_curve, uniform_loss=self.uniform_loss, optimized_loss=self.optimized_loss)
        return d

    def html(self, batch: int = 0, title: str | None = None, rows=None) -> str:
        """The Figure-3 table as a page. `rows`: which rows to show — labels or indices, or an int n
        for the n rows with the largest mean jet weight (joint lens; the paper's Figure 3 shows 7)."""
        from .lens_view import lens_html

        return lens_html(self, batch=batch, title=title, rows=rows)

    def svg(self, batch: int = 0, title: str | None = None, rows=None) -> str:
        from .lens_view import lens_svg

        return lens_svg(self, batch=batch, title=title, rows=rows)

    def row_indices(self, rows=None, batch: int = 0) -> list[int]:
        """Indices of `rows` (see `html`), in the lens's order; all rows for None."""
        if rows is None:
            return list(range(len(self.rows)))
        if isinstance(rows, int) and not isinstance(rows, bool):
            if self.kind != "joint":
                raise InputError("rows=n picks the n rows with the largest jet weights: a joint lens's; for an "
                                 "iterative lens give the rows (labels or indices), or layers= when computing it")
            if rows < 1:
                raise InputError(f"rows={rows}: give a positive number of rows")
            mean = self.weights[:, batch].double().mean(-1)
            return sorted(mean.argsort(descending=True)[:rows].tolist())
        picked = []
        for r in rows:
            if isinstance(r, str):
                if r not in self.rows:
                    raise InputError(f"no row {r!r} in this lens; its rows are {', '.join(self.rows[:6])}…")
                picked.append(self.rows.index(r))
            elif isinstance(r, int) and not isinstance(r, bool) and -len(self.rows) <= r < len(self.rows):
                picked.append(r % len(self.rows))
            else:
                raise InputError(f"row {r!r} is neither a row label nor an index below {len(self.rows)}")
        if not picked:
            raise InputError("rows= selects no row")
        return sorted(set(picked))

    def save(self, folder, stem: str | None = None, batch: int = 0, n: int = 5) -> dict[str, Path]:
        """Write `<stem>.html`, `<stem>.svg` and `<stem>.json` to `folder`; returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = stem or f"{self.kind}_lens_k{self.k}" + (f"_{self.weighting}" if self.kind == "joint" else "")
        paths = {"html": folder / f"{stem}.html", "svg": folder / f"{stem}.svg", "json": folder / f"{stem}.json"}
        write_atomic(paths["html"], self.html(batch))  # whole files or none, even if interrupted
        write_atomic(paths["svg"], self.svg(batch))
        write_atomic(paths["json"], json.dumps(self.to_dict(n, batch), indent=1))
        return paths


# ---------------------------------------------------------------------------------------------
# shared machinery


def _tokens(gm: fx.GraphModule, tokens) -> torch.Tensor:
    info = info_of(gm)
    if isinstance(tokens, str) and not tokens.strip():
        raise InputError("the text is empty: give at least one word to read through the lens")
    ids = as_tokens(tokens, info.tokenizer, vocab_size=info.embedding_size or info.vocab_size,
                    max_length=info.max_length)
    from .functions import device_of

    return ids.to(device_of(gm))


@torch.no_grad()
def _faithfulness(lens: torch.Tensor, model: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity and top-1 agreement of lens logits (…, B, T, V) with the model's (B, T, V),
    on their device. Sums in float32 (float64 for a float64 model), in blocks of rows and positions
    of at most 2^26 values: a few passes over the logits, no copy of them in another dtype."""
    V = model.shape[-1]
    lead = lens.shape[:-model.dim()]
    dtype = torch.promote_types(lens.dtype, torch.float32)
    rows = lens.reshape(-1, model[..., 0].numel(), V)  # (rows, positions, V)
    ref = model.reshape(-1, V)
    cos = torch.empty(rows.shape[:2], dtype=dtype, device=lens.device)
    step = max(1, min(ref.shape[0], (1 << 26) // V))
    per = max(1, (1 << 26) // (step * V))  # rows per block
    eps = 1e-8  # torch.nn.functional.cosine_similarity's
    for j in range(0, ref.shape[0], step):
        b = ref[j:j + step].to(dtype)
        nb = torch.linalg.vector_norm(b, dim=-1).clamp_min(eps)
        for r in range(0, rows.shape[0], per):
            a = rows[r:r + per, j:j + step].to(dtype)
            dot = (a * b).sum(-1)
            cos[r:r + per, j:j + step] = dot / (torch.linalg.vector_norm(a, dim=-1).clamp_min(eps) * nb)
    agree = lens.argmax(-1) == model.argmax(-1)
    return cos.float().reshape(*lead, *model.shape[:-1]), agree


def _check_norm(dec: _Decoder, k: int) -> None:
    if not dec.has_norm and k >= 1:
        raise ExpansionError(
            "the decoder has no normalization (υ = U is linear): every jet of order k ≥ 1 equals the "
            "model's logits at every layer, so the jet lens reduces to the logit lens (k = 0); use k=0")


def _jets(dec: _Decoder, centers: torch.Tensor, variate: torch.Tensor, side, k: int, method: str,
          dtype: torch.dtype) -> torch.Tensor:
    """J^k γ(center_i)(variate) for centers (N, B, T, d): (N, B, T, d) (or logits if not split),
    computed in `dtype` (the jet dtype: float32 for a half-precision model)."""
    from .functions import compute_region
    from .jets import jet_module

    region = compute_region(dec.region, dtype)
    # Taylor mode (the default) handles ops without a rule itself, by nested AD for those ops
    with torch.no_grad():
        out = jet_module(region.module, k, method=method)(centers.to(dtype), variate.to(dtype), *side)
    return out.detach()


def _capture(gm: fx.GraphModule, ids: torch.Tensor, names) -> tuple[dict, torch.Tensor]:
    from .functions import capture, logits_node

    names = tuple(names) + (logits_node(gm),)
    with torch.no_grad():
        values = capture(gm, ids, names)
    return values, values[names[-1]]


def stream_rows_from(structure, granularity: str, layers=None):
    """Selected rows of `stream_rows`, with range checks on `layers` (row indices, negatives count back)."""
    rows = _stream_rows(structure, granularity)
    if layers is None:
        return rows
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    picked = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not -len(rows) <= i < len(rows):
            raise ExpansionError(f"layer index {i!r} is out of range: with granularity={granularity!r} this model "
                                 f"has lens rows 0…{len(rows) - 1} (0 is the embedding, {len(rows) - 1} the last layer)")
        picked.append(rows[i % len(rows)])
    if not picked:
        raise ExpansionError("no layers selected: give at least one layer index")
    return picked


# ---------------------------------------------------------------------------------------------
# iterative lens


def iterative_lens(gm: fx.GraphModule, tokens, k: int = 1, *, layers=None, granularity: str = "layer",
                   method: str = "auto") -> LensResult:
    """Iterative jet lens: row i is U · J^k γ_{L+1}(h_i)(h_L); k = 0 is the logit lens.

    `layers`: row indices (default all rows) — with granularity "layer" row l is the stream after
    l transformer layers (row 0 the embedding; the rows match Hugging Face's `hidden_states`),
    with "branch" row i is the stream node h_i after i blocks.
    """
    k = check_order(k)
    structure = residual_of(gm)
    _check_granularity(granularity)
    rows = stream_rows_from(structure, granularity, layers)
    dec = _decoder(gm)
    _check_norm(dec, k)
    ids = _tokens(gm, tokens)
    stream = structure.stream
    names = [stream[i] for i, _ in rows] + [stream[-1]] + list(dec.region.side_inputs)
    values, model_logits = _capture(gm, ids, names)
    centers = torch.stack([values[stream[i]] for i, _ in rows])
    h_last = values[stream[-1]]
    side = [values[s] for s in dec.region.side_inputs]
    from .functions import jet_dtype

    jets = _jets(dec, centers, h_last, side, k, method, jet_dtype(gm))
    row_logits = dec.unembed(jets) if dec.split else jets
    row_logits = row_logits.to(model_logits.dtype)
    cos, agree = _faithfulness(row_logits, model_logits)
    info = info_of(gm)
    # every tensor stays on the model's device: summaries and pictures move only what they show
    return LensResult(
        kind="iterative", k=k, granularity=granularity, rows=[label for _, label in rows], tokens=ids,
        row_logits=row_logits, logits=row_logits, model_logits=model_logits,
        weights=torch.ones(row_logits.shape[:3], device=row_logits.device), cosine=cos, agreement=agree,
        tokenizer=info.tokenizer, model_name=info.model_name)


def logit_lens(gm: fx.GraphModule, tokens, *, layers=None, granularity: str = "layer") -> LensResult:
    """The logit lens U γ_{L+1}(h_i): the iterative jet lens of order 0."""
    return iterative_lens(gm, tokens, 0, layers=layers, granularity=granularity)


# ---------------------------------------------------------------------------------------------
# joint lens


def joint_centers(gm: fx.GraphModule, granularity: str = "layer", layers=None) -> list[tuple[str, list[str]]]:
    """(label, node names summed) of the joint lens's centers: η, then blocks or layers.

    `layers` (row indices as in `stream_rows`, 0 = the embedding, negatives count back): one center
    per chosen row, what the stream gained since the previous chosen row (the first: η and all the
    blocks before it), and, when the last chosen row is not the last layer, one more center with
    the blocks after it, labelled "rest (first … last)": the centers always sum to h_L (Lemma 1).
    """
    structure = residual_of(gm)
    _check_granularity(granularity)
    if layers is None:
        out = [("embed", [structure.encoder.output])]
        if granularity == "branch":
            out += [(b.name, [b.output]) for b in structure.blocks]
        else:
            for group in _layers(structure):
                blocks = [b for s in group for b in s.blocks]
                out.append((_layer_of(blocks[0].name) if blocks else f"step {group[0].index}",
                            [b.output for b in blocks]))
        return out
    picked = stream_rows_from(structure, granularity, layers)
    indices = [i for i, _ in picked]
    if len(set(indices)) != len(indices):
        raise ExpansionError(f"layers={list(layers)} names a row twice: give each row once")
    picked = sorted(picked)
    out, start = [], 0
    for n, (stop, label) in enumerate(picked):
        names = ([structure.encoder.output] if n == 0 else []) + [b.output for s in structure.steps[start:stop]
                                                               for b in s.blocks]
        out.append((label, names))
        start = stop
    if start < len(structure.steps):
        rest = [b for s in structure.steps[start:] for b in s.blocks]
        out.append((f"rest ({rest[0].name} … {rest[-1].name})" if len(rest) > 1 else f"rest ({rest[0].name})",
                    [b.output for b in rest]))
    return out


def _softmax(x: torch.Tensor) -> torch.Tensor:
    # by hand: torch.softmax on tiny CPU tensors was measured at ~15 ms a call on a loaded 2-core box
    e = (x - x.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def optimize_weights(terms: torch.Tensor, target: torch.Tensor, gram: torch.Tensor | None = None, *,
                     steps: int = 200, lr: float = 0.1, seed: int = 0, init_noise: float = 0.0):
    """Per-token simplex weights minimizing ‖Σ_i w_i a_i − q‖²_G, softmax-parameterized, by Adam.

    `terms` (N, …, d), `target` (…, d), `gram` (d, d) or None (Euclidean). The quadratic form is
    reduced to per-token N × N matrices first, so each step costs O(N²) per token, not O(d) or O(V).
    Returns (weights (N, …), loss curve (mean relative loss per step, step 0 = uniform), uniform
    loss, optimized loss). Deterministic: initialized at uniform weights (plus `init_noise` ×
    Gaussian noise from `seed`), and the best iterate is kept. Runs on the device of `terms`, with
    one device → host transfer at the end (the loss curve), none per step.
    """
    device = terms.device
    a = terms.detach().double().movedim(0, -2)  # (…, N, d)
    q = target.detach().double().to(device).unsqueeze(-1)  # (…, d, 1)
    gram = None if gram is None else gram.to(device)
    aG = a if gram is None else a @ gram.double()
    A = aG @ a.transpose(-1, -2)  # (…, N, N)
    b = (aG @ q).squeeze(-1)  # (…, N)
    qG = q.transpose(-1, -2) if gram is None else q.transpose(-1, -2) @ gram.double()
    c = (qG @ q).squeeze(-1).squeeze(-1)  # (…)
    scale = c.clamp_min(1e-30)

    def matvec(w):  # A w, elementwise (tiny batched matmuls are slow on CPU)
        return (A * w.unsqueeze(-2)).sum(-1)

    def loss_of(w, Aw=None):  # relative squared error per token
        Aw = matvec(w) if Aw is None else Aw
        return (((w * Aw).sum(-1) - 2 * (b * w).sum(-1) + c) / scale).clamp_min(0)

    n = a.shape[-2]
    gen = torch.Generator().manual_seed(int(seed))
    theta = torch.zeros(b.shape, dtype=torch.float64, device=device)
    if init_noise:  # drawn on the CPU (the same numbers on every device), then moved
        theta += init_noise * torch.randn(b.shape, generator=gen, dtype=torch.float64).to(device)
    uniform = torch.full(b.shape, 1.0 / n, dtype=torch.float64, device=device)
    best_loss = loss_of(uniform)
    best_w = uniform.clone()
    curve = torch.empty(int(steps) + 1, dtype=torch.float64, device=device)  # mean loss per step, on the device
    curve[0] = best_loss.mean()
    # Adam on θ with the closed-form gradient: ∂loss/∂w = 2(Aw − b)/scale, through the softmax
    # ∂/∂θ = w ⊙ (g − ⟨w, g⟩); no autograd, a handful of small ops per step
    m1 = torch.zeros_like(theta)
    m2 = torch.zeros_like(theta)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    inv = (2.0 / scale).unsqueeze(-1)
    for step in range(1, int(steps) + 1):
        w = _softmax(theta)
        g = (matvec(w) - b) * inv
        g = w * (g - (w * g).sum(-1, keepdim=True))
        m1.mul_(beta1).add_(g, alpha=1 - beta1)
        m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        theta -= lr * (m1 / (1 - beta1**step)) / ((m2 / (1 - beta2**step)).sqrt() + eps)
        w = _softmax(theta)
        per = loss_of(w)
        better = per < best_loss
        best_loss = torch.where(better, per, best_loss)
        best_w = torch.where(better.unsqueeze(-1), w, best_w)
        curve[step] = per.mean()
    from .functions import host_floats

    curve = host_floats(torch.cat([curve, best_loss.mean().reshape(1)]))  # the one transfer
    return best_w.movedim(-1, 0).float(), curve[:-1], curve[0], curve[-1]


# the joint lens's relative squared error (1 = that of predicting 0) above which its jets diverge:
# on SmolLM2 ("The capital of France is") the optimized error is 17 at k = 1 (mean cosine 0.95 with
# the logits), 2.8e6 at k = 2 (cosine -0.46) and 6e25 at k = 5 — identical in float64, so the jets
# themselves are far from the output, not rounding
BAD_FIT = 1e3


def _warn_if_bad_fit(loss: float, k: int, dtype: torch.dtype) -> None:
    """The joint lens's weights are only meaningful if its centers' jets approximate the decoder's
    output; say so when even the best weights leave an error far larger than the output itself."""
    if loss <= BAD_FIT:  # False for NaN
        return
    if loss != loss or loss == float("inf"):
        fix = "use a lower order (k=1 or k=2)" + (
            "" if dtype == torch.float64 else ", or float64 (jetfx.load(..., dtype=torch.float64), --dtype float64)")
        warnings.warn(f"the joint jet lens at k={k} overflowed (its error is {loss}): its weights and rows mean "
                      f"nothing; {fix}", stacklevel=3)
        return
    warnings.warn(f"the joint jet lens at k={k} does not fit the decoder's output: the relative squared error of its "
                  f"best weights is {loss:.3g} (1 would be the error of predicting 0), so its weights and rows mean "
                  f"little. The order-{k} jets of the final norm, taken at the centers, are far from its output at "
                  f"h_L (a norm's Taylor polynomial is only close near its center); float64 does not change that. "
                  f"Use a lower order (k=1), or the iterative lens", stacklevel=3)


def joint_lens(gm: fx.GraphModule, tokens, k: int = 1, *, weights="uniform", granularity: str = "layer",
               layers=None, steps: int = 200, lr: float = 0.1, seed: int = 0, method: str = "auto") -> LensResult:
    """Joint jet lens: Σ_i w_i · U · J^k γ_{L+1}(x_i)(h_L), centers η and each block/layer output.

    `weights`: "uniform", "optimized" (per token, see `optimize_weights`; `steps`, `lr`, `seed`)
    or a sequence of one weight per center on the simplex (the same for every token). `layers`:
    a subset of rows (as in `iterative_lens`; e.g. [0, 10, 20, 30]), each row's center being what
    the stream gained since the previous chosen row (see `joint_centers`).
    """
    k = check_order(k)
    structure = residual_of(gm)
    centers_spec = joint_centers(gm, granularity, layers)
    dec = _decoder(gm)
    _check_norm(dec, k)
    n = len(centers_spec)
    fixed = None
    if isinstance(weights, str):
        if weights not in WEIGHTINGS:
            raise ExpansionError(f"weights must be 'uniform', 'optimized' or {n} numbers on the simplex, got {weights!r}")
    else:
        fixed = check_weights(weights, n)
    ids = _tokens(gm, tokens)
    names = [nm for _, nms in centers_spec for nm in nms] + [structure.decoder.input] + list(dec.region.side_inputs)
    values, model_logits = _capture(gm, ids, names)
    centers = torch.stack([sum(values[nm] for nm in nms) for _, nms in centers_spec])
    h_last = values[structure.decoder.input]
    side = [values[s] for s in dec.region.side_inputs]
    from .functions import jet_dtype

    dtype = jet_dtype(gm)
    jets = _jets(dec, centers, h_last, side, k, method, dtype)  # (N, B, T, d) or logits
    curve, u_loss, o_loss = [], None, None
    if fixed is not None:
        w = torch.tensor(fixed, dtype=jets.dtype, device=jets.device).view(n, 1, 1).expand(n, *jets.shape[1:3]).clone()
        weighting = "given"
    else:
        from .functions import compute_region

        with torch.no_grad():  # γ_{L+1}(h_L) (or the logits), in the jet dtype
            target = compute_region(dec.region, dtype).module(h_last.to(dtype), *side)
        if not dec.split and weights == "optimized":
            warnings.warn("the decoder's unembedding could not be split off: weights are optimized with the "
                          "Euclidean loss in logit space", stacklevel=2)
        w, curve, u_loss, o_loss = optimize_weights(jets, target, dec.gram(), steps=steps if weights == "optimized" else 0,
                                                    lr=lr, seed=seed)
        weighting = weights
        _warn_if_bad_fit(o_loss, k, jets.dtype)
    w = w.to(jets.dtype)
    row_logits = (dec.unembed(jets) if dec.split else jets).to(model_logits.dtype)
    combined = dec.unembed((w.unsqueeze(-1) * jets).sum(0)) if dec.split else (w.unsqueeze(-1) * jets).sum(0)
    combined = combined.to(model_logits.dtype)
    cos, agree = _faithfulness(combined, model_logits)
    info = info_of(gm)
    return LensResult(  # on the model's device, like the iterative lens
        kind="joint", k=k, granularity=granularity, rows=[label for label, _ in centers_spec], tokens=ids,
        row_logits=row_logits, logits=combined, model_logits=model_logits, weights=w,
        cosine=cos, agreement=agree, weighting=weighting, loss_curve=curve, uniform_loss=u_loss,
        optimized_loss=o_loss, tokenizer=info.tokenizer, model_name=info.model_name)


# ---------------------------------------------------------------------------------------------
# corpus mode


def sample_sentences() -> list[str]:
    """The plain English sentences shipped with jetfx (jetfx/data/sentences.txt)."""
    path = Path(__file__).with_name("data") / "sentences.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


@dataclass
class CorpusResult:
    """Mean faithfulness of the iterative lens per row, for several orders k, over sentences."""

    ks: list[int]
    rows: list[str]
    cosine: dict[int, list[float]]  # k → mean cosine similarity per row
    agreement: dict[int, list[float]]  # k → mean top-1 agreement per row
    sentences: list[str]
    model_name: str = ""

    def to_dict(self) -> dict:
        return {"ks": self.ks, "rows": self.rows, "cosine": {str(k): v for k, v in self.cosine.items()},
                "agreement": {str(k): v for k, v in self.agreement.items()}, "sentences": self.sentences,
                "model": self.model_name}

    def svg(self, title: str | None = None) -> str:
        from .lens_view import line_chart_svg

        return line_chart_svg(self.rows, {f"k={k}": self.cosine[k] for k in self.ks},
                              title=title or f"iterative jet lens: mean cosine similarity to the logits "
                                             f"({len(self.sentences)} sentences)",
                              y_label="cosine similarity")

    def save(self, folder, stem: str = "corpus_lens") -> dict[str, Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"svg": folder / f"{stem}.svg", "json": folder / f"{stem}.json"}
        write_atomic(paths["svg"], self.svg())
        write_atomic(paths["json"], json.dumps(self.to_dict(), indent=1))
        return paths


def corpus_faithfulness(gm: fx.GraphModule, sentences=None, ks=(0, 1, 2), *, granularity: str = "layer",
                        method: str = "auto") -> CorpusResult:
    """Average (over sentences and positions) cosine similarity and top-1 agreement of the
    iterative lens with the model's logits, per row and order k."""
    sentences = list(sample_sentences() if sentences is None else sentences)
    if not sentences:
        raise InputError("no sentences given for the corpus lens")
    ks = [check_order(k) for k in ks]
    cos = {k: None for k in ks}
    agr = {k: None for k in ks}
    rows = None
    count = 0
    for s in sentences:
        for k in ks:
            r = iterative_lens(gm, s, k, granularity=granularity, method=method)
            rows = r.rows
            c = r.cosine.double().sum(dim=(1, 2))
            a = r.agreement.double().sum(dim=(1, 2))
            cos[k] = c if cos[k] is None else cos[k] + c
            agr[k] = a if agr[k] is None else agr[k] + a
        count += r.cosine.shape[1] * r.cosine.shape[2]
    return CorpusResult(ks=ks, rows=rows, cosine={k: (cos[k] / count).tolist() for k in ks},
                        agreement={k: (agr[k] / count).tolist() for k in ks}, sentences=sentences,
                        model_name=info_of(gm).model_name)


__all__ = ["CorpusResult", "LensResult", "PAPER_SENTENCE", "corpus_faithfulness", "iterative_lens", "joint_centers",
           "joint_lens", "logit_lens", "optimize_weights", "sample_sentences", "stream_rows"]
