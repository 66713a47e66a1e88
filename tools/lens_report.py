"""Faithfulness of jet lenses on SmolLM2: mean cosine similarity and top-1 agreement per order k.

    .venv/bin/python tools/lens_report.py [--quick] [--out DIR]

For the paper's sentence ("new simple neural architecture, the Transformer") and the sample
sentences shipped in jetfx/data/sentences.txt: the iterative lens (averaged over layer rows and
also at the middle layer), the joint lens with uniform and with optimized weights, k = 0, 1, 2.
--quick uses the paper's sentence and the first 5 sample sentences and 100 optimizer steps.
With --out, the corpus line chart (SVG) and the paper sentence's joint-lens pictures are written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jetfx  # noqa: E402
from jetfx import lens as L  # noqa: E402


def report(gm, sentences, ks=(0, 1, 2), steps=200, granularity="layer") -> dict:
    rows = {}
    for k in ks:
        acc = {"iterative": [0.0, 0.0], "iterative_mid": [0.0, 0.0], "joint_uniform": [0.0, 0.0],
               "joint_optimized": [0.0, 0.0]}
        loss = [0.0, 0.0]
        for s in sentences:
            it = L.iterative_lens(gm, s, k, granularity=granularity)
            mid = len(it.rows) // 2
            acc["iterative"][0] += it.mean_cosine
            acc["iterative"][1] += it.mean_agreement
            acc["iterative_mid"][0] += float(it.cosine[mid].mean())
            acc["iterative_mid"][1] += float(it.agreement[mid].float().mean())
            for w in ("uniform", "optimized"):
                j = L.joint_lens(gm, s, k, weights=w, steps=steps, granularity=granularity)
                acc[f"joint_{w}"][0] += j.mean_cosine
                acc[f"joint_{w}"][1] += j.mean_agreement
                if w == "optimized":
                    loss[0] += j.uniform_loss
                    loss[1] += j.optimized_loss
        n = len(sentences)
        rows[f"k={k}"] = {name: {"cosine": round(c / n, 4), "top1": round(a / n, 4)} for name, (c, a) in acc.items()}
        rows[f"k={k}"]["weight_loss"] = {"uniform": round(loss[0] / n, 5), "optimized": round(loss[1] / n, 5)}
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model, tok = jetfx.load(args.model, progress=False)
    gm = jetfx.trace(model, L.PAPER_SENTENCE, tokenizer=tok)
    sample = L.sample_sentences()[:5] if args.quick else L.sample_sentences()
    steps = 100 if args.quick else 200
    t = time.time()
    out = {"model": args.model, "quick": args.quick, "optimizer_steps": steps,
           "paper_sentence": report(gm, [L.PAPER_SENTENCE], steps=steps),
           f"sample_sentences ({len(sample)})": report(gm, sample, steps=steps)}
    if args.out:
        folder = Path(args.out)
        corpus = L.corpus_faithfulness(gm, sample, ks=(0, 1, 2))
        out["corpus_files"] = {k: str(v) for k, v in corpus.save(folder).items()}
        out["corpus_cosine_per_layer"] = {str(k): [round(c, 3) for c in v] for k, v in corpus.cosine.items()}
        for k in (1, 2):
            L.joint_lens(gm, L.PAPER_SENTENCE, k, weights="optimized", steps=steps).save(folder, f"paper_joint_k{k}")
            L.iterative_lens(gm, L.PAPER_SENTENCE, k).save(folder, f"paper_iterative_k{k}")
    out["seconds"] = round(time.time() - t, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
