"""CLI subcommands for jet n-grams: `jetfx ngrams`, `jetfx diff`, `jetfx mass`.

`add_parsers(subparsers)` registers them; each sets `func` to its run function (args) -> int.
"""

from __future__ import annotations

import json
import sys

DEFAULT_MODEL = "smollm2-135m"


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("ngrams", help="data-free jet bigram / trigram tables into an SQLite db")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--path", action="append", default=None,
                   help="'embed', a block ('layers.3.mlp'), 'mlps' (all MLP paths) or '<attn block>:h<head>' (trigram); repeatable")
    p.add_argument("--db", default="ngrams.sqlite")
    p.add_argument("--top-k", type=int, default=1000)
    p.add_argument("--per-context", type=int, default=0)
    p.add_argument("--score", choices=("logprob", "logit"), default="logprob")
    p.add_argument("--drop-self", action="store_true", help="leave self-transitions v→v out of the rankings")
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--max-chunks", type=int, default=None, help="stop after this many chunks (resume later)")
    p.add_argument("--first", default=None, help="trigrams: comma-separated ids for v1 (default: all)")
    p.add_argument("--second", default=None, help="trigrams: comma-separated ids for v2 (default: all)")
    p.add_argument("--device", default=None)
    p.add_argument("--print", dest="show", type=int, default=30, help="print this many top rows per path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_ngrams)

    d = subparsers.add_parser("diff", help="compare the top-K n-grams of two runs (same vocabulary)")
    d.add_argument("--db", default="ngrams.sqlite")
    d.add_argument("a", help="run id, or MODEL:PATH")
    d.add_argument("b", help="run id, or MODEL:PATH")
    d.add_argument("--limit", type=int, default=20)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=run_diff)

    m = subparsers.add_parser("mass", help="cumulative bigram probability mass over pairs or keywords")
    m.add_argument("--model", default=DEFAULT_MODEL)
    m.add_argument("--path", default="embed")
    m.add_argument("--keywords", default=None, help="keyword file (default: the shipped neutral list)")
    m.add_argument("--pairs", default=None, help="file of 'v u' token id pairs, one a line")
    m.add_argument("--keep-self", action="store_true")
    m.add_argument("--db", default=None, help="also record the index in this db")
    m.add_argument("--device", default=None)
    m.set_defaults(func=run_mass)


def _trace(name: str, device: str | None):
    import torch

    import jetfx

    model, tok = jetfx.load(name)
    if device:
        model = model.to(device)
    ids = torch.tensor([[1, 2, 3]], device=next(model.parameters()).device)
    return jetfx.trace(model, ids, tokenizer=tok)


def _ids(text):
    return None if text is None else [int(x) for x in text.split(",") if x.strip()]


def run_ngrams(args) -> int:
    from . import ngrams as N
    from .ngram_db import NgramDB, extract

    gm = _trace(args.model, args.device)
    paths = []
    for p in args.path or ["embed"]:
        paths += N.bigram_paths(gm)[1:] if p == "mlps" else [p]
    out = []
    with NgramDB(args.db) as db:
        if gm.jetfx.tied_embeddings:
            print(f"note: {args.model} has tied embeddings (E = U): the 'embed' path is dominated by "
                  "self-transitions v→v; --drop-self leaves them out", file=sys.stderr)
        for p in paths:
            path = N.parse_path(gm, p)
            if path.n == 3:
                table = N.trigram_table(gm, path.name, first=_ids(args.first), second=_ids(args.second),
                                        top_k=args.top_k, score="logit", progress=not args.no_progress)
                run_id = db.save_table(db.add_model(gm, args.model), table, top_k=args.top_k)
            else:
                run_id, table = extract(db, gm, path.name, name=args.model, top_k=args.top_k,
                                        per_context=args.per_context, score=args.score, drop_self=args.drop_self,
                                        chunk_size=args.chunk_size, progress=not args.no_progress,
                                        max_chunks=args.max_chunks)
                if not table.complete:
                    print(f"run {run_id} ({path.name}): {table.chunks_done}/{table.num_chunks} chunks done; "
                          "run the same command again to resume", file=sys.stderr)
                    continue
            rows = db.top(run_id, args.show)
            out.append({"run": run_id, "path": path.name, "top": rows})
            if not args.json:
                print(f"== run {run_id}: {args.model} {path.name} (top {len(rows)} by {table.score})")
                for r in rows:
                    arrow = " ".join(repr(t) for t in r["text"][:-1]) + " → " + repr(r["text"][-1])
                    print(f"{r['rank']:5d}  {arrow:<40}  logit {r['logit']:8.3f}  logP {r['logprob']:8.3f}")
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


def _resolve(db, spec: str) -> int:
    if spec.isdigit():
        return int(spec)
    model, _, path = spec.rpartition(":")
    if not model:
        model, path = path, None
    return db.find_run(model, path).id


def run_diff(args) -> int:
    from .ngram_db import NgramDB

    with NgramDB(args.db) as db:
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


def run_mass(args) -> int:
    from . import ngrams as N
    from .ngram_db import NgramDB

    gm = _trace(args.model, args.device)
    if args.pairs:
        pairs = [tuple(int(x) for x in ln.split()[:2]) for ln in open(args.pairs) if ln.strip() and not ln.startswith("#")]
        result = N.mass_index(gm, args.path, pairs=pairs)
        name = args.pairs
    else:
        kw = args.keywords or N.default_keywords_file()
        result = N.mass_index(gm, args.path, keywords=N.load_keywords(kw), drop_self=not args.keep_self)
        name = str(kw)
    if args.db:
        with NgramDB(args.db) as db:
            db.add_mass(db.add_model(gm, args.model), name, result)
    print(json.dumps(result))
    return 0
