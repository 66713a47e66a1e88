"""How much of SmolLM2's logits the paths through ≤ 1 and ≤ 2 blocks carry, with Algorithm 2's
weights and with jet weights fitted on one sentence — on that sentence and on 20 held-out ones.

    .venv/bin/python tools/weights_report.py [--quick] [--out weights_report.json]

For k = 0 and 1, paths through ≤ 1 block (61) and ≤ 2 blocks (1831): the exponential expansion
with Algorithm 2's weights 1/|ξ_s| ("uniform"), then with weights fitted on the demo sentence on the
simplex and on the affine plane (`jetfx.expand(..., weights="optimized", tokens=...)`), and for
≤ 1 block (`--corpus-blocks`: also ≤ 2) on a corpus of 10 other sentences ("optimized on corpus"). For each:
the share of the logits' norm carried by Σ paths (‖Σ paths‖/‖q‖) and by the remainder (‖δ‖/‖q‖),
cosine similarity and top-1 agreement of Σ paths with the logits, and the relative remainder
‖δ‖²/‖q‖² the fit minimizes — means over tokens, on the demo sentence and on 20 held-out sentences
never used to fit. For k ≥ 1 also the held-out metrics of the paths with their decoder jets truncated
at order 0 (U·γ_{L+1}(x_p): what the paths' centers give without the decoder's derivative along
h_L − x_p, which contains the true final stream). Metrics are computed in d-space (Σ paths = U·Σ e,
one unembedding), so 1831 paths cost one. `--quick`: paths through ≤ 1 block only. Prints JSON
(also written to --out) and, to stderr, the markdown table of docs/weights.md (`--render a.json b.json` makes
it from saved reports).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jetfx  # noqa: E402
from _report import emit  # noqa: E402 - tools/_report.py, next to this script
from jetfx import lens as L  # noqa: E402
from jetfx import paths as P  # noqa: E402
from jetfx.files import write_atomic  # noqa: E402
from jetfx.weights import faithfulness  # noqa: E402

DEMO = "The capital of France is"
# jetfx's sample sentences, less the one that starts with the demo sentence, and one more: 20
HELD_OUT = [s for s in L.sample_sentences() if not s.startswith(DEMO)] + ["A quiet wind moved through the tall grass."]
# a small corpus to fit on instead of the demo sentence (disjoint from the held-out sentences)
FIT_CORPUS = [
    "The old clock in the hall stopped at noon.",
    "My sister bought a new bicycle last week.",
    "The river was cold and clear in the morning.",
    "He forgot his keys at the office again.",
    "The teacher wrote the date on the board.",
    "We watched the sunset from the top of the hill.",
    "The baker opens his shop before dawn.",
    "Snow covered the roofs of the small village.",
    "She keeps her notes in a blue folder.",
    "The dog waited patiently by the front gate.",
]


def _rounded(d: dict) -> dict:
    """6 significant digits (not decimals: Algorithm 2's paths carry ~1e-12, which must not read 0)."""
    return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in d.items()}


def markdown(runs: list[dict]) -> str:
    """The runs as the table of docs/weights.md (held-out figures, then the demo sentence's)."""
    head = ("| k | paths | weights | held-out: paths | rem. | cos | top-1 | order 0: cos | paths | demo: paths | rem. | "
            "cos | top-1 |\n" + "|" + " --- |" * 13)
    lines = [head]
    for r in runs:
        h, d, o = r["held_out"], r["demo"], r.get("held_out_decoder_order0")
        what = r["weights"] + (f" ({r['constraint']})" if r["constraint"] else "")
        order0 = f"{o['cosine']:.3f} | {o['paths_norm']:.3g}" if o else "– | –"
        lines.append(f"| {r['k']} | ≤ {r['paths'][-1]} ({r['n_paths']}) | {what} | {h['paths_norm']:.3g} | "
                     f"{h['remainder_norm']:.3g} | {h['cosine']:.3f} | {h['top1']:.3f} | {order0} | "
                     f"{d['paths_norm']:.3g} | {d['remainder_norm']:.3g} | {d['cosine']:.3f} | {d['top1']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--render", nargs="+", default=None, metavar="JSON",
                    help="print the markdown table of saved reports (in order) and exit")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="paths through ≤ 1 block only")
    ap.add_argument("--blocks", type=int, nargs="+", choices=(1, 2), default=[1, 2],
                    help="path selections to measure: through ≤ 1 and/or ≤ 2 blocks (--quick: 1)")
    ap.add_argument("--ks", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--evals", type=int, default=100, help="loss evaluations of each fit, paths through ≤ 1 block")
    ap.add_argument("--evals-deep", type=int, default=30, help="loss evaluations of each fit, ≤ 2 blocks")
    ap.add_argument("--no-corpus", action="store_true", help="skip the fits on a corpus of 10 other sentences")
    ap.add_argument("--corpus-blocks", type=int, nargs="+", choices=(1, 2), default=[1],
                    help="path selections that also get the corpus fit (≤ 2 blocks: every loss evaluation runs the "
                         "blocks of the 1,770 two-block paths on all 93 tokens)")
    ap.add_argument("--schemes", nargs="+", choices=("uniform", "simplex", "affine", "corpus"),
                    default=["uniform", "simplex", "affine", "corpus"],
                    help="which weights to measure: Algorithm 2's, fitted on the demo sentence on the simplex or "
                         "the affine plane, fitted on the corpus (the selections of --corpus-blocks)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.render:
        print(markdown([run for f in args.render for run in json.loads(Path(f).read_text())["runs"]]))
        return
    if len(HELD_OUT) != 20:
        raise SystemExit(f"expected 20 held-out sentences, have {len(HELD_OUT)}")
    model, tok = jetfx.load(args.model, progress=False)
    gm = jetfx.trace(model, DEMO, tokenizer=tok)
    selections = [("max_blocks_1", P.max_blocks(1), args.evals)] if 1 in args.blocks else []
    if not args.quick and 2 in args.blocks:
        selections.append(("max_blocks_2", P.max_blocks(2), args.evals_deep))
    command = " ".join(["tools/weights_report.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"model": args.model, "command": command, "demo": DEMO, "held_out": HELD_OUT, "fit_corpus": FIT_CORPUS,
              "threads": torch.get_num_threads(),
              "metrics": "means over tokens: paths_norm ‖Σ paths‖/‖q‖, remainder_norm ‖δ‖/‖q‖, cosine and top1 of "
                         "Σ paths vs the logits q, relative_loss ‖δ‖²/‖q‖² (what the fit minimizes)",
              "runs": []}
    for k in args.ks:
        for label, selection, evals in selections:
            schemes = [(w, c) for w, c in (("uniform", None), ("optimized", "simplex"), ("optimized", "affine"))
                       if (c or w) in args.schemes]
            corpus_fit = int(label[-1]) in args.corpus_blocks and not args.no_corpus and "corpus" in args.schemes
            if corpus_fit:  # 10 other sentences
                schemes.append(("optimized on corpus", "simplex" if k >= 1 else "affine"))
            for weights, constraint in schemes:
                t = time.perf_counter()
                kw = {}
                if weights == "optimized":
                    kw = dict(weights="optimized", tokens=DEMO, constraint=constraint, fit={"max_evals": evals})
                if weights == "optimized on corpus":
                    kw = dict(weights="optimized", tokens=FIT_CORPUS, constraint=constraint, fit={"max_evals": evals})
                ex = jetfx.expand(gm, k=k, paths=selection, max_paths=4000, **kw)
                seconds = time.perf_counter() - t
                run = {"k": k, "paths": label, "n_paths": len(ex.path_names), "weights": weights,
                       "constraint": constraint, "seconds": round(seconds, 2)}
                if weights.startswith("optimized"):
                    run["fit"] = _rounded(ex.weight_fit.to_dict())
                run["demo"] = _rounded(faithfulness(ex, DEMO))
                run["held_out"] = _rounded(faithfulness(ex, HELD_OUT))
                if k >= 1:  # the same paths through the decoder alone, without its derivatives along h_L − x_p
                    run["held_out_decoder_order0"] = _rounded(faithfulness(ex, HELD_OUT, decoder_order=0))
                report["runs"].append(run)
                if args.out:  # after every run: a long report interrupted keeps what it measured
                    write_atomic(args.out, json.dumps(report, indent=1))
                print(f"k={k} {label:13s} {weights:19s} {constraint or '':8s} demo cos {run['demo']['cosine']:.4f} "
                      f"paths {run['demo']['paths_norm']:.3g} | held-out cos {run['held_out']['cosine']:.4f} "
                      f"top1 {run['held_out']['top1']:.3f} paths {run['held_out']['paths_norm']:.3g} "
                      f"remainder {run['held_out']['remainder_norm']:.3g} ({seconds:.1f} s)", file=sys.stderr, flush=True)
                del ex
    print(markdown(report["runs"]), file=sys.stderr)
    emit(report, args.out)


if __name__ == "__main__":
    main()
