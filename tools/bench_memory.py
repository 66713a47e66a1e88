"""Peak memory of one call of an expanded module against the size of what it returns.

    .venv/bin/python tools/bench_memory.py [--k 1] [--blocks 2] [--out bench_memory.json]

Every path's logits are returned, (N, B, T, V): on SmolLM2 the 1,831 paths through ≤ 2 blocks
hold 360 MB per token. That output is the least a call must hold; this measures how much more it
holds: the first call (which also traces the jets' batched graphs) and a second one, each from the
kernel's peak resident set reset before the call; the figures are (peak − resident set before the
call) / output bytes: 1.0 would be the output alone (memory a call reuses from the allocator can
make it read less). `--exported`: the same for the module reloaded from `jetfx.export`. Prints
JSON (also written to --out).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jetfx  # noqa: E402
from _report import emit  # noqa: E402 - tools/_report.py, next to this script
from jetfx import paths as P  # noqa: E402

DEMO = "The capital of France is"
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident() -> int:
    """This process's resident set in bytes (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def _high_water_mark() -> int:
    """The peak resident set since the last reset (VmHWM), in bytes."""
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def peak_during(fn) -> tuple[int, int, object]:
    """(resident set before, its peak while `fn` ran, fn's result): the kernel's high-water mark,
    reset just before the call (`/proc/self/clear_refs`), so no sampling can miss a short peak."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident set
    before = resident()
    result = fn()
    return before, _high_water_mark(), result


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=2, help="paths through at most this many blocks")
    ap.add_argument("--text", default=DEMO)
    ap.add_argument("--exported", action="store_true",
                    help="measure the module reloaded from `jetfx.export` (`jetfx.load_expanded`) instead")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model, tok = jetfx.load(args.model, progress=False)
    gm = jetfx.trace(model, args.text, tokenizer=tok)
    ex = jetfx.expand(gm, k=args.k, paths=P.max_blocks(args.blocks), max_paths=100_000)
    ids = tok(args.text, return_tensors="pt").input_ids
    if args.exported:
        with tempfile.TemporaryDirectory() as folder:
            jetfx.export(ex, Path(folder) / "bench.jetfx.zip", example_tokens=ids)
            ex = jetfx.load_expanded(Path(folder) / "bench.jetfx.zip")
        gc.collect()
    with torch.no_grad():
        calls = []
        for _ in range(2):
            before, peak, out = peak_during(lambda: ex(ids))
            calls.append((before, peak))
            if len(calls) < 2:
                del out
    output = sum(t.numel() * t.element_size() for t in (out.stacked, out.remainder, out.logits))
    emit({"model": args.model, "exported": args.exported, "k": args.k, "paths": len(ex.path_names),
          "tokens": int(ids.numel()),
          "output_bytes": output, "calls": [{"resident_before": b, "resident_peak": p} for b, p in calls],
          "first_call_peak_over_output": round((calls[0][1] - calls[0][0]) / output, 3),
          "second_call_peak_over_output": round((calls[1][1] - calls[1][0]) / output, 3),
          "command": " ".join(["tools/bench_memory.py", *(sys.argv[1:] if argv is None else argv)])}, args.out)


if __name__ == "__main__":
    main()
