"""Benchmark fitting jet weights on SmolLM2, as a ratio to one forward pass measured side by side.

    .venv/bin/python tools/bench_weights.py [--out bench_weights.json] [--evals 100] [--runs k1_simplex]

The forward pass is the traced model on the demo sentence (no grad; median of repeated runs taken
before, between and after the fits). Fits: the paths through ≤ 1 block, k = 1, on the simplex
(`fit_weights(ex, text)`, default budget of 100 loss evaluations) — cold (first fit of the module
and of the model: it builds the fit's graphs and UᵀU) and warm (a second fit of the same module,
e.g. on another text: graphs and UᵀU cached); then k = 0 on the affine plane. Also the time to
compile the expansion itself, which any expansion pays. Prints JSON; timings are only meaningful
on a quiet machine (the ratio is measured side by side so that a uniformly loaded one roughly
cancels).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jetfx  # noqa: E402
from _report import emit  # noqa: E402 - tools/_report.py, next to this script
from jetfx import paths as P  # noqa: E402
from jetfx.functions import cache_of  # noqa: E402
from jetfx.weights import fit_weights  # noqa: E402

DEMO = "The capital of France is"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=DEMO)
    ap.add_argument("--evals", type=int, default=100, help="loss evaluations per fit (fit_weights' default)")
    ap.add_argument("--runs", nargs="+", choices=("k1_simplex", "k0_affine"), default=["k1_simplex", "k0_affine"],
                    help="which fits to time (k0_affine: each loss evaluation runs the blocks, ~100× k1_simplex's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model, tok = jetfx.load(args.model, progress=False)
    gm = jetfx.trace(model, args.text, tokenizer=tok)
    ids = jetfx.tracing.as_tokens(args.text, tok)
    forwards: list[float] = []

    def forward_passes(n=5):
        with torch.no_grad():
            gm(ids)
            for _ in range(n):
                t = time.perf_counter()
                gm(ids)
                forwards.append(time.perf_counter() - t)

    forward_passes()
    result = {"model": args.model, "text": args.text, "tokens": int(ids.shape[1]), "threads": torch.get_num_threads(),
              "runs": {}}
    for name, k, constraint in (("k1_simplex", 1, "simplex"), ("k0_affine", 0, "affine")):
        if name not in args.runs:
            continue
        t = time.perf_counter()
        ex = jetfx.expand(gm, k=k, paths=P.max_blocks(1))
        compile_s = time.perf_counter() - t
        cache_of(gm).pop(("gram", torch.float64), None)  # cold: UᵀU not computed yet
        cold = fit_weights(ex, args.text, constraint=constraint, max_evals=args.evals)
        forward_passes()
        warm = fit_weights(ex, args.text, constraint=constraint, max_evals=args.evals)
        forward_passes()
        result["runs"][name] = {"k": k, "constraint": constraint, "paths": len(ex.path_names),
                                "compile_s": compile_s, "cold": cold.to_dict(), "warm": warm.to_dict()}
    fwd = statistics.median(forwards)
    result["forward_s"] = fwd
    result["forward_s_spread"] = [min(forwards), max(forwards)]
    for run in result["runs"].values():
        run["ratio_warm"] = round(run["warm"]["seconds"] / fwd, 2)
        run["ratio_cold"] = round(run["cold"]["seconds"] / fwd, 2)
        run["ratio_compile_and_cold_fit"] = round((run["compile_s"] + run["cold"]["seconds"]) / fwd, 2)
        print(f"{run['k']=} {run['constraint']}: fit {run['warm']['seconds']:.2f} s warm = {run['ratio_warm']} forward "
              f"passes, {run['cold']['seconds']:.2f} s cold = {run['ratio_cold']} (loss {run['warm']['loss']:.4g}, "
              f"{run['warm']['evaluations']} evaluations)", file=sys.stderr)
    emit(result, args.out)


if __name__ == "__main__":
    main()
