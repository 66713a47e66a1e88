"""Which blocks interact: every degree-1 cross term w_i·Dγ_l(x_i)[x_j] of one input, measured.

For block l the centers are the model's own parts of its input, x_0 = η and x_m = γ_m(h) for the
blocks m before l (they sum to l's input exactly), with uniform weights w = 1/N_l. The k = 1 jet
of γ_l at x_i splits into w_i·γ_l(x_i) and the cross terms w_i·Dγ_l(x_i)[x_j], j ≠ i: how block l,
evaluated at the part x_i of its input, responds to the part x_j. Each cross term is a stream
vector added to the residual; it is measured at one position by

    size    ‖U·Dῡ(h_L)·t‖ — its norm in the metric UᵀU after the final norm's linearization
            (Dῡ: the decoder up to U, at the true final stream), i.e. ‖first-order effect on the
            logits‖, computed in d-space with the (d, d) matrix Dῡᵀ UᵀU Dῡ;
    effect  [U·Dῡ(h_L)·t]_u* on the model's top token u* at that position (signed).

`interactions(gm, text)` computes all of them (one batched jvp per block and center: the primal of
block l at x_i is shared by its N_l − 1 directions), shows progress, and keeps what is finished if
interrupted; with `checkpoint=FILE` every finished block is appended to FILE and a later call with
the same model, input and blocks resumes from it. `InteractionMap` holds the data (records, CSV,
JSON) and draws the heatmaps (SVG); `save` writes each file atomically.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import fx

from . import paths as P
from .errors import ExpansionError, InputError
from .files import write_atomic
from .functions import block_region, capture, device_of, logits_node, split_decoder
from .tracing import as_tokens, info_of, residual_of

CHUNK = 64  # directions per vmap call
CHECKPOINT = "interactions.partial.jsonl"  # the CLI's checkpoint file, in its output folder


@dataclass(frozen=True)
class Interaction:
    """One cross term w·Dγ_block(x_center)[x_direction] at the map's position."""

    block: str
    center: str
    direction: str
    weight: float
    size: float  # ‖first-order logit effect‖ (UᵀU metric)
    effect: float  # first-order effect on the top token's logit


@dataclass
class InteractionMap:
    tokens: list[str]
    position: int
    top_token: str
    parts: list[str]  # η and every block, in order: the possible centers and directions
    blocks: list[str]  # receiving blocks, in the order computed
    records: list[Interaction] = field(default_factory=list)
    complete: bool = True
    num_blocks: int = 0  # receiving blocks asked for (len(blocks) of them finished)
    resumed: int = 0  # blocks read from a checkpoint rather than computed

    def matrix(self, value: str = "size", by: str = "pairs") -> tuple[list[str], list[str], torch.Tensor]:
        """Aggregated heatmap data: (row labels, column labels, matrix).

        by="pairs": rows = center x_i, columns = direction x_j, summed over receiving blocks;
        by="blocks": rows = receiving block l, columns = direction x_j, summed over centers.
        value: "size" (sum of sizes) or "effect" (sum of signed top-token effects).
        """
        if value not in ("size", "effect"):
            raise InputError(f"value must be 'size' or 'effect', got {value!r}")
        if by not in ("pairs", "blocks"):
            raise InputError(f"by must be 'pairs' or 'blocks', got {by!r}")
        rows = self.parts[:-1] if by == "pairs" else self.blocks
        cols = self.parts[:-1]
        r_index, c_index = {n: i for i, n in enumerate(rows)}, {n: i for i, n in enumerate(cols)}
        m = torch.zeros(len(rows), len(cols), dtype=torch.float64)
        for rec in self.records:
            r = rec.center if by == "pairs" else rec.block
            m[r_index[r], c_index[rec.direction]] += getattr(rec, value)
        return list(rows), list(cols), m

    def top(self, n: int = 10, value: str = "size") -> list[Interaction]:
        """The n largest cross terms (by |value|)."""
        return sorted(self.records, key=lambda r: -abs(getattr(r, value)))[:n]

    def to_json(self) -> str:
        d = asdict(self)
        del d["resumed"]  # how it was computed, not what: a resumed run writes the same file
        d["records"] = [asdict(r) for r in self.records]
        return json.dumps(d, ensure_ascii=False, indent=1)

    def to_csv(self) -> str:
        f = io.StringIO(newline="")
        w = csv.writer(f)
        w.writerow(["block", "center", "direction", "weight", "size", "effect"])
        for r in self.records:
            w.writerow([r.block, r.center, r.direction, f"{r.weight:.8g}", f"{r.size:.8g}", f"{r.effect:.8g}"])
        return f.getvalue()

    def write_csv(self, path) -> None:
        write_atomic(path, self.to_csv())

    def svg(self, value: str = "size", by: str = "pairs", title: str | None = None) -> str:
        rows, cols, m = self.matrix(value, by)
        what = "size ‖U·Dῡ·t‖" if value == "size" else f"effect on the logit of {self.top_token!r}"
        axes = ("center x_i", "direction x_j") if by == "pairs" else ("receiving block l", "direction x_j")
        title = title or (f"degree-1 cross terms w·Dγ_l(x_i)[x_j], {what}, summed over "
                          f"{'receiving blocks' if by == 'pairs' else 'centers'}; position {self.position} "
                          f"({self.tokens[self.position]!r})" + ("" if self.complete else " — INCOMPLETE"))
        return heatmap_svg(rows, cols, m, title=title, axes=axes, diverging=value == "effect", log=value == "size")

    def save(self, folder) -> dict[str, Path]:
        """interactions.json, interactions.csv and four heatmaps (size/effect × pairs/blocks)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        files = {"json": out / "interactions.json", "csv": out / "interactions.csv"}
        write_atomic(files["json"], self.to_json())
        self.write_csv(files["csv"])
        for value in ("size", "effect"):
            for by in ("pairs", "blocks"):
                path = out / f"interactions_{value}_{by}.svg"
                write_atomic(path, self.svg(value, by))
                files[f"{value}_{by}"] = path
        return files


class Checkpoint:
    """Finished blocks of an interaction run, in a JSON Lines file: a header line that identifies
    the run (model weights, tokens, position, receiving blocks), then one line per finished block,
    appended as it finishes (one write: a block is in the file whole or not at all). A file with
    another header is started afresh; a torn last line (a killed process) is dropped."""

    def __init__(self, path, key: dict):
        self.path = Path(path)
        self.blocks: dict[str, list[Interaction]] = {}
        header = json.dumps({"jetfx_interactions": 1, "key": key}, sort_keys=True)
        lines = []
        if self.path.is_file():
            try:
                lines = self.path.read_text(encoding="utf-8").split("\n")
            except (OSError, UnicodeDecodeError):
                lines = []
        kept = [header]
        if lines and lines[0] == header:
            for line in lines[1:]:
                try:
                    d = json.loads(line)
                    records = [Interaction(**r) for r in d["records"]]
                except (ValueError, KeyError, TypeError):
                    break  # a torn or foreign line ends what can be trusted
                self.blocks[d["block"]] = records
                kept.append(line)
        if lines != [*kept, ""]:  # the file holds more or less than the trusted lines: rewrite it
            write_atomic(self.path, "\n".join(kept) + "\n")

    def save(self, block: str, records: list[Interaction]) -> None:
        line = json.dumps({"block": block, "records": [asdict(r) for r in records]}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
        self.blocks[block] = records


def heatmap_svg(rows, cols, m: torch.Tensor, *, title: str = "", axes=("", ""), diverging: bool = False,
                log: bool = False) -> str:
    """A labelled heatmap as SVG (white→red, or blue–white–red around 0 when `diverging`).

    `log` colours non-negative values by log10 over the top six decades (sizes span many orders of
    magnitude: one massive-activation direction would otherwise leave every other cell white).
    """
    from .lens_view import diverging_color

    shown = m
    if log and not diverging:
        positive = m[m > 0]
        floor = float(positive.max()) * 1e-6 if positive.numel() else 1.0
        shown = torch.where(m > floor, torch.log10(m.clamp_min(floor) / floor), torch.zeros_like(m))

    cell = max(8, min(28, 900 // max(len(cols), 1)))
    label_w = 8 + 7 * max((len(r) for r in rows), default=4)
    head_h = 8 + 6 * max((len(c) for c in cols), default=4)
    top = 40 + head_h
    width, height = label_w + cell * len(cols) + 170, top + max(cell * len(rows), 160) + 50
    scale = float(shown.abs().max()) if shown.numel() else 0.0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="8" y="18" font-size="13">{html.escape(title)}</text>']
    for j, c in enumerate(cols):
        x = label_w + j * cell + cell / 2
        out.append(f'<text transform="translate({x + 4:.1f},{top - 4}) rotate(-90)">{html.escape(c)}</text>')
    for i, r in enumerate(rows):
        y = top + i * cell
        out.append(f'<text x="{label_w - 4}" y="{y + cell / 2 + 4:.1f}" text-anchor="end">{html.escape(r)}</text>')
        for j in range(len(cols)):
            v = float(m[i, j])
            c = float(shown[i, j])
            color = diverging_color(c, scale) if diverging else diverging_color(abs(c), scale)
            out.append(f'<rect x="{label_w + j * cell}" y="{y}" width="{cell}" height="{cell}" fill="{color}" '
                       f'stroke="#eeeeee"><title>{html.escape(r)} × {html.escape(cols[j])}: {v:.4g}</title></rect>')
    lx = label_w + cell * len(cols) + 20
    for s in range(11):
        v = (s / 10) * scale if not diverging else (s / 5 - 1) * scale
        out.append(f'<rect x="{lx}" y="{top + s * 14}" width="16" height="14" fill="{diverging_color(v, scale)}"/>')
        if s % 5 == 0:
            label = f"{float(floor) * 10**v:.2g}" if log and not diverging else f"{v:.3g}"
            out.append(f'<text x="{lx + 22}" y="{top + s * 14 + 11}">{label}</text>')
    out.append(f'<text x="8" y="{height - 12}">rows: {html.escape(axes[0])}; columns: {html.escape(axes[1])}</text>')
    out.append("</svg>")
    return "\n".join(out)


class _Readout:
    """t ↦ (‖U·Dῡ(h_L)·t‖, [U·Dῡ(h_L)·t]_u*) at one position, in d-space."""

    def __init__(self, gm: fx.GraphModule, ids: torch.Tensor, h_last: torch.Tensor, position: int, top: int):
        split = split_decoder(gm)
        if split is None:
            raise ExpansionError("the interaction view needs a decoder that ends in a linear unembedding U")
        from .functions import compute_region, gram, jet_dtype

        dtype = jet_dtype(gm)
        norm = compute_region(split.norm, dtype)
        side = tuple(capture(gm, ids, norm.side_inputs).values()) if norm.side_inputs else ()
        h = h_last.detach().to(dtype)

        def at_position(z):
            full = torch.cat([h[:, :position], z.view(1, 1, -1), h[:, position + 1:]], dim=1)
            return norm.module(full, *side)[0, position]

        with torch.no_grad():
            jac = torch.func.jacfwd(at_position)(h[0, position])  # (d, d)
            U = split.unembedding
            self.metric = jac.T @ gram(U, jac.dtype) @ jac  # blocked UᵀU: no copy of U in the jet dtype
            self.row = jac.T @ U[top].to(jac.dtype)

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quad = torch.einsum("nd,de,ne->n", t, self.metric, t).clamp_min(0)
        return quad.sqrt(), t @ self.row


def interactions(gm: fx.GraphModule, tokens, *, position: int = -1, blocks=None, progress: bool = True,
                 tokenizer=None, checkpoint=None) -> InteractionMap:
    """All degree-1 cross terms of one input at one position (default: the last), measured.

    `blocks`: receiving blocks (names or shell patterns, default all). Interrupting (Ctrl-C)
    returns the blocks finished so far, with `complete=False`. `checkpoint`: a file (see
    `Checkpoint`) that keeps every finished block; a call with the same model, input, position and
    blocks skips them, and its result equals an uninterrupted run's.
    """
    from .passes.mixed import directional_graph

    structure = residual_of(gm)
    info = info_of(gm)
    tokenizer = tokenizer or info.tokenizer
    ids = tokens if isinstance(tokens, torch.Tensor) else as_tokens(tokens, tokenizer)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    ids = ids.to(device_of(gm))
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise InputError(f"the interaction view takes one input (a text or tokens of shape (1, T)), got shape "
                         f"{tuple(ids.shape)}; run it once per text")
    T = ids.shape[1]
    if not -T <= position < T:
        raise InputError(f"position {position} is out of range for {T} tokens")
    position %= T
    receiving = _select_blocks(structure, blocks)
    parts = [P.ENCODER] + [b.name for b in structure.blocks]
    part_nodes = [structure.stream[0]] + [b.output for b in structure.blocks]
    from .functions import compute_region, jet_dtype

    dtype = jet_dtype(gm)  # float32 for a half-precision model: cross terms are small
    regions = {b.name: compute_region(block_region(gm, b), dtype) for b in receiving}
    side_names = sorted({s for r in regions.values() for s in r.side_inputs})
    names = [*part_nodes, structure.decoder.input, logits_node(gm), *side_names]
    with torch.no_grad():
        vals = capture(gm, ids, names)
    logits = vals[logits_node(gm)][0, position]
    top = int(logits.argmax())  # a host sync, once
    readout = _Readout(gm, ids, vals[structure.decoder.input], position, top)
    token_text = [tokenizer.decode([t]) if tokenizer is not None else str(t) for t in ids[0].tolist()]
    top_text = tokenizer.decode([top]) if tokenizer is not None else str(top)
    result = InteractionMap(token_text, position, top_text, parts, [], [], complete=False, num_blocks=len(receiving))
    saved = {}
    if checkpoint is not None:
        from .ngrams import weights_hash

        key = {"model": info.model_name, "weights": weights_hash(gm), "dtype": str(logits.dtype),
               "tokens": ids[0].tolist(), "position": position, "blocks": [b.name for b in receiving]}
        checkpoint = Checkpoint(checkpoint, key)
        saved = checkpoint.blocks
    value_of = dict(zip(parts, (vals[n] for n in part_nodes)))
    bar = _progress(len(receiving), progress)
    try:
        for block in receiving:
            if block.name in saved:
                result.records.extend(saved[block.name])
                result.blocks.append(block.name)
                result.resumed += 1
                bar.update(1)
                continue
            block_records = []
            centers = [P.ENCODER] + [b.name for b in structure.blocks if b.step < block.step]
            region = regions[block.name]
            side = [vals[s] for s in region.side_inputs]
            jvp = directional_graph(region.module, 1)
            X = torch.stack([value_of[c][0] for c in centers]).to(dtype)  # (N, T, d)
            w = 1.0 / len(centers)
            for i, center in enumerate(centers):
                others = [j for j in range(len(centers)) if j != i]
                if not others:
                    continue
                outs = []
                for s in range(0, len(others), CHUNK):
                    dirs = X[others[s:s + CHUNK]].unsqueeze(1)  # (n, 1, T, d)
                    with torch.no_grad():
                        outs.append(torch.func.vmap(lambda v: jvp(X[i].unsqueeze(0), v, *side)[1])(dirs))
                t = w * torch.cat(outs)[:, 0, position]  # (N − 1, d)
                size, effect = readout(t.to(readout.metric.dtype))
                for j, sz, ef in zip(others, size.tolist(), effect.tolist()):
                    block_records.append(Interaction(block.name, center, centers[j], w, sz, ef))
            if checkpoint is not None:
                checkpoint.save(block.name, block_records)
            result.records.extend(block_records)
            result.blocks.append(block.name)
            bar.update(1)
        result.complete = True
    except KeyboardInterrupt:
        import warnings

        warnings.warn(f"interrupted: interactions of {len(result.blocks)} of {len(receiving)} blocks kept",
                      stacklevel=2)
    finally:
        bar.close()
    return result


def _select_blocks(structure, patterns) -> list:
    later = [b for b in structure.blocks if b.step >= 1]
    if patterns is None:
        return later
    if isinstance(patterns, str):
        patterns = (patterns,)
    chosen = [b for b in later if any(P._matches(b, p) for p in patterns)]
    if not chosen:
        raise InputError(f"no block after the first step matches {list(patterns)}; blocks are "
                         f"{', '.join(b.name for b in later[:6])}…")
    return chosen


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="interactions", unit="block", disable=not enabled)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()
