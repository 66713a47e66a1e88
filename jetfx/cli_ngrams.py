"""CLI subcommands for jet n-grams: `jetfx ngrams`, `jetfx diff`, `jetfx mass`.

`add_parsers(subparsers)` registers them; each sets `func` to its run function (args) -> int.
Every file argument is checked before the model is loaded; `jetfx ngrams` resumes an interrupted
run and reuses a finished one (see docs/ngrams.md).
"""

from __future__ import annotations

import json
import math
import sys

from .cli_args import add_model_args, non_negative_int, positive_float, positive_int, token_ids
from .ngram_db import TIMEOUT


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("ngrams", help="data-free jet bigram / trigram tables into an SQLite db")
    add_model_args(p, device_default=None)
    p.add_argument("--path", action="append", default=None,
                   help="'embed', a block ('layers.3.mlp'), 'mlps' (all MLP paths) or '<attn block>:h<head>' (trigram); repeatable")
    p.add_argument("--db", default="ngrams.sqlite", help="SQLite file (created if missing; its folder must exist)")
    p.add_argument("--top-k", type=non_negative_int, default=1000, help="global top-K n-grams to keep (default 1000)")
    p.add_argument("--per-context", type=non_negative_int, default=0, help="also keep the top N per source token")
    p.add_argument("--score", choices=("logprob", "logit"), default="logprob")
    p.add_argument("--drop-self", action="store_true", help="leave self-transitions v→v out of the rankings")
    p.add_argument("--chunk-size", type=positive_int, default=2048, help="source tokens per chunk (default 2048)")
    p.add_argument("--max-chunks", type=positive_int, default=None, help="stop after this many chunks (resume later)")
    p.add_argument("--first", type=token_ids, default=None, help="trigrams: comma-separated ids for v1 (default: all)")
    p.add_argument("--second", type=token_ids, default=None, help="trigrams: comma-separated ids for v2 (default: all)")
    p.add_argument("--recompute", action="store_true",
                   help="compute again even if the database holds a finished run with these settings")
    p.add_argument("--db-timeout", type=positive_float, default=TIMEOUT,
                   help=f"seconds to wait while another process writes the db (default {TIMEOUT:g})")
    p.add_argument("--print", dest="show", type=non_negative_int, default=30, help="print this many top rows per path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_ngrams)

    d = subparsers.add_parser("diff", help="compare the top-K n-grams of two runs (same vocabulary)")
    d.add_argument("--db", default="ngrams.sqlite", help="the n-gram database (it must exist)")
    d.add_argument("a", help="run id, or MODEL:PATH")
    d.add_argument("b", help="run id, or MODEL:PATH")
    d.add_argument("--limit", type=non_negative_int, default=20)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=run_diff)

    m = subparsers.add_parser("mass", help="cumulative bigram probability mass over pairs or keywords")
    add_model_args(m, device_default=None)
    m.add_argument("--path", default="embed")
    m.add_argument("--keywords", default=None, help="keyword file (default: the shipped neutral list)")
    m.add_argument("--pairs", default=None, help="file of 'v u' token id pairs, one a line ('#' comments)")
    m.add_argument("--keep-self", action="store_true")
    m.add_argument("--db", default=None, help="also record the index in this db")
    m.add_argument("--db-timeout", type=positive_float, default=TIMEOUT)
    m.set_defaults(func=run_mass)


def _trace(args):
    import torch

    import jetfx
    from .cli_args import load_model

    model, tok = load_model(args)
    ids = torch.tensor([[1, 2, 3]], device=next(model.parameters()).device)
    return jetfx.trace(model, ids, tokenizer=tok)


def _selection(first, second) -> str:
    """How a trigram run's contexts were restricted (part of what identifies the run)."""
    if first is None and second is None:
        return ""
    return json.dumps({"first": first, "second": second})


def _print_rows(rows) -> None:
    # the top log-probabilities can all lie within 1e-9 of 0 (P ≈ 1, e.g. v→v on tied embeddings):
    # %g keeps them apart, and P is then shown as 1 − (1 − P)
    for r in rows:
        arrow = " ".join(repr(t) for t in r["text"][:-1]) + " → " + repr(r["text"][-1])
        lp = r["logprob"]
        p = f"1-{-math.expm1(lp):.4g}" if lp > -1e-3 else f"{math.exp(lp):.4g}"
        print(f"{r['rank']:5d}  {arrow:<40}  logit {r['logit']:9.4f}  logP {lp:11.5g}  P {p}")


def run_ngrams(args) -> int:
    from . import ngrams as N
    from .errors import InputError
    from .ngram_db import NgramDB, RunInterrupted, extract

    NgramDB.check_file(args.db)  # before the model is loaded
    if args.top_k == 0 and args.per_context == 0:
        raise InputError("--top-k 0 and --per-context 0 keep nothing; give --top-k K and/or --per-context N")
    gm = _trace(args)
    paths = []
    for p in args.path or ["embed"]:
        paths += N.bigram_paths(gm)[1:] if p == "mlps" else [p]
    parsed = [N.parse_path(gm, p) for p in paths]  # every path checked before the first is computed
    for path in parsed:
        if path.n == 2 and (args.first is not None or args.second is not None):
            raise InputError(f"--first/--second restrict trigram contexts; {path.name} is a bigram path")
    if gm.jetfx.tied_embeddings and any(p.name == N.ENCODER_PATH for p in parsed) and not args.drop_self:
        print(f"note: {args.model} has tied embeddings (E = U): the 'embed' path is dominated by "
              "self-transitions v→v; --drop-self leaves them out", file=sys.stderr)
    out = []
    with NgramDB(args.db, timeout=args.db_timeout) as db:
        for done_before, path in enumerate(parsed):
            if path.n == 3:
                run_id, table = _trigrams(db, gm, path, args)
            else:
                try:
                    run_id, table = extract(db, gm, path.name, name=args.model, top_k=args.top_k,
                                            per_context=args.per_context, score=args.score, drop_self=args.drop_self,
                                            chunk_size=args.chunk_size, progress=not args.no_progress,
                                            max_chunks=args.max_chunks, recompute=args.recompute)
                except RunInterrupted as e:
                    earlier = f" ({done_before} earlier path{'s' if done_before != 1 else ''} complete)" if done_before else ""
                    print(f"jetfx: {e}{earlier}", file=sys.stderr)
                    return 130
                if table.reused:
                    print(f"run {run_id} ({args.model} {path.name}) is already complete in {args.db}: showing it "
                          "(--recompute computes it again)", file=sys.stderr)
                elif not table.complete:
                    print(f"run {run_id} ({path.name}): {table.chunks_done} of {table.num_chunks} chunks done; "
                          "run the same command again to resume", file=sys.stderr)
                    continue
                _note_other_chunk_sizes(db, run_id, path.name, args)
            rows = db.top(run_id, args.show)
            out.append({"run": run_id, "path": path.name, "top": rows})
            if not args.json:
                print(f"== run {run_id}: {args.model} {path.name} (top {len(rows)} by {table.score})")
                _print_rows(rows)
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


def _trigrams(db, gm, path, args):
    from . import ngrams as N

    selection = _selection(args.first, args.second)
    model_id = db.add_model(gm, args.model)
    if not args.recompute:
        run_id = db.finished_run(model_id, path.name, n=3, score="logit", top_k=args.top_k, selection=selection)
        if run_id is not None:
            print(f"run {run_id} ({args.model} {path.name}) is already complete in {args.db}: showing it "
                  "(--recompute computes it again)", file=sys.stderr)
            return run_id, db.table(run_id)
    try:
        table = N.trigram_table(gm, path.name, first=args.first, second=args.second, top_k=args.top_k,
                                score="logit", progress=not args.no_progress)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; trigram tables are computed in one piece, nothing of {path.name} "
                                "was saved") from None
    return db.save_table(model_id, table, top_k=args.top_k, selection=selection, recompute=args.recompute), table


def _note_other_chunk_sizes(db, run_id, path, args) -> None:
    """Unfinished runs of these settings with another chunk size cannot be resumed by this one."""
    model_id = db.con.execute("SELECT model FROM runs WHERE id=?", (run_id,)).fetchone()[0]
    for rid, size, done, total in db.unfinished_runs(model_id, path, score=args.score, top_k=args.top_k,
                                                      per_context=args.per_context, drop_self=args.drop_self):
        print(f"note: run {rid} of {path} ({done} of {total} chunks, --chunk-size {size}) is unfinished", file=sys.stderr)


def _resolve(db, spec: str) -> int:
    if spec.isdigit():
        return int(spec)
    model, _, path = spec.rpartition(":")
    if not model:
        model, path = path, None
    return db.find_run(model, path).id


def run_diff(args) -> int:
    from .ngram_db import NgramDB

    with NgramDB(args.db, create=False) as db:
        result = db.diff(_resolve(db, args.a), _resolve(db, args.b), limit=args.limit)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"runs {result['a']} → {result['b']}: {result['common']} pairs in both top-K, "
          f"{result['num_entering']} entering, {result['num_leaving']} leaving")
    for key in ("entering", "leaving", "promoted", "suppressed"):
        print(f"-- {key}")
        for e in result[key]:
            print("  ", " → ".join(repr(t) for t in e["text"]),
                  {k: v for k, v in e.items() if k not in ("ids", "text")})
    return 0


def read_pairs(path) -> list[tuple[int, int]]:
    """Token id pairs 'v u' from a file, one a line ('#' starts a comment); line-numbered errors."""
    from .errors import InputError
    from .files import check_input_file

    p = check_input_file(path, "--pairs")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"--pairs: {p} is not a text file; give lines of two token ids 'v u'") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise InputError(f"--pairs: line {number} of {p} is {line.strip()!r}; each line holds two token ids "
                             "'v u' (source, target), e.g. '42 1017'")
        pairs.append((int(fields[0]), int(fields[1])))
    if not pairs:
        raise InputError(f"--pairs: {p} holds no pairs; give lines of two token ids 'v u'")
    return pairs


def run_mass(args) -> int:
    from . import ngrams as N
    from .files import check_input_file
    from .ngram_db import NgramDB

    # every file is read or checked before the model is loaded
    if args.pairs:
        pairs = read_pairs(args.pairs)
    else:
        kw_file = args.keywords or N.default_keywords_file()
        keywords = N.load_keywords(check_input_file(kw_file, "--keywords"))
    if args.db:
        NgramDB.check_file(args.db)
    gm = _trace(args)
    if args.pairs:
        result = N.mass_index(gm, args.path, pairs=pairs)
        name = str(args.pairs)
    else:
        result = N.mass_index(gm, args.path, keywords=keywords, drop_self=not args.keep_self)
        name = str(kw_file)
    if args.db:
        with NgramDB(args.db, timeout=args.db_timeout) as db:
            db.add_mass(db.add_model(gm, args.model), name, result)
    print(json.dumps(result))
    return 0
