"""CLI subcommands for jet n-grams: `jetfx ngrams`, `jetfx diff`, `jetfx mass`.

`add_parsers(subparsers)` registers them; each sets `func` to its run function (args) -> int.
Every file argument is checked before the model is loaded; `jetfx ngrams` resumes an interrupted
run and reuses a finished one (see docs/ngrams.md). Started by `torchrun`, `jetfx ngrams` shares its
chunks out over the ranks; rank 0 writes the database and prints (docs/ngrams.md, README).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from .cli_args import add_model_args, non_negative_int, positive_float, positive_int, token_ids
from .ngram_db import TIMEOUT


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("ngrams", help="data-free jet bigram / trigram tables into an SQLite db",
                              epilog="Over several processes or machines: torchrun --nproc-per-node N -m jetfx ngrams "
                                     "… (rank 0 writes the db; --device cuda: one GPU a rank). See the README.")
    add_model_args(p, device_default=None)
    p.add_argument("--path", action="append", default=None,
                   help="'embed', a block ('layers.3.mlp'), 'mlps' (all MLP paths), '<attn block>:h<head>' (trigram), "
                        "'heads' (the trigram paths of every attention head) or 'all' (embed and every MLP path; "
                        "with --trigrams every head too); repeatable")
    p.add_argument("--trigrams", action="store_true", help="with --path all: also the trigram path of every head")
    p.add_argument("--heads", type=head_list, default=None,
                   help="with --path all --trigrams or --path heads: 'all' (default) or comma-separated head indices")
    p.add_argument("--db", default="ngrams.sqlite", help="SQLite file (created if missing; its folder must exist)")
    p.add_argument("--top-k", type=non_negative_int, default=1000, help="global top-K n-grams to keep (default 1000)")
    p.add_argument("--per-context", type=non_negative_int, default=0, help="also keep the top N per source token")
    p.add_argument("--score", choices=("logprob", "logit"), default="logprob",
                   help="ranking of bigram paths (trigram paths are ranked by logit: the pruned search)")
    p.add_argument("--drop-self", action="store_true", help="leave self-transitions v→v out of the rankings")
    p.add_argument("--chunk-size", type=positive_int, default=2048,
                   help="source tokens a chunk (bigrams), or about this many contexts a chunk, whole rows of "
                        "--first (trigrams); default 2048")
    p.add_argument("--max-chunks", type=positive_int, default=None,
                   help="stop after this many chunks in all (resume later)")
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


def head_list(text: str) -> list[int] | None:
    """'all' → None (every head); '0,3' → [0, 3]."""
    if text.strip().lower() == "all":
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated head indices such as 0,3, got {text!r}")
    return list(dict.fromkeys(int(p) for p in parts))


def _trace(args):
    import torch

    from .cli_args import load_model
    from .tracing import trace

    model, tok = load_model(args)
    ids = torch.tensor([[1, 2, 3]], device=next(model.parameters()).device)
    return trace(model, ids, tokenizer=tok)


def _print_rows(rows) -> None:
    # the top log-probabilities can all lie within 1e-9 of 0 (P ≈ 1, e.g. v→v on tied embeddings):
    # %g keeps them apart, and P is then shown as 1 − (1 − P)
    for r in rows:
        arrow = " ".join(repr(t) for t in r["text"][:-1]) + " → " + repr(r["text"][-1])
        lp = r["logprob"]
        p = f"1-{-math.expm1(lp):.4g}" if lp > -1e-3 else f"{math.exp(lp):.4g}"
        print(f"{r['rank']:5d}  {arrow:<40}  logit {r['logit']:9.4f}  logP {lp:11.5g}  P {p}")


def job_paths(gm, args) -> list:
    """The paths `--path`, `--trigrams` and `--heads` name, parsed (every one checked before any is
    computed), each once, in the order given."""
    from . import ngrams as N
    from .errors import InputError

    specs = args.path or ["embed"]
    if args.trigrams and "all" not in specs:
        raise InputError("--trigrams adds the trigram paths of the heads to --path all; for one head give "
                         "--path '<attn block>:h<head>', for every head --path heads")
    if args.heads is not None and not (args.trigrams or "heads" in specs):
        raise InputError("--heads picks the heads of --path all --trigrams or --path heads")
    names = []
    for p in specs:
        if p == "mlps":
            names += N.bigram_paths(gm)[1:]
        elif p == "all":
            names += N.bigram_paths(gm) + (N.head_paths(gm, args.heads) if args.trigrams else [])
        elif p == "heads":
            names += N.head_paths(gm, args.heads)
        else:
            names.append(p)
    parsed = list(dict.fromkeys(N.parse_path(gm, p) for p in names))
    if not parsed:
        raise InputError(f"{args.model} has no paths of the kinds asked for ({', '.join(specs)})")
    if (args.first is not None or args.second is not None) and all(p.n == 2 for p in parsed):
        bigram = next(p for p in parsed if p.n == 2)
        raise InputError(f"--first/--second restrict trigram contexts; {bigram.name} is a bigram path")
    return parsed


def run_ngrams(args) -> int:
    """Under torchrun every rank runs this: rank 0 checks the database, writes it and prints; a
    step that fails on any rank stops every rank (one message, from rank 0)."""
    from . import distributed as D
    from .errors import JetfxError

    group = D.join()
    finished = False
    try:
        status = _run_ngrams(args, group)
        finished = True
        return status
    except BaseException as e:
        if group.main:
            if isinstance(e, D.PeerLost):  # a rank stopped before the work was shared out
                print(f"jetfx: a rank stopped before the job began ({e}); nothing was computed", file=sys.stderr)
                return 130
            raise
        # the other ranks stay quiet about what rank 0 reports (interruptions, lost ranks, errors every
        # rank saw); an error of their own they report, with their rank
        if isinstance(e, (KeyboardInterrupt, D.PeerLost)):
            return 130
        if isinstance(e, JetfxError):
            if not getattr(e, "agreed", False):
                print(f"jetfx: rank {group.rank} (on {group.hosts[group.rank]}): error: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        group.close(synchronize=finished)


def _run_ngrams(args, group) -> int:
    from . import distributed as D
    from . import ngrams as N
    from .errors import InputError
    from .ngram_db import NgramDB, RunInterrupted
    from .ngram_job import JobStats, Settings, extract_paths

    def checks():
        args.device = D.rank_device(args.device)
        if group.main:
            NgramDB.check_file(args.db)  # before the model is loaded
        if args.top_k == 0 and args.per_context == 0:
            raise InputError("--top-k 0 and --per-context 0 keep nothing; give --top-k K and/or --per-context N")

    group.checked(checks)
    gm = group.checked(lambda: _trace(args))
    parsed = group.checked(lambda: job_paths(gm, args))
    if group.main and gm.jetfx.tied_embeddings and any(p.name == N.ENCODER_PATH for p in parsed) and not args.drop_self:
        print(f"note: {args.model} has tied embeddings (E = U): the 'embed' path is dominated by "
              "self-transitions v→v; --drop-self leaves them out", file=sys.stderr)
    settings = Settings(top_k=args.top_k, per_context=args.per_context, score=args.score, drop_self=args.drop_self,
                        chunk_size=args.chunk_size, first=None if args.first is None else tuple(args.first),
                        second=None if args.second is None else tuple(args.second))
    db = group.checked(lambda: NgramDB(args.db, timeout=args.db_timeout) if group.main else None)
    if group.main and group.world > 1:
        print(f"jetfx: {group.describe()}; rank 0 (on {group.hosts[0]}) writes {args.db}", file=sys.stderr)
    stats = JobStats()
    try:
        tasks = extract_paths(db, gm, parsed, name=args.model, settings=settings, group=group,
                              recompute=args.recompute, progress=not args.no_progress, max_chunks=args.max_chunks,
                              stats=stats)
        if not group.main:
            return 0
        return _report(db, tasks, stats, args)
    except RunInterrupted as e:
        print(f"jetfx: {e}", file=sys.stderr)
        return 130
    finally:
        if db is not None:
            db.close()


def _report(db, tasks, stats, args) -> int:
    """Rank 0: what was computed, then the top rows of every complete path."""
    if stats.computed or stats.saved_elsewhere:
        before = f"; {stats.saved_before} were saved before" if stats.saved_before else ""
        elsewhere = f"; {stats.saved_elsewhere} saved meanwhile by another process" if stats.saved_elsewhere else ""
        print(f"jetfx: {stats.computed} chunk{'s' if stats.computed != 1 else ''} computed by {stats.group} in "
              f"{stats.seconds:.1f} s{before}{elsewhere}", file=sys.stderr)
    out = []
    for task in tasks:
        table, path = task.table, task.path
        if table.reused:
            print(f"run {task.run_id} ({args.model} {path.name}) is already complete in {args.db}: showing it "
                  "(--recompute computes it again)", file=sys.stderr)
        elif not table.complete:
            print(f"run {task.run_id} ({path.name}): {table.chunks_done} of {table.num_chunks} chunks done; "
                  "run the same command again to resume", file=sys.stderr)
            continue
        if path.n == 2:
            _note_other_chunk_sizes(db, task.run_id, path.name, args)
        rows = db.top(task.run_id, args.show)
        out.append({"run": task.run_id, "path": path.name, "top": rows})
        if not args.json:
            print(f"== run {task.run_id}: {args.model} {path.name} (top {len(rows)} by {table.score})")
            _print_rows(rows)
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


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
