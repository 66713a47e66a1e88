"""The architecture support table: every causal LM class of the installed transformers, checked.

    .venv/bin/python tools/architectures.py                       # full sweep → docs/architectures.md
    .venv/bin/python tools/architectures.py --only MixtralForCausalLM CohereForCausalLM
    .venv/bin/python tools/architectures.py --jobs 2 --timeout 300 --json out/architectures.json
    .venv/bin/python tools/architectures.py --records out/sweep.jsonl   # resumable: finished classes kept
    .venv/bin/python tools/architectures.py --records out/sweep.jsonl --redo MambaForCausalLM  # one row again

For each `*ForCausalLM` / `*LMHeadModel` class: a tiny random config (`tests/tiny_configs.py`:
2 layers, width 64, vocabulary 256, 4 experts), then

- builds      the model builds and runs (float32, eval mode);
- exports     torch.export can export it at all (checked with a plain static-shape export when
              jetfx.trace fails, so that the table separates torch's limits from jetfx's);
- traces      `jetfx.trace` succeeds; the blocks it finds (names, kinds);
- k=1, k=2    the exponential expansion through at most one block (`paths.max_blocks(1)`) of the
              float64 graph: Σ paths + remainder = logits, and every path's logits equal those of
              the nested-AD reference jets (`jets="nested"`) — both to 1e-9 relative (to max|logits|);
- lens        the iterative jet lens, k = 1: its last row equals the logits (1e-9 relative);
- f32 k=2     informational: |Σ paths + remainder − eager logits| / max|logits| in float32, with
              the largest path's size relative to the logits (cancellation explains rounding).

Each class runs in its own subprocess (a crash or a hang costs one row), with a timeout. Progress
goes to stderr, a JSON summary to stdout, the table to docs/architectures.md (unless --only or
--no-write). With --records, every finished class is appended to a JSON-lines file at once; a
sweep started again with the same file checks only the classes it lacks (and those named by
--redo), so an interrupted sweep resumes and a fix is re-checked without the hour-long rerun. A class counts as "exportable" when it builds and torch.export can export it; the
goal is that ≥ 90 % of those are fully supported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TOLERANCE = 1e-9  # float64, relative to max |logits|
MAX_PARAMETERS = 20_000_000  # a tiny config bigger than this is refused before it is allocated


def _error(e: BaseException) -> dict:
    from jetfx.errors import JetfxError

    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return {"error_type": type(e).__name__, "error": text[:500], "clear": isinstance(e, JetfxError)}


def _rel(a, b, scale) -> float:
    return float((a.double() - b.double()).abs().max()) / max(float(scale), 1e-30)


def _exportable(model, ids) -> tuple[bool, str]:
    """Whether plain torch.export (static shapes, non-strict) can export tokens → logits."""
    import torch

    from jetfx.tracing import _LogitsOf

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.export(_LogitsOf(model, True), (ids,), strict=False)
        return True, ""
    except Exception as e:  # noqa: BLE001 - recorded in the table
        return False, _error(e)["error"]


def check(name: str) -> dict:
    """Every check of the table for one class; never raises."""
    import torch
    import transformers

    import jetfx
    from jetfx import paths as P
    from jetfx.lens import iterative_lens
    from tiny_configs import tiny_config, tokens

    torch.set_num_threads(1)
    rec: dict = {"class": name, "status": "", "builds": False, "exports": None, "traces": False}
    cls = getattr(transformers, name)
    rec["model_type"] = getattr(cls.config_class, "model_type", "")
    # build
    try:
        config = tiny_config(cls)
        with torch.device("meta"):
            size = sum(p.numel() for p in cls(config).parameters())
        if size > MAX_PARAMETERS:
            raise RuntimeError(f"the tiny config still has {size:,} parameters (sub-configs not shrunk)")
        torch.manual_seed(0)
        model = cls(config).eval()
        ids = tokens(model)
        with torch.no_grad():
            eager = model(input_ids=ids, use_cache=False).logits
        rec.update(builds=True, parameters=size)
    except Exception as e:  # noqa: BLE001
        rec.update(status="build", **_error(e))
        return rec
    # trace (float32: reproduces the eager model)
    try:
        gm32 = jetfx.trace(model, ids)
        rec.update(traces=True, exports=True)
    except Exception as e:  # noqa: BLE001
        from jetfx.errors import StructureError

        rec.update(status="structure" if isinstance(e, StructureError) else "trace", **_error(e))
        rec["exports"], why = _exportable(model, ids)
        if not rec["exports"]:
            rec.update(status="export", export_error=why)
        return rec
    s = gm32.residual
    rec["blocks"] = [[b.name, b.kind] for b in s.blocks]
    rec["steps"] = len(s.steps)
    rec["specialized"] = getattr(gm32.jetfx, "specialized_length", None)
    # expansions in float64
    stage = "expand"
    try:
        gm = jetfx.trace(model, ids, dtype=torch.float64)
        with torch.no_grad():
            ref = gm(ids)
        scale = ref.abs().max()
        for k in (1, 2):
            stage = f"k={k}"
            ex = jetfx.expand(gm, k=k, paths=P.max_blocks(1))
            nested = jetfx.expand(gm, k=k, paths=P.max_blocks(1), jets="nested")
            with torch.no_grad():
                out, ref_out = ex(ids), nested(ids)
            rec[f"k{k}_sum"] = _rel(out.total(), ref, scale)
            rec[f"k{k}_rule"] = _rel(out.stacked, ref_out.stacked, scale)
            rec[f"k{k}_paths"] = len(out.names)
        stage = "lens"
        lens = iterative_lens(gm, ids, k=1)
        rec["lens"] = _rel(lens.row_logits[-1], lens.model_logits, lens.model_logits.abs().max())
        stage = "f32"
        with torch.no_grad():
            out32 = jetfx.expand(gm32, k=2, paths=P.max_blocks(1))(ids)
        big = float(eager.abs().max())
        rec["f32_k2_sum"] = _rel(out32.total(), eager, big)
        rec["f32_k2_path_size"] = float(out32.stacked.abs().max()) / max(big, 1e-30)
    except Exception as e:  # noqa: BLE001
        rec.update(status=stage.split("=")[0] if stage.startswith("k=") else stage, stage=stage, **_error(e))
        if stage.startswith("k=") or stage == "expand":
            rec["status"] = "expand"
        return rec
    bad = [key for key in ("k1_sum", "k1_rule", "k2_sum", "k2_rule", "lens") if not rec[key] <= TOLERANCE]
    if bad:
        rec.update(status="inexact", error=", ".join(f"{key} = {rec[key]:.2g}" for key in bad), clear=False,
                   error_type="inexact")
    else:
        rec["status"] = "supported"
    return rec


# ------------------------------------------------------------------------------------------------
# the sweep


def _run_one(name: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", name]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"class": name, "status": "timeout", "error": f"no result within {timeout:.0f} s", "clear": False,
                "error_type": "timeout", "seconds": timeout}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])[:400]
        rec = {"class": name, "status": "crash", "error": f"exit code {proc.returncode}: {tail}", "clear": False,
               "error_type": "crash"}
    else:
        rec = json.loads(lines[-1])
    rec["seconds"] = round(time.perf_counter() - start, 1)
    return rec


def load_records(path: Path) -> dict[str, dict]:
    """The records of a JSON-lines file written by `sweep` (the last one of a class wins)."""
    out: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["class"]] = rec
    return out


def sweep(names: list[str], jobs: int, timeout: float, records: Path | None = None,
          redo: tuple[str, ...] = ()) -> list[dict]:
    """One record per class (in `names`' order), each checked in a subprocess; with `records`, the
    classes that file already holds (and that are not in `redo`) are reused, the others appended."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    results = {n: r for n, r in load_records(records).items() if n not in redo} if records else {}
    todo = [n for n in names if n not in results]
    if results:
        print(f"{len(names) - len(todo)} classes reused from {records}, {len(todo)} to check", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_run_one, n, timeout): n for n in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            rec = fut.result()
            results[rec["class"]] = rec
            if records:
                with records.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
            note = rec.get("error", "")[:100]
            print(f"[{i}/{len(todo)}] {rec['class']:<40} {rec['status']:<10} {rec.get('seconds', 0):6.1f}s {note}",
                  file=sys.stderr, flush=True)
    return [results[n] for n in names]


def summarize(records: list[dict]) -> dict:
    # a class that hung or crashed counts against the goal: as one that builds, exports and fails
    unknown = [r for r in records if r["status"] in ("timeout", "crash")]
    built = [r for r in records if r.get("builds")] + unknown
    exportable = [r for r in built if r.get("exports") or r in unknown]
    supported = [r for r in exportable if r["status"] == "supported"]
    by_status: dict[str, int] = {}
    for r in records:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    raw = [r["class"] for r in exportable if r["status"] not in ("supported", "inexact") and not r.get("clear")]
    return {
        "classes": len(records), "build": len(built), "exportable": len(exportable), "supported": len(supported),
        "supported_share": round(len(supported) / len(exportable), 4) if exportable else None,
        "by_status": dict(sorted(by_status.items())), "unclear_errors": raw,
        "unchecked": by_status.get("unchecked", 0),
    }


STATUS_TEXT = {
    "supported": "✓", "build": "config does not build", "export": "torch.export cannot export",
    "trace": "trace failed", "structure": "no residual structure", "expand": "expansion failed",
    "inexact": "not exact", "lens": "lens failed", "f32": "float32 check failed", "timeout": "timeout",
    "crash": "crashed", "unchecked": "not checked",
}


def _fmt(x) -> str:
    return "" if x is None else f"{x:.0e}".replace("e-0", "e-").replace("e+0", "e+")


def _blocks(rec) -> str:
    blocks = rec.get("blocks") or []
    if not blocks:
        return ""
    kinds: dict[str, int] = {}
    for _, kind in blocks:
        kinds[kind] = kinds.get(kind, 0) + 1
    per_step = f"{len(blocks)} in {rec.get('steps')} steps" if rec.get("steps") != len(blocks) else f"{len(blocks)}"
    names = ", ".join(f"`{n}`" for n, _ in blocks[:4]) + (" …" if len(blocks) > 4 else "")
    return f"{per_step}: " + ", ".join(f"{n} {k}" for k, n in kinds.items()) + f" ({names})"


FAMILIES = """\
## How jetfx reads each family

jetfx has no per-architecture code: every family below is found in the exported ATen graph by
residual analysis (`passes/residual.py`), after exact rewrites into residual form
(`passes/residual_form.py`). `print(gm.residual)` shows what was found and what was rewritten.

- **Dense pre-norm decoders** (GPT-2, Llama, Qwen, Gemma, OLMo, Phi, Mistral, …): two blocks per
  layer, `attn` then `mlp`, 2^L paths.
- **Parallel blocks.** GPT-J/GPT-NeoX add `attn(n1(h)) + mlp(n2(h))`; Cohere and Cohere2 share one
  norm, `h + attn(n(h)) + mlp(n(h))`, which the graph holds as `(h + attn) + mlp`; Falcon's
  `parallel_attn` sums the branches in place (`mlp += attn`). The residual sum of a layer is opened
  into its terms, so every layer gives one `attn` and one `mlp` block reading the same stream node
  (`layers.3.self_attn`, `layers.3.mlp`; the shared norm is part of both) and the expansion has 3^L
  paths.
- **Mixture of experts** (kind `moe`: Mixtral, Qwen-MoE, OLMoE, DeepSeek, GPT-OSS, Llama-4, Granite,
  JetMoE, …). Router, top-k gating, routed experts, shared experts and dense fall-backs — everything
  between the stream node and the layer's MLP output — are one block. Routing is piecewise constant
  in the block's input, so **the jet is taken with the routing of the center**: in Taylor mode every
  integer or boolean value (expert indices, sort orders, expert offsets, masks, comparisons) is
  evaluated at the center x_i and held fixed, top-k and sort carry the coefficients of their values
  through the center's choice, and the gate weights enter the jet as the smooth functions they are.
  J^k γ(x_i)(y) is then the Taylor polynomial of "γ with x_i's routing"; where the true input y routes
  otherwise, the difference lands in the remainder δ = h_{l+1} − Σ ξ, which is exact whatever the
  routing. The nested-AD reference differentiates through the same routing, and the table checks
  both agree. Expert products (`transformers::grouped_mm_fallback`) become differentiable slices
  and matrix products; jets of routed blocks loop over centers where vmap cannot batch the routing.
- **Post-norm layers** h ← N(h + f(h)) (BERT/RoBERTa/ELECTRA-style decoders, the BART/Marian/Pegasus
  family, openai-gpt, XLNet, XLM, BioGPT's relatives, …) **are rewritten, not refused**: each one is
  the block γ(h) = N(h + f(h)) − h, so that h_{l+1} = h_l + γ(h_l) holds exactly and the stream stays
  a sum. We chose the rewrite because it is exact (h + γ(h) is the layer's output up to one rounding,
  1e-16 relative in float64), because every tool of jetfx — paths, lenses, n-grams, exports — then
  works on these models with the paper's definitions unchanged, and because the block holds exactly
  what the layer computes, norm included. What it does not do is make the skip path an identity of
  the model's own computation: a path that skips a post-norm block carries h past a renormalization
  the model always applies (γ contains −h), so the terms of such expansions are larger and cancel
  more than in a pre-norm model (see the f32 column). The norm after the last layer belongs to the
  decoder γ_{L+1}. `gm.residual.rewrites` lists every rewritten layer. The same rewrite covers
  sums without a plain skip term (Doge's learned h ← α⊙h + f(h)).
- **Reshaped streams** (OPT flattens the stream to (B·T, d) around its MLP): the residual sum is
  taken in the stream's own shape (reshapes are linear, so this is exact).
- **State-space and hybrid models** (kind `mixer`: Mamba, Mamba-2, Falcon-Mamba, Jamba, Bamba,
  Granite-MoE-hybrid, Nemotron-H, Falcon-H1, Qwen3-Next's gated delta nets, …): token mixing without
  softmax attention — selective scans, convolutions, linear attention — is a block kind of its own.
  Their forward passes often loop over positions, and torch.export then fixes the sequence length.
  `jetfx.trace` exports again with the length of the tokens it is given and warns that **the graph is
  specialised to that length**; expansions and lenses accept exactly that length, and another one
  gets an `InputError` saying so (instead of torch's guard assertion). Pass the tokens you will
  analyse to `jetfx.trace`.
- **Masks computed from token values** (padding masks `ids != pad` in XLM/Flaubert, RoBERTa's
  position ids) are side inputs, like masks computed from the shape: constants for the jets.
- **Multi-head latent attention** (DeepSeek-V2/V3, MiniCPM3, GLM-4-MoE-Lite, …) is attention like
  any other; complex rotary embeddings (`view_as_complex`) are linear for the jets.

## Float32 and k = 2

The `f32 k=2` column is |Σ paths + remainder − logits| / max|logits| of the float32 model against its
eager logits. Where it is large (ModernBERT-decoder, NanoChat, OLMo-hybrid, the post-norm family), the
cause is rounding, not a wrong Taylor rule: second-order jet terms of norms taken at centers far from
the variate are large and cancel in the sum, so float32's relative rounding of the terms becomes a
visible fraction of the logits. The evidence, from this sweep: F32_EVIDENCE Analyse such models with
`jetfx.trace(model, tokens, dtype=torch.float64)` when second-order terms matter.

"""


# the first run of this tool (on 49915cc, before MoE, parallel-block, post-norm and state-space support)
BEFORE = "Before that support was added, the same sweep found 78 of 171 (46 %)."


def f32_evidence(records: list[dict]) -> str:
    """The float32 error of k = 2 relative to the size of the largest path, over supported classes: a
    constant near float32's unit roundoff (6e-8) says rounding; a wrong rule would also miss in float64."""
    rows = [r for r in records if r["status"] == "supported" and r.get("f32_k2_path_size")]
    if not rows:
        return ""
    big = max(rows, key=lambda r: r["f32_k2_sum"])
    ratios = [r["f32_k2_sum"] / r["f32_k2_path_size"] for r in rows if r["f32_k2_sum"] > 1e-5]
    k2 = max(max(r["k2_sum"], r["k2_rule"]) for r in rows)
    text = (f"the largest float32 error is {big['f32_k2_sum']:.1e} ({big['class']}), where the largest path term is "
            f"{big['f32_k2_path_size']:.1e} × max|logits|.")
    if ratios:
        text += (f" For the {len(ratios)} classes whose float32 error exceeds 1e-5, that error divided by the largest "
                 f"path term lies between {min(ratios):.1e} and {max(ratios):.1e}, of the order of float32's unit "
                 "roundoff (6e-8), whatever the architecture.")
    return text + (f" The same expansions in float64 are exact to {k2:.1e} or better against both the logits and the "
                   "nested-AD reference jets (the k=2 column), which a wrong rule would miss by O(1).")


def markdown(records: list[dict], summary: dict, version: str, torch_version: str) -> str:
    lines = [
        "# Architecture support",
        "",
        f"Generated by `tools/architectures.py` with transformers {version} and torch {torch_version}: every",
        "`*ForCausalLM` / `*LMHeadModel` class, as a tiny random model (2 layers, width 64, vocabulary 256,",
        "4 experts with top-2 routing; `tests/tiny_configs.py`). A class is **supported** when `jetfx.trace`",
        "finds its residual structure, the exponential expansions of order k = 1 and k = 2 through at most",
        "one block are exact in float64 (Σ paths + remainder = logits, and every path equals the nested-AD",
        "reference jets, both to 1e-9 relative to max |logits|) and the iterative jet lens of order 1",
        "reproduces the logits in its last row.",
        "",
        f"**{summary['supported']} of the {summary['exportable']} classes that build and that torch.export can "
        f"export are supported ({100 * (summary['supported_share'] or 0):.0f} %)**; {summary['classes']} classes "
        f"in all, {summary['build']} build"
        + (f" ({summary['unchecked']} not checked: the sweep was cut off)" if summary["unchecked"] else "")
        + ". Classes that hung or crashed count as exportable and unsupported. " + BEFORE
        + (f" {summary['by_status']['timeout']} classes ran past the time limit per class on a shared, loaded "
           "machine; check them again with `--records docs/architectures.jsonl --redo CLASS … --timeout 1800`."
           if summary["by_status"].get("timeout") else ""),
        "",
        "Reproduce with `.venv/bin/python tools/architectures.py --jobs 2 --records out/sweep.jsonl` (one to",
        "two hours on two cores; resumable; `--only CLASS …` for some classes); the records of this table are",
        "`docs/architectures.jsonl`. Columns: blocks found (count, kinds, first names); k=1 and k=2:",
        "the larger of the two float64 errors; lens: the lens error; f32 k=2: see below; note: why a class",
        "is not supported, or how its graph was specialised.",
        "",
        FAMILIES.replace("F32_EVIDENCE", f32_evidence(records)),
        "## The table",
        "",
    ]
    lines += ["| class | status | blocks | k=1 | k=2 | lens | f32 k=2 | note |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        status = STATUS_TEXT.get(r["status"], r["status"])
        k1 = _fmt(max(r["k1_sum"], r["k1_rule"])) if "k1_rule" in r else ""
        k2 = _fmt(max(r["k2_sum"], r["k2_rule"])) if "k2_rule" in r else ""
        f32 = _fmt(r.get("f32_k2_sum"))
        note = ""
        if r["status"] != "supported":
            note = (f"{r.get('error_type', '')}: " if r.get("error_type") not in (None, "inexact") else "") + r.get("error", "")
            if r.get("export_error"):
                note = f"torch.export: {r['export_error']}"
            note = note.replace("|", "\\|").replace("\n", " ")[:300]
        elif r.get("specialized"):
            note = f"graph specialised to {r['specialized']} tokens"
        lines.append(f"| {r['class']} | {status} | {_blocks(r)} | {k1} | {k2} | {_fmt(r.get('lens'))} | {f32} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="check only these classes (no docs written)")
    ap.add_argument("--jobs", type=int, default=1, help="classes checked in parallel (default 1)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per class (default 300)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "architectures.md"), help="the markdown table")
    ap.add_argument("--json", help="also write every record as JSON here")
    ap.add_argument("--no-write", action="store_true", help="print the summary only")
    ap.add_argument("--records", help="JSON-lines file of finished classes: appended to, and reused when run again")
    ap.add_argument("--table-only", action="store_true",
                    help="with --records: write the table from the records without checking anything "
                         "(classes without a record are listed as not checked)")
    ap.add_argument("--redo", nargs="+", default=(), metavar="NAME", help="with --records: check these classes again")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        import logging

        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
        print(json.dumps(check(args.worker)), flush=True)
        return 0

    import torch
    import transformers

    from tiny_configs import all_classes

    names = all_classes()
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            ap.error(f"not a causal-LM class of transformers {transformers.__version__}: {', '.join(unknown)}")
        names = list(args.only)
    unknown = [n for n in args.redo if n not in names]
    if unknown:
        ap.error(f"not a causal-LM class of transformers {transformers.__version__}: {', '.join(unknown)}")
    if args.redo and not args.records:
        ap.error("--redo needs --records (the file whose rows it replaces)")
    if args.table_only:
        if not args.records:
            ap.error("--table-only needs --records")
        have = load_records(Path(args.records))
        records = [have.get(n) or {"class": n, "status": "unchecked", "error": "not checked (the sweep was cut off)"}
                   for n in names]
    else:
        records = sweep(names, args.jobs, args.timeout, Path(args.records) if args.records else None,
                        tuple(args.redo))
    summary = summarize(records)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"summary": summary, "records": records}, indent=1), encoding="utf-8")
    if not args.only and not args.no_write:
        Path(args.out).write_text(markdown(records, summary, transformers.__version__, torch.__version__.split("+")[0]),
                                  encoding="utf-8")
    print(json.dumps({"transformers": transformers.__version__, **summary,
                      "records": {r["class"]: r["status"] for r in records}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
