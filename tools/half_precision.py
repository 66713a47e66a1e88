"""Jets of a half-precision model in float32 against jets in the model's own dtype (docs/devices.md).

    python tools/half_precision.py [--arch llama] [--ks 1 2]

A tiny random-init model (tests/tiny_models.py) in bfloat16 and float16, expanded through ≤ 1 block
with jets in float32 (the default) and in the model's dtype, each compared with float64 jets of the
same weights: the largest per-path error (relative to the path's largest value) and the exactness
of Σ paths + remainder = logits (relative to the largest logit). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import jetfx  # noqa: E402
from jetfx import paths as P  # noqa: E402
from tiny_models import hf_model, tokens  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--ks", type=int, nargs="*", default=[1, 2])
    args = ap.parse_args(argv)
    rows = []
    ids = tokens()
    for dtype in (torch.bfloat16, torch.float16):
        model = hf_model(args.arch, dtype=dtype)
        gm = jetfx.trace(model, ids)
        g64 = jetfx.trace(model, ids, dtype=torch.float64)
        for k in args.ks:
            with torch.no_grad():
                ref = jetfx.expand(g64, k, paths=P.max_blocks(1))(ids)
            for jets in (torch.float32, dtype):
                gm.jetfx.jet_dtype = jets
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = jetfx.expand(gm, k, paths=P.max_blocks(1))(ids)
                err = (out.stacked.double() - ref.stacked).abs().amax(dim=(1, 2, 3)) / ref.stacked.abs().amax(dim=(1, 2, 3))
                rows.append({"model": str(dtype).replace("torch.", ""), "jets": str(jets).replace("torch.", ""), "k": k,
                             "max_path_error": float(err.max()), "median_path_error": float(err.median()),
                             "identity_error": out.relative_error(), "eps": torch.finfo(dtype).eps})
            gm.jetfx.jet_dtype = None
    print(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
