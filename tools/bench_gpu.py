"""Every jetfx feature at 1B–8B scale on one device, as ratios to one forward pass of the same model.

    python tools/bench_gpu.py --device cuda --shape llama1b [--dtype bfloat16] [--out bench.json]
    python tools/bench_gpu.py --device cpu --shape tiny          # the same JSON in seconds, on a CPU

Models are random-init Llama models of real shapes (no downloads): `smollm2` (SmolLM2-135M: 30
layers, d = 576, V = 49152), `llama1b` (Llama-3.2-1B: 16 layers, d = 2048, V = 128256), `llama8b`
(Llama-3-8B: 32 layers, d = 4096, V = 128256; bfloat16 by default), and `tiny` for CPUs. Measured
side by side in one run, each on one batch of `--tokens` random ids (median of `--repeat` runs after
one warm-up run, which builds what is cached; its time is reported as `first_s`):

- forward: the eager model (the unit of every ratio) and the traced graph;
- iterative jet lens k = 1, 2; joint jet lens k = 1 with uniform weights and optimized (200 steps);
- exponential expansion k = 1 through ≤ 1 block (build time, run time), and the same module under
  `torch.compile` (compile time, run time, speed-up over eager, max difference to eager);
- split expansion of a small selection (three blocks, interactions of degree ≤ 1);
- full-vocabulary encoder→decoder bigrams (top-K 1000) as a ratio to the bare chunked V×d×V GEMM;
- peak GPU memory of each feature (`null` on a CPU).

`targets` holds the issue's targets on one GPU and whether each was met; `floors` the part of each
ratio that the unembedding GEMMs alone impose (FLOPs of U applied to every row or path over the
FLOPs of a forward pass): a ratio target below its floor cannot be met by any implementation that
returns those logits. Prints JSON (and writes it to `--out`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jetfx  # noqa: E402
from jetfx import lens as L  # noqa: E402
from jetfx import ngrams as N  # noqa: E402
from jetfx import paths as P  # noqa: E402
from jetfx import split as S  # noqa: E402

SHAPES = {
    # name: (layers, d, heads, kv heads, MLP width, vocabulary, tied embeddings, rope theta, default dtype)
    "tiny": (4, 64, 4, 2, 128, 512, True, 10000.0, "float32"),
    "smollm2": (30, 576, 9, 3, 1536, 49152, True, 100000.0, "float32"),
    "llama1b": (16, 2048, 32, 8, 8192, 128256, True, 500000.0, "float32"),
    "llama8b": (32, 4096, 32, 8, 14336, 128256, False, 500000.0, "bfloat16"),
}
TARGETS = {  # ratio to one forward pass (bigrams: to the bare GEMM), on one GPU
    "iterative_lens_k1": 3.0, "iterative_lens_k2": 4.0, "joint_lens_k1_optimized": 10.0,
    "expansion_k1": 3.0, "bigrams": 1.3,
}
GPU_MEMORY_BUDGET = 80 * 1024**3  # llama8b in bfloat16 must run every feature within one 80 GB GPU
FEATURES = ("forward", "iterative_lens", "joint_lens", "expansion", "compiled_expansion", "split_expansion", "bigrams")


def build_model(shape: str, dtype: torch.dtype, device: torch.device):
    import transformers

    layers, d, heads, kv, inter, vocab, tied, theta, _ = SHAPES[shape]
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048, rope_theta=theta,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs: no 32 GB host copy of the 8B model
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class Clock:
    """Wall-clock timing with the device synchronized around each run, and peak device memory."""

    def __init__(self, device: torch.device, repeat: int):
        self.device, self.repeat = device, repeat
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def peak_reset(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self):
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def run(self, fn, repeat: int | None = None) -> dict:
        """{first_s, median_s, peak_bytes}: the first call (builds caches, compiles), then the median."""
        self.peak_reset()
        self.sync()
        t = time.perf_counter()
        result = fn()
        self.sync()
        first = time.perf_counter() - t
        del result
        times = []
        for _ in range(self.repeat if repeat is None else repeat):
            self.sync()
            t = time.perf_counter()
            result = fn()
            self.sync()
            times.append(time.perf_counter() - t)
            del result
        return {"first_s": first, "median_s": statistics.median(times) if times else first, "peak_bytes": self.peak()}


def _ratio(entry: dict, unit: float) -> dict:
    entry["ratio"] = round(entry["median_s"] / unit, 3)
    entry["first_s"] = round(entry["first_s"], 4)
    entry["median_s"] = round(entry["median_s"], 5)
    return entry


def _flops(shape: str, tokens: int) -> dict:
    """Rough FLOP counts: a forward pass, and one unembedding of `tokens` positions."""
    layers, d, heads, kv, inter, vocab, *_ = SHAPES[shape]
    head = d // heads
    per_layer = 2 * tokens * (d * d + 2 * d * kv * head + d * d + 3 * d * inter) + 4 * tokens * tokens * d
    unembed = 2 * tokens * d * vocab
    return {"forward": layers * per_layer + unembed, "unembed": unembed}


def split_selection(gm) -> tuple[str, ...]:
    """Three blocks for the split expansion: the first MLP, a middle MLP, the last attention."""
    blocks = gm.residual.blocks
    mlps = [b.name for b in blocks if b.kind == "mlp"]
    attns = [b.name for b in blocks if b.kind == "attn"]
    return (mlps[0], mlps[len(mlps) // 2], attns[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default=None,
                    help="model dtype (default: bfloat16 for llama8b, float32 otherwise)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200, help="Adam steps of the optimized joint lens")
    ap.add_argument("--chunk-size", type=int, default=2048, help="source tokens per bigram chunk")
    ap.add_argument("--features", nargs="*", choices=FEATURES, default=list(FEATURES))
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (float32 models; off by default "
                    "in PyTorch): forward and features alike")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); on a shared "
                    "machine 1 avoids OpenMP threads waiting for each other")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False)")
    dtype = getattr(torch, args.dtype or SHAPES[args.shape][-1])
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    features = set(args.features) - ({"compiled_expansion"} if args.no_compile else set())
    clock = Clock(device, args.repeat)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    t = time.perf_counter()
    model = build_model(args.shape, dtype, device)
    built = time.perf_counter() - t
    layers, d, heads, kv, inter, vocab, tied, *_ = SHAPES[args.shape]
    ids = torch.randint(0, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(1)).to(device)
    result = {
        "shape": args.shape, "layers": layers, "d": d, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()), "tokens": args.tokens, "batch": 1,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "repeat": args.repeat,
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "model_build_s": round(built, 2), "features": {},
    }
    feats = result["features"]
    log(f"{args.shape} ({result['parameters'] / 1e9:.2f} B parameters, {result['dtype']}) on {result['device_name']}")

    with torch.no_grad():
        forward = clock.run(lambda: model(input_ids=ids, use_cache=False).logits)
        unit = forward["median_s"]
        feats["forward"] = _ratio(forward, unit)
        log(f"forward: {unit * 1e3:.2f} ms")
        t = time.perf_counter()
        gm = jetfx.trace(model, ids)
        clock.sync()
        result["trace_s"] = round(time.perf_counter() - t, 2)
        result["trace_relative_error"] = gm.jetfx.relative_error
        result["jet_dtype"] = str(jetfx.functions.jet_dtype(gm)).replace("torch.", "")
        feats["traced_forward"] = _ratio(clock.run(lambda: gm(ids)), unit)

        def measure(name, fn, quiet=False, **extra):
            try:
                entry = _ratio(clock.run(fn), unit)
            except torch.cuda.OutOfMemoryError as e:  # report, and go on with the next feature
                entry = {"error": f"out of memory: {str(e).splitlines()[0]}"}
                torch.cuda.empty_cache()
            entry.update(extra)
            feats[name] = entry
            if not quiet:
                log(f"{name}: {entry.get('ratio', entry.get('error'))}")
            return entry

        if "iterative_lens" in features:
            for k in (1, 2):
                measure(f"iterative_lens_k{k}", lambda k=k: L.iterative_lens(gm, ids, k))
        if "joint_lens" in features:
            measure("joint_lens_k1_uniform", lambda: L.joint_lens(gm, ids, 1, weights="uniform"))
            measure("joint_lens_k1_optimized", lambda: L.joint_lens(gm, ids, 1, weights="optimized", steps=args.steps),
                    steps=args.steps)
        if "expansion" in features or "compiled_expansion" in features:
            t = time.perf_counter()
            ex = jetfx.expand(gm, 1, paths=P.max_blocks(1))
            build = time.perf_counter() - t  # (every call also checks its exactness, as it does for users)
            eager = measure("expansion_k1", lambda: ex(ids), paths=len(ex.path_names), build_s=round(build, 2))
            out = ex(ids)
            eager["relative_error"] = out.relative_error()
            if "compiled_expansion" in features:
                ex.compile()
                entry = measure("compiled_expansion_k1", lambda: ex(ids), paths=len(ex.path_names))
                if "median_s" in entry and "median_s" in eager:
                    entry["compile_s"] = round(entry["first_s"] - entry["median_s"], 2)
                    entry["speedup_over_eager"] = round(eager["median_s"] / entry["median_s"], 3)
                    got = ex(ids)
                    scale = float(out.stacked.abs().max().clamp_min(1))
                    entry["max_difference_to_eager"] = float((got.stacked - out.stacked).abs().max()) / scale
                ex.compile(False)
            del ex, out
        if "split_expansion" in features:
            blocks = split_selection(gm)
            t = time.perf_counter()
            sx = jetfx.expand(gm, 1, split=True, paths=S.within(*blocks) & S.total_degree(max=1))
            build = time.perf_counter() - t
            measure("split_expansion_k1", lambda: sx(ids), paths=len(sx.path_names), blocks=list(blocks),
                    build_s=round(build, 2))
            del sx
        if "bigrams" in features:
            split = jetfx.functions.split_decoder(gm)
            W = split.unembedding
            H = torch.randn(vocab, d, device=device, generator=None).to(W.dtype)
            buf = torch.empty(args.chunk_size, vocab, device=device, dtype=W.dtype)

            def gemm():
                for i in range(0, vocab, args.chunk_size):
                    h = H[i:i + args.chunk_size]
                    torch.matmul(h, W.t(), out=buf[:h.shape[0]])
                return buf

            bare = clock.run(gemm, repeat=max(1, args.repeat // 2))
            feats["bigram_gemm"] = _ratio(bare, unit)
            entry = measure("bigrams", lambda: N.bigram_table(gm, "embed", top_k=1000, chunk_size=args.chunk_size,
                                                              progress=False), quiet=True)
            if "median_s" in entry:
                entry["ratio_to_forward"] = entry["ratio"]
                entry["ratio"] = round(entry["median_s"] / bare["median_s"], 3)
                entry["unit"] = "bare chunked V×d×V GEMM"
            log(f"bigrams: {entry.get('ratio', entry.get('error'))} × the GEMM")
            del H, buf

    flops = _flops(args.shape, args.tokens)
    rows = layers + 1  # the lens's rows at granularity "layer"
    result["floors"] = {  # ratio that the unembedding GEMMs alone impose
        "iterative_lens": round(rows * flops["unembed"] / flops["forward"], 2),
        "joint_lens": round(rows * flops["unembed"] / flops["forward"], 2),
        "expansion_k1": round((2 * layers + 1) * flops["unembed"] / flops["forward"], 2),
        "forward_gflop": round(flops["forward"] / 1e9, 2),
    }
    targets = {}
    for name, target in TARGETS.items():
        got = feats.get(name, {}).get("ratio")
        targets[name] = {"target": target, "ratio": got,
                         "met": None if got is None or device.type != "cuda" else bool(got <= target)}
    peaks = [f["peak_bytes"] for f in feats.values() if f.get("peak_bytes") is not None]
    result["peak_memory_bytes"] = max(peaks) if peaks else None
    targets["memory"] = {"budget_bytes": GPU_MEMORY_BUDGET, "peak_bytes": result["peak_memory_bytes"],
                         "met": None if not peaks else bool(max(peaks) <= GPU_MEMORY_BUDGET)}
    result["targets"] = targets
    if device.type != "cuda":
        result["note"] = "targets apply to one GPU: on a CPU the ratios are reported, not judged"
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main()
