"""Benchmark Taylor-mode jets against nested forward AD and the double-backward trick.

    .venv/bin/python tools/bench_jets.py [--threads 1] [--reps 5] [--quick] [--lens]

Prints JSON on stdout and a summary table on stderr. For SmolLM2-135M and a random-init GPT-2
(small sizes; 12 layers, 2 with --quick), at the first attention and the first MLP block:

- block: N centers (default 2), batch 1, `--tokens` tokens (default 9); for k = 1..4 the time of
  J^k by Taylor mode, nested jvp (`NestedJet`) and double backward
  (`jet_coefficients_double_backward`, one center at a time), as ratios to a forward pass of the
  block at the same N centers (`x_forward`, the k = 0 jet) and at one center (`x_forward1`);
- sizes: the Taylor ratio `x_forward1` for k = 1, 2, 4 at 8, 64 and 512 tokens (`--sizes`), so the
  per-op overhead of small inputs is visible;
- summary: every `x_forward1` against the targets (k = 1 ≤ 3×, k = 2 ≤ 5×, k = 4 ≤ 12×);
- lens (with --lens): an iterative jet lens over all layers: J^k of every block at its stream
  input, evaluated at input + small delta, one center each; as ratios to one forward of the model.

The Taylor jet and the forwards it is compared with are timed in alternation (rounds of one
sample each; a sample is one untimed call, then consecutive calls lasting about 2 ms, averaged:
each function in the steady state of repeated calls, its weights in cache), and each ratio is the
median over at least `--reps` rounds (default 5) of the ratio within a round: a machine whose
speed drifts during the run moves both sides of a ratio together. Other figures are medians of
at least `--reps` timed calls. All after two warm-up calls,
under `torch.no_grad()` (double backward enables grad itself); the batched graphs of the jets and
of the N-center forward are traced first (`BatchedGraph.trace`: the steady state of repeated
calls; `first_call_s` and `trace_s` report the one-off costs). Wall-clock times: run it on a
quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

TARGETS = {1: 3.0, 2: 5.0, 4: 12.0}  # Taylor jet at 2 centers / one single-center forward


def timeit(fn, reps=5, min_time=0.2, max_reps=50):
    """Median wall time of at least `reps` calls (more while under `min_time`), after 2 warm-ups."""
    fn()
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns: dict, reps=5, min_time=0.2, max_reps=50, sample_s=2e-3):
    """Time several functions in alternation: rounds of one sample each (a sample: one untimed
    call, then consecutive calls lasting about `sample_s`, averaged — each function is timed in the
    steady state of repeated calls, as when it is timed alone), at least `reps` rounds (more while
    under `min_time`).

    Returns (median seconds per call of each function, median over rounds of each function's
    time over the first function's). A machine that slows down or speeds up during the run moves
    both sides of a ratio together: the ratio of one round compares calls made side by side.
    """
    for fn in fns.values():
        fn()
        fn()
    inner = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        inner[name] = max(1, min(50, int(sample_s / max(time.perf_counter() - t, 1e-7))))
    samples = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < reps or (time.perf_counter() - start < min_time and rounds < max_reps):
        for name, fn in fns.items():
            fn()  # untimed: the other function's call may have evicted this one's weights from cache
            t = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - t) / inner[name])
        rounds += 1
    base = next(iter(fns))
    medians = {name: statistics.median(v) for name, v in samples.items()}
    ratios = {name: statistics.median(a / b for a, b in zip(v, samples[base])) for name, v in samples.items()}
    return medians, ratios


def _block_inputs(gm, ids, b, n_centers, gen):
    from jetfx.functions import block_region, capture

    region = block_region(gm, b)
    vals = capture(gm, ids, [b.input, *region.side_inputs])
    x = vals[b.input]
    side = [vals[s] for s in region.side_inputs]
    noise = torch.randn((n_centers - 1, *x.shape), generator=gen, dtype=x.dtype) * x.std() * 0.1
    centers = torch.cat([x.unsqueeze(0) * 0.5, x.unsqueeze(0) + noise])[:n_centers]
    return region, x, side, centers


def _picks(gm):
    picks = {}
    for b in gm.residual.blocks:
        picks.setdefault(b.kind, b)
    return picks


def bench_blocks(gm, ids, ks, n_centers, reps, quick, compare=True):
    """Per block kind: forward times and, per k, the Taylor jet's time and ratios (traced `gm`, inputs `ids`)."""
    from jetfx.jets import Evaluate, NestedJet, jet_coefficients_double_backward
    from jetfx.passes.taylor import TaylorJet

    gen = torch.Generator().manual_seed(0)
    mt = 0.05 if quick else 0.2
    out = {}
    for kind, b in _picks(gm).items():
        region, x, side, centers = _block_inputs(gm, ids, b, n_centers, gen)
        with torch.no_grad():
            ev = Evaluate(region.module)
            ev.batched.trace(centers, *side)
            medians, _ = interleaved({"forward1": lambda: region.module(x, *side),
                                      "forward": lambda: ev(centers, x, *side)}, reps, mt)
        t_fwd1, t_fwd = medians["forward1"], medians["forward"]
        entry = {"block": b.name, "forward_ms": round(t_fwd * 1e3, 3), "forward1_ms": round(t_fwd1 * 1e3, 3)}
        for k in ks:
            t0 = time.perf_counter()
            tj = TaylorJet(region.module, k)
            compile_s = time.perf_counter() - t0
            with torch.no_grad():
                t0 = time.perf_counter()
                tj(centers, x, *side)
                first_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                tj.batched.trace(centers, x, *side)  # what repeated calls would do after a while
                trace_s = time.perf_counter() - t0
                # the jet timed in alternation with both forwards: its ratios compare calls made side by side
                medians, ratios = interleaved({"forward1": lambda: region.module(x, *side),
                                               "forward": lambda: ev(centers, x, *side),
                                               "taylor": lambda: tj(centers, x, *side)}, reps, mt)
            t_taylor = medians["taylor"]
            e = {
                "taylor_ms": round(t_taylor * 1e3, 3),
                "x_forward": round(ratios["taylor"] / ratios["forward"], 2),
                "x_forward1": round(ratios["taylor"], 2),
                "compile_s": round(compile_s, 3),
                "first_call_s": round(first_s, 3),
                "trace_s": round(trace_s, 3),
            }
            if compare:
                nj = NestedJet(region.module, k)
                with torch.no_grad():
                    t_nested = timeit(lambda: nj(centers, x, *side), reps, mt, max_reps=reps)
                    e["max_abs_diff_vs_nested"] = float((tj(centers, x, *side) - nj(centers, x, *side)).abs().max())

                def dbl():
                    for c in centers.unbind(0):
                        jet_coefficients_double_backward(lambda z: region.module(z, *side), c, x, k)

                t_dbl = timeit(dbl, reps, mt, max_reps=reps)
                e.update({
                    "nested_ms": round(t_nested * 1e3, 3),
                    "nested_over_taylor": round(t_nested / t_taylor, 2),
                    "double_backward_ms": round(t_dbl * 1e3, 3),
                    "double_backward_over_taylor": round(t_dbl / t_taylor, 2),
                })
            entry[f"k{k}"] = e
        out[kind] = entry
    return out


def bench_lens(gm, ids, ks, reps, quick):
    """Iterative jet lens over all layers: J^k γ_b(h_s)(h_s + δ) for every block."""
    from jetfx.functions import block_region, capture
    from jetfx.jets import NestedJet
    from jetfx.passes.taylor import TaylorJet

    gen = torch.Generator().manual_seed(1)
    mt = 0.05 if quick else 0.2
    blocks = gm.residual.blocks
    regions = [block_region(gm, b) for b in blocks]
    names = [n for b, r in zip(blocks, regions) for n in (b.input, *r.side_inputs)]
    vals = capture(gm, ids, names)
    inputs = []
    for b, r in zip(blocks, regions):
        x = vals[b.input]
        inputs.append((x.unsqueeze(0), x + 0.01 * x.std() * torch.randn(x.shape, generator=gen, dtype=x.dtype),
                       [vals[s] for s in r.side_inputs]))
    result = {}
    with torch.no_grad():
        t_model = timeit(lambda: gm(ids), reps, mt)
    result["model_forward_ms"] = round(t_model * 1e3, 3)
    for k in ks:
        tjs = [TaylorJet(r.module, k) for r in regions]
        njs = [NestedJet(r.module, k) for r in regions]
        with torch.no_grad():
            t_taylor = timeit(lambda: [tj(c, y, *s) for tj, (c, y, s) in zip(tjs, inputs)], reps, mt, max_reps=reps)
            t_nested = timeit(lambda: [nj(c, y, *s) for nj, (c, y, s) in zip(njs, inputs)], reps, mt, max_reps=reps)
        result[f"k{k}"] = {
            "taylor_ms": round(t_taylor * 1e3, 3),
            "x_model_forward": round(t_taylor / t_model, 2),
            "nested_ms": round(t_nested * 1e3, 3),
            "nested_over_taylor": round(t_nested / t_taylor, 2),
        }
    return result


def summary(results):
    """One row per (model, tokens, block, k) with a target: the ratio and whether it is met."""
    rows = []
    for r in results:
        for label, blocks in [(r["tokens"], r["block"])] + [(int(t), v) for t, v in r.get("sizes", {}).items()]:
            for kind, entry in blocks.items():
                for k, target in TARGETS.items():
                    e = entry.get(f"k{k}")
                    if e is None:
                        continue
                    rows.append({"model": r["model"], "tokens": label, "block": entry["block"], "k": k,
                                 "x_forward1": e["x_forward1"], "target": target, "met": e["x_forward1"] <= target})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2-layer GPT-2, shorter timing loops, no size sweep")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, for stable timings)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per figure, at least (the median is reported)")
    p.add_argument("--centers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=9)
    p.add_argument("--sizes", type=int, nargs="*", default=[8, 64, 512], help="token counts for the size sweep")
    p.add_argument("--lens", action="store_true", help="also time an iterative jet lens over all layers")
    p.add_argument("--no-smollm", action="store_true")
    args = p.parse_args(argv)
    if args.reps < 5:
        p.error("--reps must be at least 5 (figures are medians of at least 5 calls)")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    import jetfx

    ks = [1, 2, 3, 4]
    started = time.perf_counter()
    out = {"torch": torch.__version__, "threads": args.threads, "device": "cpu", "quick": args.quick,
           "reps": args.reps, "results": []}
    gen = torch.Generator().manual_seed(0)
    models = []
    if not args.no_smollm:
        model, _ = jetfx.load("smollm2-135m")
        models.append(("smollm2-135m", model.eval(), 1000))
    cfg = transformers.GPT2Config(n_layer=2 if args.quick else 12)
    torch.manual_seed(0)
    models.append((f"gpt2-random-{cfg.n_layer}l", transformers.GPT2LMHeadModel(cfg).eval(), cfg.vocab_size))
    for name, model, vocab in models:
        ids = torch.randint(0, vocab, (1, args.tokens), generator=gen)
        gm = jetfx.trace(model, ids)  # dynamic batch and length: the size sweep reuses it
        blocks = bench_blocks(gm, ids, ks, args.centers, args.reps, args.quick)
        result = {"model": name, "layers": len({b.step for b in gm.residual.blocks}), "blocks": len(gm.residual.blocks),
                  "tokens": args.tokens, "centers": args.centers, "block": blocks, "sizes": {}}
        for n_tok in ([] if args.quick else args.sizes):
            ids_n = torch.randint(0, vocab, (1, n_tok), generator=gen)
            sized = bench_blocks(gm, ids_n, sorted(TARGETS), args.centers, args.reps, args.quick, compare=False)
            result["sizes"][str(n_tok)] = {
                kind: {"block": e["block"], "forward1_ms": e["forward1_ms"],
                       **{key: {"taylor_ms": v["taylor_ms"], "x_forward1": v["x_forward1"]} for key, v in e.items() if key.startswith("k")}}
                for kind, e in sized.items()}
        if args.lens:
            result["lens"] = bench_lens(gm, ids, ks, args.reps, args.quick)
        out["results"].append(result)
    out["summary"] = summary(out["results"])
    out["all_targets_met"] = all(row["met"] for row in out["summary"] if row["tokens"] == args.tokens)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, indent=1))
    print(f"threads={args.threads} reps={args.reps} centers={args.centers}: Taylor jet / one single-center forward",
          file=sys.stderr)
    for row in out["summary"]:
        flag = "ok" if row["met"] else ("MISSED" if row["tokens"] == args.tokens else "over (size sweep)")
        print(f"  {row['model']:<18} {row['tokens']:>4} tok  {row['block']:<22} k={row['k']}  "
              f"{row['x_forward1']:6.2f}x  (target {row['target']:g}x)  {flag}", file=sys.stderr)
    print(f"all targets met at {args.tokens} tokens: {out['all_targets_met']}  ({out['wall_s']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
