"""Where the time of a Taylor-mode block jet goes: op counts, CPU time, and the profiler's top ops.

    .venv/bin/python tools/profile_jets.py [--threads 1] [--k 1 2] [--centers 2] [--tokens 9] [--top 8]

For SmolLM2-135M's `layers.0.self_attn` and `layers.0.mlp` and a random-init GPT-2's `h.0.attn`
and `h.0.mlp` (`--blocks` to choose), prints JSON with, per block and k:

- ops: call_function nodes in the region (one forward), in the Taylor graph (one center), and in
  the batched graph traced through vmap for N centers (`jetfx.passes.batching`);
- cpu_ms: median time of one forward at one center, of the jet by vmap at every call (what
  `TaylorJet` did before the batched graph), and of the jet by the traced batched graph; the
  ratios to the forward. Process CPU time with one thread (`--clock`), so that other processes on
  a shared machine disturb the comparison less (caches are still shared: compare figures of one
  run); wall time with more threads, whose idle workers spin and count as CPU time;
- top: `torch.profiler`'s ops with the most self CPU time in the traced jet, per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch


CLOCK = time.process_time


def cpu_time(fn, reps):
    fn()
    fn()
    times = []
    for _ in range(reps):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return statistics.median(times)


def count_ops(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


def profile_block(region, x, side, centers, k, reps, top):
    from jetfx.passes.taylor import TaylorJet

    tj = TaylorJet(region, k)
    gm = tj.graph_module
    with torch.no_grad():
        t_fwd = cpu_time(lambda: region(x, *side), reps)
        t_vmap = cpu_time(lambda: torch.func.vmap(lambda z: tuple(gm(z, x, *side)))(centers), reps)
        tj.batched.trace(centers, x, *side)  # the steady state of repeated calls (tracing otherwise waits)
        t_jet = cpu_time(lambda: tj(centers, x, *side, coefficients=True), reps)
        graphs = [g for g in getattr(getattr(tj, "batched", None), "graphs", {}).values() if g is not None]
        entry = {
            "ops": {"forward": count_ops(region), "taylor_graph": count_ops(gm),
                    "batched_graph": count_ops(graphs[0]) if graphs else None},
            "cpu_ms": {"forward1": round(t_fwd * 1e3, 3), "jet_vmap": round(t_vmap * 1e3, 3),
                       "jet_traced": round(t_jet * 1e3, 3)},
            "x_forward1": {"jet_vmap": round(t_vmap / t_fwd, 2), "jet_traced": round(t_jet / t_fwd, 2)},
        }
        if top:
            from torch.profiler import ProfilerActivity, profile

            n = 20
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(n):
                    tj(centers, x, *side, coefficients=True)
            rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in rows)
            entry["top"] = [{"op": e.key, "calls": e.count // n, "self_us": round(e.self_cpu_time_total / n, 1),
                             "share": round(e.self_cpu_time_total / total, 3)} for e in rows[:top]]
    return entry


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--centers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=9)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--top", type=int, default=8, help="profiler rows per jet (0: no profiler)")
    p.add_argument("--blocks", nargs="+", default=["smollm2:layers.0.self_attn", "smollm2:layers.0.mlp",
                                                   "gpt2:h.0.attn", "gpt2:h.0.mlp"])
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="process CPU time (default with 1 thread) or wall time (default with more: "
                        "idle worker threads spin and count as CPU time)")
    args = p.parse_args(argv)
    global CLOCK
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    CLOCK = time.process_time if clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    import jetfx
    from jetfx.functions import block_region, capture

    gen = torch.Generator().manual_seed(0)
    traced = {}
    out = {"torch": torch.__version__, "threads": args.threads, "clock": clock, "centers": args.centers,
           "tokens": args.tokens, "blocks": {}}
    for spec in args.blocks:
        model_name, block_name = spec.split(":")
        if model_name not in traced:
            if model_name == "smollm2":
                model, _ = jetfx.load("smollm2-135m")
                vocab = 1000
            else:
                torch.manual_seed(0)
                cfg = transformers.GPT2Config(n_layer=2)
                model, vocab = transformers.GPT2LMHeadModel(cfg).eval(), cfg.vocab_size
            ids = torch.randint(0, vocab, (1, args.tokens), generator=gen)
            traced[model_name] = (jetfx.trace(model.eval(), ids), ids)
        gm, ids = traced[model_name]
        block = next(b for b in gm.residual.blocks if b.name == block_name)
        region = block_region(gm, block)
        vals = capture(gm, ids, [block.input, *region.side_inputs])
        x = vals[block.input]
        side = [vals[s] for s in region.side_inputs]
        centers = torch.stack([x * (0.5 + 0.25 * i) for i in range(args.centers)])
        for k in args.k:
            out["blocks"][f"{spec} k={k}"] = profile_block(region.module, x, side, centers, k, args.reps, args.top)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
