"""Benchmark split jets: mixed Taylor coefficients by interpolation vs nested jvp, and the interaction view.

    .venv/bin/python tools/bench_split.py [--threads 2] [--device cuda] [--random-init] [--text …]

Prints JSON, for SmolLM2-135M (the built-in model; `--random-init`: the same shapes, random
weights, for machines without the weights), one text, batch 1, float32:

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
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_smollm2():
    """SmolLM2-135M's shapes with random weights (no download), and no tokenizer."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval(), None


def nested(f, x, dirs):
    if not dirs:
        return f(x)
    return torch.func.jvp(lambda z: nested(f, z, dirs[1:]), (x,), (dirs[0],))[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-init", action="store_true", help="SmolLM2's shapes with random weights")
    ap.add_argument("--text", default="The capital of France is the city of")
    ap.add_argument("--tokens", type=int, default=None, help="with --random-init: this many random tokens")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import jetfx
    from jetfx.functions import block_region, capture
    from jetfx.interactions import interactions
    from jetfx.passes.mixed import MixedJet, interpolation_row

    if args.random_init:
        model, tok = random_smollm2()
        ids = torch.randint(0, 49152, (1, args.tokens or 8), generator=torch.Generator().manual_seed(0))
        gm = jetfx.trace(model, ids)
    else:
        model, tok = jetfx.load()
        gm = jetfx.trace(model, args.text, tokenizer=tok)
        ids = jetfx.tracing.as_tokens(args.text, tok)
    gm = gm.to(args.device)
    ids = ids.to(args.device)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {args.threads} threads"
    out = {"model": "smollm2-135m" + (" (random init)" if args.random_init else ""), "tokens": int(ids.shape[1]),
           "device": device, "mixed": {}, "view": {}}
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
                dirs = [(torch.randn(x.shape, generator=g) * x.std().cpu()).to(x.device) for _ in mult]
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
