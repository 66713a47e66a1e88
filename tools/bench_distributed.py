"""Benchmark: `jetfx ngrams` over torch.distributed ranks, and a cost model of full-vocabulary trigrams.

    .venv/bin/python tools/bench_distributed.py [--model smollm2-135m] [--procs 1 2] [--skip-trigram]

Prints JSON:

- cpu: the full-vocabulary bigram table of `--path` (default `embed`, top-K 1000) computed by
  `torchrun --standalone --nproc-per-node N -m jetfx ngrams` for N in `--procs`, one thread a process
  (OMP_NUM_THREADS=1): the job's own time (the `computed … in T s` line: from the end of loading to
  the last commit), the wall time of the whole command (with start-up and loading), the speed-up
  and efficiency of the largest N over 1, and whether every database holds the same rows (ids
  equal, scores within 1e-5) as the one-process run.
- gpu: the same with `--device cuda` (NCCL), one and min(2, GPUs) processes; skipped with a note
  when no CUDA device is visible.
- trigram_model: the cost of full-vocabulary trigrams through every head, per context and in all
  (FLOPs, bytes, hours on K GPUs at an assumed sustained rate), for the model benchmarked and for a
  Llama-3-8B-shaped model; checked against the measured time of a few trigram chunks (1 first token
  × the whole vocabulary each) and of a bigram chunk on this machine, predicted from the rate of
  the same GEMM measured here (`measured_over_predicted`), and the measured chunks extrapolated to
  every head's V² contexts on 1, 2 and 128 one-thread CPU processes.

The cost of a trigram context, as jetfx computes it (TrigramKernel): the attention block of the
head on 2 positions (all heads' projections are computed, then masked: 2T·d·(d_q + 2·d_kv) +
2T·d_q·d), the pruning bound over G ≈ √V balls (2·d·G), and for the fraction f of contexts whose
bound reaches the K-th best, the unembedding (2·d·V) and the log-normalizer (~6V). f is measured
on the first chunks (their threshold starts at −∞, so this over-estimates later chunks); f = 1 is
the exhaustive search.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = {"vocab": 128256, "d": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "head_dim": 128}


def sig(x: float, digits: int = 3) -> float:
    """x to `digits` significant digits (hours and seconds span many orders of magnitude)."""
    return float(f"{x:.{digits}g}") if x else 0.0


def run_job(nproc: int, args, db: Path, device: str | None) -> dict:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun) if torchrun.exists() else "torchrun", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "jetfx", "ngrams", "--model", args.model, "--path", args.path, "--db", str(db), "--top-k",
           str(args.top_k), "--chunk-size", str(args.chunk_size), "--no-progress", "--print", "1"]
    if device:
        cmd += ["--device", device]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    m = re.search(r"jetfx: (\d+) chunks? computed by (.+?) in ([\d.]+) s", proc.stderr)
    if proc.returncode != 0 or not m:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"procs": nproc, "chunks": int(m[1]), "group": m[2], "job_s": float(m[3]), "wall_s": round(wall, 2)}


def rows(db: Path) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT n.scope, n.rank, n.t1, n.t2, n.logit, n.logprob FROM ngrams n JOIN runs r "
                           "ON r.id = n.run WHERE r.status='done' ORDER BY n.scope, n.t1, n.rank, n.t2").fetchall()
    finally:
        con.close()


def same_rows(a: list, b: list, tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(x[:4] == y[:4] and abs(x[4] - y[4]) <= tol and abs(x[5] - y[5]) <= tol
                                    for x, y in zip(a, b))


def scaling(args, device: str | None, procs: list[int]) -> dict:
    out = {"device": device or "cpu", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        dbs = {}
        for n in procs:
            dbs[n] = Path(tmp) / f"ngrams_{n}.sqlite"
            out["runs"].append(run_job(n, args, dbs[n], device))
        one, many = out["runs"][0], out["runs"][-1]
        out["seconds_per_chunk_one_process"] = sig(one["job_s"] / one["chunks"])
        if len(procs) < 2:
            out["scaling"] = "needs 2 devices: one run only"
            return out
        out["speedup_job"] = round(one["job_s"] / many["job_s"], 3)
        out["speedup_wall"] = round(one["wall_s"] / many["wall_s"], 3)
        out["efficiency"] = round(out["speedup_job"] / (many["procs"] / one["procs"]), 3)
        base = rows(dbs[procs[0]])
        out["same_rows_as_one_process"] = all(same_rows(base, rows(dbs[n])) for n in procs[1:])
        out["rows_compared"] = len(base)
    return out


def gemm_rate(m: int, d: int, v: int, device: str = "cpu") -> float:
    """FLOP/s of an (m, d) @ (d, v) float32 GEMM here (median of a few)."""
    a, w = torch.randn(m, d, device=device), torch.randn(v, d, device=device)
    out = torch.empty(m, v, device=device)
    torch.matmul(a, w.t(), out=out)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        torch.matmul(a, w.t(), out=out)
        times.append(time.perf_counter() - t)
    return 2 * m * d * v / sorted(times)[1]


def context_cost(shape: dict, f: float) -> dict:
    """FLOPs and bytes of one trigram context through one head (see the module docstring)."""
    V, d, hd = shape["vocab"], shape["d"], shape["head_dim"]
    dq, dkv, T = shape["heads"] * hd, shape["kv_heads"] * hd, 2
    G = max(1, int(math.sqrt(V)))
    head = 2 * T * d * (dq + 2 * dkv) + 2 * T * dq * d
    flops = head + 2 * d * G + f * (2 * d * V + 6 * V)
    # bytes: U read once per group of 256 evaluated contexts, the logits written and read ~4 times,
    # the block's weights once per batch of 4096 contexts, activations
    weights = 4 * (d * (dq + 2 * dkv) + dq * d)
    nbytes = f * V * (4 * d / 256 + 16) + weights / 4096 + 4 * d * T * 12
    return {"flops": flops, "bytes": nbytes, "head_flops": head}


def job_cost(shape: dict, f: float, gpus: list[int], tflops: float, tbps: float) -> dict:
    heads = shape["layers"] * shape["heads"]
    contexts = heads * shape["vocab"] ** 2
    c = context_cost(shape, f)
    per_context_s = max(c["flops"] / (tflops * 1e12), c["bytes"] / (tbps * 1e12))
    return {"f": f, "head_paths": heads, "contexts": contexts, "flops": contexts * c["flops"],
            "bytes": contexts * c["bytes"], "bound": "compute" if c["flops"] / (tflops * 1e12) >= c["bytes"] / (tbps * 1e12) else "memory",
            "hours": {str(k): sig(contexts * per_context_s / k / 3600) for k in gpus}}


def trigram_model(args) -> dict:
    import jetfx
    from jetfx import ngrams as N

    torch.set_num_threads(1)  # one thread, as each rank of the scaling runs
    model, tok = jetfx.load(args.model)
    gm = jetfx.trace(model, torch.tensor([[1, 2, 3]]), tokenizer=tok)
    cfg = model.config
    shape = {"vocab": cfg.vocab_size, "d": cfg.hidden_size, "layers": cfg.num_hidden_layers,
             "heads": cfg.num_attention_heads, "kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
             "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads}
    path = f"{gm.residual.blocks[0].name}:h0"
    kernel = N.TrigramKernel(gm, path, top_k=args.top_k)
    V, d = shape["vocab"], shape["d"]
    everything = torch.arange(V)
    running = N.RunningTopK(args.top_k, 3, "cpu")
    chunks = []
    for first in range(args.trigram_chunks):
        t = time.perf_counter()
        got = kernel((torch.tensor([first]), everything), running)
        seconds = time.perf_counter() - t
        running.add(got.scores[:, 0], got.ids, got.scores)
        f = got.evaluated / got.contexts
        cost = context_cost(shape, f)
        chunks.append({"first_token": first, "contexts": got.contexts, "evaluated": got.evaluated, "f": round(f, 4),
                       "seconds": sig(seconds), "flops": got.contexts * cost["flops"]})
    rate_eval = gemm_rate(256, d, V)  # the unembedding of a group of 256 contexts
    rate_head = gemm_rate(4096 * 2, d, shape["heads"] * shape["head_dim"])  # the block's projections
    for c in chunks:
        cost = context_cost(shape, c["f"])
        head_s = c["contexts"] * cost["head_flops"] / rate_head
        rest_s = c["contexts"] * (cost["flops"] - cost["head_flops"]) / rate_eval
        c["predicted_s"] = sig(head_s + rest_s)
        c["measured_over_predicted"] = round(c["seconds"] / (head_s + rest_s), 2)
    f_seen = sum(c["evaluated"] for c in chunks) / sum(c["contexts"] for c in chunks)
    ratios = sorted(c["measured_over_predicted"] for c in chunks)
    seconds_per_context = sum(c["seconds"] for c in chunks) / sum(c["contexts"] for c in chunks)
    contexts = shape["layers"] * shape["heads"] * V ** 2
    gpus = [1, 8, 64, 512]
    out = {"path_measured": path, "shape": shape, "cpu_gemm_gflops": {"unembed_256": round(rate_eval / 1e9, 1),
                                                                       "projections": round(rate_head / 1e9, 1)},
           "chunks": chunks,
           "measured_over_predicted_median": ratios[len(ratios) // 2],
           # the measured chunks extrapolated to every head's V² contexts, on this machine's CPU
           # processes of one thread (the paper used 128 CPU servers)
           "cpu_hours_from_measured_chunks": {str(k): sig(contexts * seconds_per_context / k / 3600)
                                              for k in (1, 2, 128)},
           "assumed_gpu": {"tflops_fp32": args.gpu_tflops, "tb_per_s": args.gpu_tbps,
                           "note": "sustained rates assumed for one GPU (fp32 without TF32); pass --gpu-tflops "
                                   "/ --gpu-tbps for your cards"}}
    for name, sh in ((args.model, shape), ("llama-3-8b-shaped", LLAMA3_8B)):
        out[name] = {"first_chunks_f": job_cost(sh, f_seen, gpus, args.gpu_tflops, args.gpu_tbps),
                     "exhaustive_f1": job_cost(sh, 1.0, gpus, args.gpu_tflops, args.gpu_tbps),
                     "heads_only_f0": job_cost(sh, 0.0, gpus, args.gpu_tflops, args.gpu_tbps)}
    # a bigram chunk: predicted from the GEMM rate, against the one-process run's seconds per chunk
    # (set by main: bigram_chunk_measured_s, bigram_measured_over_predicted)
    out["bigram_chunk_predicted_s"] = sig(2 * args.chunk_size * d * V / gemm_rate(args.chunk_size, d, V))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--path", default="embed")
    ap.add_argument("--top-k", type=int, default=1000)
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--trigram-chunks", type=int, default=2, help="trigram chunks to time (1 first token × V each)")
    ap.add_argument("--skip-trigram", action="store_true")
    ap.add_argument("--gpu-tflops", type=float, default=50.0)
    ap.add_argument("--gpu-tbps", type=float, default=3.0)
    args = ap.parse_args()
    result = {"model": args.model, "path": args.path, "top_k": args.top_k, "chunk_size": args.chunk_size,
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    result["cpu"] = scaling(args, None, args.procs)
    if torch.cuda.is_available():
        n = min(2, torch.cuda.device_count())
        result["gpu"] = scaling(args, "cuda", sorted({1, n}))
        result["gpu"]["name"] = torch.cuda.get_device_name(0)
    else:
        result["gpu"] = {"skipped": "no CUDA device visible (torch.cuda.is_available() is False); on a GPU machine "
                                    "this section runs the same job with --device cuda (NCCL), 1 and 2 processes"}
    if not args.skip_trigram:
        result["trigram_model"] = trigram_model(args)
        tm = result["trigram_model"]
        tm["bigram_chunk_measured_s"] = result["cpu"]["seconds_per_chunk_one_process"]
        tm["bigram_measured_over_predicted"] = round(tm["bigram_chunk_measured_s"] / tm["bigram_chunk_predicted_s"], 2)
    result["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
