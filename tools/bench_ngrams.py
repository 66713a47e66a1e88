"""Benchmark: full-vocabulary encoder→decoder bigram extraction (top-K=1000) on SmolLM2.

Prints JSON: wall time of `jetfx.ngrams.bigram_table` and of the bare V×d×V matmul (same run,
same chunking), their ratio, and peak memory above the loaded model. Memory method: peak process
RSS (resource.getrusage ru_maxrss, Linux KiB) can only grow, so the baseline is the RSS after
loading and tracing the model and after running the bare matmul is *not* used; instead a sampler
thread (psutil, 10 ms) records the max RSS during the extraction, minus the RSS right before it.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class Peak:
    def __init__(self):
        self.peak, self.stop = rss(), False
        self.t = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        while not self.stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.01)

    def __enter__(self):
        self.base = rss()
        self.t.start()
        return self

    def __exit__(self, *e):
        self.stop = True
        self.t.join()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--top-k", type=int, default=1000)
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--path", default="embed")
    args = ap.parse_args()
    import jetfx
    from jetfx import ngrams as N

    t0 = time.perf_counter()
    model, tok = jetfx.load(args.model)
    gm = jetfx.trace(model, torch.tensor([[1, 2, 3]]), tokenizer=tok)
    load_s = time.perf_counter() - t0
    ev = N.PathEvaluator(gm, args.path)
    W = ev.decoder.W
    V, d = W.shape
    # bare matmul floor: the same V×d×V GEMM, chunked the same way
    E = torch.randn(V, d)
    out = torch.empty(args.chunk_size, V)
    t0 = time.perf_counter()
    for i in range(0, V, args.chunk_size):
        x = E[i:i + args.chunk_size]
        torch.matmul(x, W.t(), out=out[:x.shape[0]])
    matmul_s = time.perf_counter() - t0
    del E, out
    with Peak() as peak:
        t0 = time.perf_counter()
        table = N.bigram_table(gm, args.path, top_k=args.top_k, score="logprob", chunk_size=args.chunk_size,
                               progress=False)
        wall = time.perf_counter() - t0
    res = {"model": args.model, "path": args.path, "vocab": V, "d": d, "top_k": args.top_k,
           "chunk_size": args.chunk_size, "threads": torch.get_num_threads(), "load_trace_s": round(load_s, 2),
           "matmul_s": round(matmul_s, 2), "extract_s": round(wall, 2), "ratio": round(wall / matmul_s, 3),
           "peak_rss_above_model_mb": round((peak.peak - peak.base) / 2**20, 1),
           "memory_method": "psutil RSS sampled every 10 ms during extraction, minus RSS before it",
           "top3": [(r[1], r[2], round(r[4], 4)) for r in table.top[:3]]}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
