"""The `jetfx` command.

    jetfx demo                       the main job on the built-in model, outputs in out/
    jetfx trace   [--model M]        residual structure and path count
    jetfx paths   [--max-blocks N] [--kinds mlp] [--through PAT] [--svg F]
    jetfx expand  --text "..." --k 1 [path filters] [--export F]
    jetfx lens    --text "..." --k 1 [--joint] --out DIR
    jetfx expand  --split --k 1 --max-degree 1 --interacts-with PAT   super-exponential (split) paths
    jetfx interactions --text "..." --out DIR [--blocks PAT]         degree-1 cross terms, heatmaps
    jetfx ngrams  --path embed --drop-self ;  jetfx diff A B ;  jetfx mass

`--model` defaults to the built-in `smollm2-135m` (offline; converted once, then cached).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from .cli_args import add_model_args, non_negative_int, positive_int, run_command

DEFAULT_TEXT = "The capital of France is"


def _filter_args(p):
    p.add_argument("--max-blocks", type=non_negative_int, default=None, help="paths through at most N blocks")
    p.add_argument("--kinds", nargs="*", default=None, help="only blocks of these kinds (attn, mlp, moe, mixer, other)")
    p.add_argument("--through", nargs="*", default=None, help="paths through blocks matching each pattern (h.3.*)")
    p.add_argument("--avoid", nargs="*", default=None, help="paths avoiding blocks matching the patterns")
    p.add_argument("--path", nargs="*", default=None, help="exactly these paths ('embed', 'h.0.attn>h.2.mlp')")


def _filter(args):
    from . import paths as P

    f = P.all_paths()
    if args.max_blocks is not None:
        f = f & P.max_blocks(args.max_blocks)
    if args.kinds:
        f = f & P.only_kinds(*args.kinds)
    if args.through:
        f = f & P.through(*args.through)
    if args.avoid:
        f = f & P.avoid(*args.avoid)
    if args.path:
        f = f & P.paths(*args.path)
    return f


def _load_and_trace(args, text: str | None = None):
    from .cli_args import load_model
    from .tracing import trace

    model, tokenizer = load_model(args)
    return model, tokenizer, trace(model, text or DEFAULT_TEXT, tokenizer=tokenizer)


def cmd_trace(args) -> int:
    _, _, gm = _load_and_trace(args)
    info = gm.jetfx
    print(f"{info.model_name} ({info.architecture}): vocabulary {info.vocab_size}, context {info.max_length}, "
          f"tied embeddings: {info.tied_embeddings}; traced graph {len(gm.graph.nodes)} nodes, "
          f"|traced − eager| = {info.max_abs_error:.2g}")
    print(gm.residual)
    return 0


def cmd_paths(args) -> int:
    from .cli_args import check_device
    from .files import check_output_file, write_atomic
    from .paths import PathGraph
    from .tracing import residual_of

    check_device(args)
    if args.svg:
        check_output_file(args.svg, "--svg")
    f = _filter(args)  # bad filter flags fail before the model loads
    _, _, gm = _load_and_trace(args)
    graph = PathGraph(residual_of(gm))  # jetfx.path_graph(gm)
    n = graph.count(f)
    print(f"{graph.count():,} paths in all; the filter {f!r} selects {n:,}")
    if n == 0:  # nothing to list: never walk the (up to 2^L) prefixes looking for one
        print("no path passes every filter; relax --max-blocks / --kinds / --through / --avoid / --path")
    else:
        shown = 0
        for p in graph.iter_paths(f):
            if shown == args.limit:
                break
            print(" ", p.name)
            shown += 1
        if n > shown:
            print(f"… ({n - shown:,} more; --limit to show more)")
    if args.svg:
        selected = list(graph.iter_paths(f)) if 0 < n <= 2000 else None
        write_atomic(args.svg, graph.render(selected=selected))
        print(f"wrote {args.svg}" + ("" if selected or n == 0 else f" ({n:,} paths: too many to highlight)"))
    return 0


def cmd_expand(args) -> int:
    import torch

    from . import split as S
    from .cli_args import check_device
    from .expansion import expand
    from .tracing import as_tokens

    check_device(args)
    if args.split and args.origin:
        from .errors import ExpansionError

        raise ExpansionError("--origin (recenter=False) does not apply to split jets")
    if args.export:
        from .export import _check_target  # the export's own checks (folder, foreign file), before computing

        _check_target(args.export, args.overwrite)
    f = _split_filter(args) if args.split else _filter(args)  # bad filter flags fail before the model loads
    _, tokenizer, gm = _load_and_trace(args, args.text)
    t = time.time()
    if args.split:
        graph = S.SplitPathGraph(gm.residual, args.k)
        nonzero = f & S.exponential_centers() if args.weights == "exponential" else f
        print(f"split expansion at k={args.k}: {graph.describe()} split paths in all; the filter {f!r} selects "
              f"{graph.describe(f)}" + (f", {graph.describe(nonzero)} of them not identically 0 under "
                                         "weights='exponential'" if nonzero is not f else ""))
        ex = expand(gm, k=args.k, paths=f, max_paths=args.max_paths, jets=args.jets, split=True,
                          weights=args.weights)
    else:
        ex = expand(gm, k=args.k, paths=f, max_paths=args.max_paths, jets=args.jets, recenter=not args.origin)
    compile_s = time.time() - t
    if args.fit:
        from .weights import faithfulness, fit_weights

        before = faithfulness(ex, args.text)
        fit = fit_weights(ex, args.text, constraint=args.constraint, max_evals=args.fit_evals)
        after = faithfulness(ex, args.text)
        print(f"jet weights fitted on the text ({args.constraint}, {fit.parameters} parameters, {fit.evaluations} "
              f"evaluations, {fit.seconds:.1f} s): relative remainder ‖δ‖²/‖q‖² {fit.before_loss:.3g} → "
              f"{fit.loss:.3g}; Σ paths carry {before['paths_norm']:.3g} → {after['paths_norm']:.3g} of the logits' norm, cosine "
              f"{before['cosine']:.3f} → {after['cosine']:.3f}")
    ids = as_tokens(args.text, tokenizer).to(args.device)
    t = time.time()
    with torch.no_grad():
        out = ex(ids)
    run_s = time.time() - t
    print(f"k={args.k}: {len(out.names)} paths compiled in {compile_s:.1f} s, run in {run_s:.2f} s; "
          f"max |Σ paths + remainder − logits| = {out.max_error():.2e}")
    last = out.stacked[:, 0, -1]
    norms = last.norm(dim=-1)
    order = norms.argsort(descending=True)[: args.show]
    print(f"paths by the norm of their logits at the last position ({args.text!r}):")
    for i in order.tolist():
        top = int(last[i].argmax())
        print(f"  {out.names[i]:<50} |logits| {norms[i]:10.4g}  top token {tokenizer.decode([top])!r}")
    r = out.remainder[0, -1]
    print(f"  {'remainder':<50} |logits| {r.norm():10.4g}  top token {tokenizer.decode([int(r.argmax())])!r}")
    if args.export:
        from .export import export

        export(ex, args.export, overwrite=args.overwrite)
        print(f"wrote {args.export}")
    from .expanded import exactness_tolerance

    rel = out.relative_error()
    if not rel <= exactness_tolerance(out.logits.dtype):
        print(f"jetfx: error: the expansion is not exact: Σ paths + remainder misses the logits by {rel:.3g} of their "
              f"scale (float rounding of path terms up to {float(out.stacked.abs().amax()):.3g}); use a lower --k",
              file=sys.stderr)
        return 3
    return 0


def _split_filter(args):
    from . import split as S
    from .errors import ExpansionError

    f = S.all_split_paths()
    if args.max_degree is not None:
        f = f & S.max_degree(args.max_degree)
    if args.max_interactions is not None:
        f = f & S.total_degree(max=args.max_interactions)
    if args.interacts_with:
        f = f & S.interacts_with(*args.interacts_with)
    if args.kinds:
        f = f & S.only_kinds(*args.kinds)
    if args.within:
        f = f & S.within(*args.within)
    if args.avoid:
        f = f & S.avoid(*args.avoid)
    for pattern in args.through or ():
        f = f & S.contains(pattern)
    if args.max_blocks is not None or args.path:
        raise ExpansionError("--max-blocks and --path select exponential paths; with --split use --within, --through, "
                             "--avoid, --kinds, --max-degree, --max-interactions, --interacts-with")
    return f


def cmd_interactions(args) -> int:
    from pathlib import Path

    from .cli_args import check_device
    from .files import check_output_folder
    from .interactions import CHECKPOINT, interactions

    check_device(args)
    out = check_output_folder(args.out, "--out")
    _, _, gm = _load_and_trace(args, args.text)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(out) / CHECKPOINT
    t = time.time()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="interrupted")  # said below, with what to do
        m = interactions(gm, args.text, position=args.position, blocks=args.blocks or None, checkpoint=checkpoint,
                         progress=not args.no_progress)
    if not m.complete:
        print(f"jetfx: interrupted; {len(m.blocks)} of {m.num_blocks} blocks saved in {checkpoint}, "
              "re-run the same command to resume", file=sys.stderr)
        return 130
    resumed = f", {m.resumed} of them from {checkpoint}" if m.resumed else ""
    print(f"{len(m.records):,} cross terms w·Dγ_l(x_i)[x_j] over {len(m.blocks)} blocks in {time.time() - t:.1f} s"
          f"{resumed} (position {m.position}, {m.tokens[m.position]!r}; top token {m.top_token!r})")
    print("largest by size ‖U·Dῡ·t‖ (effect on the top token's logit):")
    for r in m.top(args.show):
        print(f"  {r.block:<22} at {r.center:<22} along {r.direction:<22} {r.size:12.4g} ({r.effect:+.4g})")
    for name, path in m.save(out).items():
        print(f"wrote {path}")
    checkpoint.unlink(missing_ok=True)  # the outputs are whole: nothing left to resume
    return 0


def cmd_demo(args) -> int:
    from .cli_args import check_device
    from .demo import run_demo
    from .files import check_output_folder

    check_device(args)
    check_output_folder(args.out, "--out")
    return run_demo(args.out, model=args.model, device=args.device, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jetfx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job on the built-in model: structure, expansion, pictures, lens, bigrams")
    add_model_args(p, dtype=False)
    p.add_argument("--out", default="out", help="output folder (default out/)")
    p.add_argument("--quick", action="store_true", help="skip the slower steps (full-vocabulary bigrams)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("trace", help="trace a model and print its residual structure")
    add_model_args(p)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("paths", help="count, list and draw the paths of the exponential expansion")
    add_model_args(p)
    _filter_args(p)
    p.add_argument("--limit", type=non_negative_int, default=40, help="list at most this many paths")
    p.add_argument("--svg", default=None, help="write the path graph (selection highlighted) to this SVG file")
    p.set_defaults(func=cmd_paths)

    p = sub.add_parser("expand", help="compile a jet expansion, run it on a text, check exactness")
    add_model_args(p)
    _filter_args(p)
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--k", type=int, default=1, help="jet order (default 1)")
    p.add_argument("--max-paths", type=positive_int, default=512)
    p.add_argument("--jets", choices=("auto", "taylor", "nested"), default="auto")
    p.add_argument("--show", type=non_negative_int, default=12, help="print the N largest paths")
    p.add_argument("--export", default=None, help="save the expanded module to this file (.jetfx.zip; its folder must exist)")
    p.add_argument("--overwrite", action="store_true", help="with --export: replace a file that is not a jetfx export")
    p.add_argument("--split", action="store_true", help="split jet terms by degree and partners (super-exponential)")
    p.add_argument("--max-degree", type=non_negative_int, default=None, help="with --split: every split has degree ≤ N")
    p.add_argument("--max-interactions", type=non_negative_int, default=None, help="with --split: at most N interaction edges")
    p.add_argument("--interacts-with", nargs="*", default=None, help="with --split: interacts with matching blocks")
    p.add_argument("--within", nargs="*", default=None, help="with --split: every block (carried or interacting) matches")
    # jetfx.split.WEIGHTS, spelled out: the parser is built without importing torch
    p.add_argument("--weights", choices=("exponential", "uniform"), default="exponential",
                   help="with --split: jet weights 1/2^s on the paper's paths (default) or 1/N_s on every term")
    p.add_argument("--fit", action="store_true",
                   help="fit the jet weights on --text (UᵀU metric, see docs/weights.md) before running; --export keeps them")
    p.add_argument("--constraint", choices=("simplex", "affine"), default="simplex", help="with --fit: the weights' constraint")
    p.add_argument("--fit-evals", type=positive_int, default=100, help="with --fit: loss evaluations of the fit (default 100)")
    p.add_argument("--origin", action="store_true", help="jets around the origin (recenter=False, see docs/weights.md)")
    p.set_defaults(func=cmd_expand)

    p = sub.add_parser("interactions", help="degree-1 cross terms w·Dγ_l(x_i)[x_j] of one text: data and heatmaps")
    add_model_args(p)
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--position", type=int, default=-1, help="token position to measure at (default: last)")
    p.add_argument("--blocks", nargs="*", default=None, help="receiving blocks (names or patterns; default all)")
    p.add_argument("--show", type=non_negative_int, default=12, help="print the N largest cross terms")
    p.add_argument("--out", default="out/interactions",
                   help="folder for JSON, CSV and SVG heatmaps (created if missing); an interrupted run resumes from it")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_interactions)

    from . import cli_lens, cli_ngrams  # (neither imports torch)

    cli_lens.add_parser(sub)
    cli_ngrams.add_parsers(sub)
    return parser


def main(argv=None) -> int:
    """Exit status: 0 done, 2 bad input (one line saying what to do), 1 an operating-system error
    (disk full, …), 130 interrupted (finished work is kept; re-running the command resumes)."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
