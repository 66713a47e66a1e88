"""Benchmark Taylor-mode jets against nested forward AD and the double-backward trick.

    .venv/bin/python tools/bench_jets.py [--quick] [--threads 1]

Prints JSON. For SmolLM2-135M and a random-init GPT-2 (small sizes; 12 layers, 2 with --quick):

- block: one attention and one MLP block, N centers (default 2), batch 1, 9 tokens; for k = 1..4
  the time of J^k by Taylor mode, nested jvp (`NestedJet`) and double backward
  (`jet_coefficients_double_backward`, one center at a time), as ratios to a forward pass of the
  block at the same N centers (`x_forward`, the k = 0 jet) and at one center (`x_forward1`);
- lens: an iterative jet lens over all layers: J^k of every block at its stream input, evaluated at
  input + small delta, one center each; Taylor and nested as ratios to one forward of the model.

Times are medians of repeats, under `torch.no_grad()` (double backward enables grad itself).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch


def timeit(fn, min_time=0.3, max_reps=50, min_reps=3):
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_model(name, model, ids, ks, n_centers, quick, with_lens=True):
    import jetfx
    from jetfx.functions import block_region, capture
    from jetfx.jets import Evaluate, NestedJet, jet_coefficients_double_backward
    from jetfx.passes.taylor import TaylorJet

    gm = jetfx.trace(model, ids)
    blocks = gm.residual.blocks
    result = {"model": name, "layers": len({b.step for b in blocks}), "blocks": len(blocks), "tokens": ids.shape[1],
              "centers": n_centers, "block": {}, "lens": {}}
    picks = {}
    for b in blocks:
        picks.setdefault(b.kind, b)
    gen = torch.Generator().manual_seed(0)
    mt = 0.15 if quick else 0.4
    for kind, b in picks.items():
        region = block_region(gm, b)
        vals = capture(gm, ids, [b.input, *region.side_inputs])
        x = vals[b.input]
        side = [vals[s] for s in region.side_inputs]
        noise = torch.randn((n_centers - 1, *x.shape), generator=gen, dtype=x.dtype) * x.std() * 0.1
        centers = torch.cat([x.unsqueeze(0) * 0.5, x.unsqueeze(0) + noise])[:n_centers]
        with torch.no_grad():
            t_fwd1 = timeit(lambda: region.module(x, *side), mt)
            ev = Evaluate(region.module)
            t_fwd = timeit(lambda: ev(centers, x, *side), mt)
        entry = {"block": b.name, "forward_ms": t_fwd * 1e3, "forward1_ms": t_fwd1 * 1e3}
        for k in ks:
            t0 = time.perf_counter()
            tj = TaylorJet(region.module, k)
            compile_s = time.perf_counter() - t0
            nj = NestedJet(region.module, k)
            with torch.no_grad():
                t_taylor = timeit(lambda: tj(centers, x, *side), mt)
                t_nested = timeit(lambda: nj(centers, x, *side), mt, max_reps=10)
                err = float((tj(centers, x, *side) - nj(centers, x, *side)).abs().max())

            def dbl():
                for c in centers.unbind(0):
                    jet_coefficients_double_backward(lambda z: region.module(z, *side), c, x, k)

            t_dbl = timeit(dbl, mt, max_reps=10)
            entry[f"k{k}"] = {
                "taylor_ms": round(t_taylor * 1e3, 3),
                "x_forward": round(t_taylor / t_fwd, 2),
                "x_forward1": round(t_taylor / t_fwd1, 2),
                "nested_ms": round(t_nested * 1e3, 3),
                "nested_over_taylor": round(t_nested / t_taylor, 2),
                "double_backward_ms": round(t_dbl * 1e3, 3),
                "double_backward_over_taylor": round(t_dbl / t_taylor, 2),
                "max_abs_diff_vs_nested": err,
                "compile_s": round(compile_s, 3),
            }
        result["block"][kind] = entry
    if not with_lens:
        return result
    # iterative jet lens over all layers: J^k γ_b(h_s)(h_s + δ) for every block
    regions = [block_region(gm, b) for b in blocks]
    names = [n for b, r in zip(blocks, regions) for n in (b.input, *r.side_inputs)]
    vals = capture(gm, ids, names)
    inputs = []
    for b, r in zip(blocks, regions):
        x = vals[b.input]
        inputs.append((x.unsqueeze(0), x + 0.01 * x.std() * torch.randn(x.shape, generator=gen, dtype=x.dtype),
                       [vals[s] for s in r.side_inputs]))
    with torch.no_grad():
        t_model = timeit(lambda: gm(ids), mt)
    result["lens"]["model_forward_ms"] = round(t_model * 1e3, 3)
    for k in ks:
        tjs = [TaylorJet(r.module, k) for r in regions]
        njs = [NestedJet(r.module, k) for r in regions]
        with torch.no_grad():
            t_taylor = timeit(lambda: [tj(c, y, *s) for tj, (c, y, s) in zip(tjs, inputs)], mt, max_reps=20)
            t_nested = timeit(lambda: [nj(c, y, *s) for nj, (c, y, s) in zip(njs, inputs)], mt, max_reps=5, min_reps=2)
        result["lens"][f"k{k}"] = {
            "taylor_ms": round(t_taylor * 1e3, 3),
            "x_model_forward": round(t_taylor / t_model, 2),
            "nested_ms": round(t_nested * 1e3, 3),
            "nested_over_taylor": round(t_nested / t_taylor, 2),
        }
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2-layer GPT-2, shorter timing loops")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, for stable timings)")
    p.add_argument("--centers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=9)
    p.add_argument("--no-smollm", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    import jetfx

    ks = [1, 2, 3, 4]
    out = {"torch": torch.__version__, "threads": args.threads, "device": "cpu", "quick": args.quick, "results": []}
    gen = torch.Generator().manual_seed(0)
    if not args.no_smollm:
        model, tok = jetfx.load("smollm2-135m")
        ids = torch.randint(0, 1000, (1, args.tokens), generator=gen)
        out["results"].append(bench_model("smollm2-135m", model.eval(), ids, ks, args.centers, args.quick))
    cfg = transformers.GPT2Config(n_layer=2 if args.quick else 12)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=gen)
    out["results"].append(bench_model(f"gpt2-random-{cfg.n_layer}l", model, ids, ks, args.centers, args.quick))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
