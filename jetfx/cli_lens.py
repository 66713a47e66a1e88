"""`jetfx lens`: jet lenses of a text, written as HTML, SVG and JSON.

    jetfx lens --text "The capital of France is" --k 1 --out out/
    jetfx lens --text "..." --k 2 --joint --weights optimized --out out/
    jetfx lens --corpus --out out/           # mean faithfulness over the shipped sentences, k = 0, 1, 2
"""

from __future__ import annotations

import json
from pathlib import Path

from .cli_args import add_model_args, non_negative_int, positive_int


def add_parser(subparsers):
    p = subparsers.add_parser("lens", help="iterative or joint jet lens of a text (HTML, SVG, JSON)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--text", help="the text to read through the lens")
    p.add_argument("--k", type=non_negative_int, default=1, help="jet order (0 = logit lens; default 1)")
    p.add_argument("--joint", action="store_true", help="joint jet lens (all layers at once) instead of iterative")
    p.add_argument("--weights", choices=("uniform", "optimized"), default="optimized",
                   help="joint lens weights (default optimized)")
    p.add_argument("--granularity", choices=("layer", "branch"), default="layer",
                   help="rows: transformer layers, or every attention/MLP block")
    p.add_argument("--layers", type=int, nargs="*", default=None,
                   help="rows to keep (default all; 0 = embedding); with --joint, each row's center is what the "
                        "stream gained since the previous chosen row")
    p.add_argument("--steps", type=non_negative_int, default=200, help="optimizer steps for --weights optimized")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=positive_int, default=5, help="top tokens per cell in the JSON")
    p.add_argument("--corpus", action="store_true",
                   help="average the iterative lens's faithfulness over the shipped sentences for k = 0, 1, 2")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from jetfx import lens as L
    from jetfx.cli_args import check_device, load_model
    from jetfx.errors import InputError
    from jetfx.files import check_output_folder
    from jetfx.tracing import trace

    if not args.corpus and (args.text is None or not args.text.strip()):
        raise InputError("--text is empty: give the text to read through the lens (or --corpus)")
    check_device(args)
    out = Path(check_output_folder(args.out, "--out"))  # before the model loads and the lens is computed
    model, tokenizer = load_model(args)
    first = args.text if args.text and args.text.strip() else L.sample_sentences()[0]
    gm = trace(model, first, tokenizer=tokenizer)
    written = {}
    if args.corpus:
        sentences = [args.text] if args.text and args.text.strip() else None
        result = L.corpus_faithfulness(gm, sentences, ks=(0, 1, 2), granularity=args.granularity)
        written.update({f"corpus_{k}": str(v) for k, v in result.save(out).items()})
        for k in result.ks:
            print(f"k={k}: mean cosine per row {', '.join(f'{c:.3f}' for c in result.cosine[k])}")
    else:
        if args.joint:
            result = L.joint_lens(gm, args.text, args.k, weights=args.weights, granularity=args.granularity,
                                  layers=args.layers, steps=args.steps, seed=args.seed)
        else:
            result = L.iterative_lens(gm, args.text, args.k, layers=args.layers, granularity=args.granularity)
        written.update({k: str(v) for k, v in result.save(out, n=args.top).items()})
        print(f"{result.kind} lens, k={result.k}: mean cosine {result.mean_cosine:.4f}, "
              f"top-1 agreement {result.mean_agreement:.3f}")
        if result.kind == "joint" and result.optimized_loss is not None:
            print(f"weight loss (relative squared error of the logits; 1 = predicting 0): uniform "
                  f"{result.uniform_loss:.4g}, optimized {result.optimized_loss:.4g}")
    print(json.dumps(written, indent=1))
    return 0


def main(argv=None) -> int:
    """Standalone use: `python -m jetfx.cli_lens lens ...` runs `jetfx lens ...` (same parser, same exit
    statuses; the other subcommands are the `jetfx` command's)."""
    import argparse

    from .cli_args import run_command

    parser = argparse.ArgumentParser(prog="jetfx")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return run_command(parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
