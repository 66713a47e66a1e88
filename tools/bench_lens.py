"""Benchmark jet lenses on SmolLM2: time of each lens as a ratio to one forward pass.

    .venv/bin/python tools/bench_lens.py [--quick] [--out bench_lens.json]

For k = 0, 1, 2: the iterative lens (all layer rows), the joint lens with uniform weights and with
optimized weights (200 Adam steps; --quick: 50). The forward pass is the eager model on the same
tokens; the traced graph's forward is reported too. Prints JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jetfx  # noqa: E402
from _report import emit  # noqa: E402 - tools/_report.py, next to this script
from jetfx import lens as L  # noqa: E402


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=L.PAPER_SENTENCE)
    ap.add_argument("--quick", action="store_true", help="one repetition, 50 optimizer steps")
    ap.add_argument("--ks", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    repeat = 1 if args.quick else 3
    steps = 50 if args.quick else 200
    model, tok = jetfx.load(args.model, progress=False)
    gm = jetfx.trace(model, args.text, tokenizer=tok)
    ids = tok(args.text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(ids)
        forward = _best(lambda: model(ids), max(3, repeat))
        traced = _best(lambda: gm(ids), max(3, repeat))
    L.iterative_lens(gm, ids, 0)  # warm-up: builds and caches the decoder region
    result = {"model": args.model, "tokens": int(ids.shape[1]), "threads": torch.get_num_threads(),
              "forward_s": forward, "traced_forward_s": traced, "optimizer_steps": steps, "lenses": {}}
    for k in args.ks:
        runs = {
            "iterative": lambda: L.iterative_lens(gm, ids, k),
            "joint_uniform": lambda: L.joint_lens(gm, ids, k, weights="uniform"),
            "joint_optimized": lambda: L.joint_lens(gm, ids, k, weights="optimized", steps=steps),
        }
        for name, fn in runs.items():
            t = _best(fn, repeat)
            result["lenses"][f"{name}_k{k}"] = {"seconds": round(t, 4), "ratio_to_forward": round(t / forward, 2)}
            print(f"{name:16s} k={k}: {t:.3f} s = {t / forward:.1f} forward passes", file=sys.stderr, flush=True)
    emit(result, args.out)


if __name__ == "__main__":
    main()
