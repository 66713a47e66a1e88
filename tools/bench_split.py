"""Benchmark split jets: mixed Taylor coefficients by interpolation vs nested jvp, and the interaction view.

    .venv/bin/python tools/bench_split.py [--threads 2]

Prints JSON, for SmolLM2-135M (the built-in model), 9 tokens, batch 1, float32:

- mixed: for one attention and one MLP block and multiplicity patterns m (degree d = |m|, s
  directions), the time of one split part D^d γ(x)[u^m]/m! by `MixedJet` (univariate Taylor passes
  at the interpolation points, batched) and by nested `torch.func.jvp` (d nested jvps along the
  directions), each as a ratio to one forward of the block; `nested_over_mixed` side by side.
- view: `jetfx.interactions` over all blocks (every degree-1 cross term), as a ratio to one model
  forward, and the number of cross terms.

Times are medians of repeats under `torch.no_grad()` (nested jvp needs no grad either).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings

import torch


def timeit(fn, min_time=0.4, max_reps=30, min_reps=3):
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def nested(f, x, dirs):
    if not dirs:
        return f(x)
    return torch.func.jvp(lambda z: nested(f, z, dirs[1:]), (x,), (dirs[0],))[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import jetfx
    from jetfx.functions import block_region, capture
    from jetfx.interactions import interactions
    from jetfx.passes.mixed import MixedJet, interpolation_row

    model, tok = jetfx.load()
    text = "The capital of France is the city of"
    gm = jetfx.trace(model, text, tokenizer=tok)
    ids = jetfx.tracing.as_tokens(text, tok)
    out = {"model": "smollm2-135m", "tokens": int(ids.shape[1]), "threads": args.threads, "mixed": {}, "view": {}}
    picks = {}
    for b in gm.residual.blocks:
        picks.setdefault(b.kind, b)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for kind, b in picks.items():
            region = block_region(gm, b)
            vals = capture(gm, ids, [b.input, *region.side_inputs])
            x, side = vals[b.input], [vals[s] for s in region.side_inputs]
            f = lambda z: region.module(z, *side)  # noqa: E731
            fwd = timeit(lambda: f(x))
            rows = {}
            for mult in [(1,), (2,), (1, 1), (3,), (2, 1), (1, 1, 1)]:
                dirs = [torch.randn(x.shape, generator=g) * x.std() for _ in mult]
                full = [d for d, m in zip(dirs, mult) for _ in range(m)]
                mj = MixedJet(region.module, mult)
                stacked = torch.stack(dirs).unsqueeze(0)
                t_mixed = timeit(lambda: mj(x.unsqueeze(0), stacked, *side))
                t_nested = timeit(lambda: nested(f, x, full))
                got = mj(x.unsqueeze(0), stacked, *side)[0]
                want = nested(f, x, full) / math.prod(map(math.factorial, mult))
                rows[str(mult)] = {
                    "degree": sum(mult), "passes": len(interpolation_row(mult)),
                    "mixed_x_fwd": round(t_mixed / fwd, 2), "nested_x_fwd": round(t_nested / fwd, 2),
                    "nested_over_mixed": round(t_nested / t_mixed, 2),
                    "rel_diff": float((got - want).abs().max() / want.abs().max()),
                }
            out["mixed"][b.name] = {"forward_ms": round(fwd * 1e3, 3), "parts": rows}
        t_model = timeit(lambda: gm(ids))
        t = time.perf_counter()
        m = interactions(gm, ids, progress=False)
        t_view = time.perf_counter() - t
    out["view"] = {"model_forward_ms": round(t_model * 1e3, 1), "seconds": round(t_view, 1),
                   "cross_terms": len(m.records), "x_forward": round(t_view / t_model, 1),
                   "ms_per_cross_term": round(1e3 * t_view / len(m.records), 3)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
