"""The main job (`make demo`, `jetfx demo`): jetfx end to end on the built-in model.

Loads and traces the model, prints its residual structure and path count, compiles an exponential
jet expansion of the one-block paths and checks Σ paths + remainder = logits on a real sentence,
renders the path graph, exports the expanded module, reads the sentence through the jet lens and
extracts the top jet bigrams from the weights alone. Everything goes to `out/`; the run ends with
what was written and how long each step took.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

SENTENCE = "The capital of France is"


class _Steps:
    def __init__(self):
        self.rows: list[tuple[str, float, str]] = []

    @contextmanager
    def step(self, name: str):
        print(f"\n== {name}", flush=True)
        t = time.time()
        note = {"text": ""}
        yield note
        self.rows.append((name, time.time() - t, note["text"]))


def run_demo(out: str = "out", *, model: str = "smollm2-135m", device: str = "cpu", quick: bool = False) -> int:
    import torch

    from jetfx import paths as P
    from jetfx.expansion import expand
    from jetfx.models import load
    from jetfx.errors import ExpansionError
    from jetfx.step_expansion import branch, jet_expand, stream
    from jetfx.tracing import as_tokens, trace

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = _Steps()
    summary: dict = {"model": model, "sentence": SENTENCE}

    with steps.step("load the model") as note:
        m, tokenizer = load(model, device=device)
        note["text"] = f"{type(m).__name__}, {sum(p.numel() for p in m.parameters()) / 1e6:.0f}M parameters"
        print(note["text"])

    with steps.step("trace (torch.export) and residual analysis") as note:
        gm = trace(m, SENTENCE, tokenizer=tokenizer)
        structure = gm.residual
        text = str(structure)
        print(text if len(text) < 1500 else text[:700] + "\n  …\n" + text[-500:])
        (out_dir / "structure.txt").write_text(text + "\n", encoding="utf-8")
        note["text"] = (f"{len(gm.graph.nodes)} graph nodes, {structure.num_blocks} blocks, "
                        f"{structure.num_paths:,} paths (2^{structure.num_blocks})")
        summary["structure"] = {"blocks": structure.num_blocks, "paths": str(structure.num_paths),
                                "trace_error": gm.jetfx.max_abs_error}

    ids = as_tokens(SENTENCE, tokenizer).to(device)
    with steps.step("compile and check a k = 1 exponential expansion (paths through ≤ 1 block)") as note:
        t = time.time()
        ex = expand(gm, k=1, paths=P.max_blocks(1))
        compile_s = time.time() - t
        with torch.no_grad():
            res = ex(ids)
        err = res.max_error()
        share = float(res.stacked[:, 0, -1].norm() / res.logits[0, -1].norm())
        print(f"  {len(res.names)} paths; max |Σ paths + remainder − logits| = {err:.2e}")
        print(f"  Algorithm 2 weighs step s by 1/2^s: on 60 blocks these paths carry {share:.1e} of the "
              "logits' norm and the exact remainder the rest. Choose centers and weights with jet_expand:")
        if not err < 1e-3:
            raise ExpansionError(f"the expansion is not exact on the demo sentence (error {err:.3g})")
        summary["exponential"] = {"k": 1, "paths": len(res.names), "compile_s": compile_s, "max_error": err,
                                  "share_of_logit_norm": share}
        note["text"] = f"{len(res.names)} paths, exact to {err:.1e}"

    with steps.step("a k = 1 decoder jet expansion around η and every block output (jet_expand)") as note:
        centers = [stream(gm, 0)] + [branch(gm, b) for b in structure.blocks]
        dec = jet_expand(gm, "decoder", centers, 1).compile()
        with torch.no_grad():
            out = dec(ids)
        err = out.max_error()
        last = out.stacked[:, 0, -1]
        strongest = last.norm(dim=-1).argsort(descending=True)[:8].tolist()
        table = [{"term": out.names[i], "norm": float(last[i].norm()),
                  "top_token": tokenizer.decode([int(last[i].argmax())])} for i in strongest]
        for row in table:
            print(f"  {row['term']:<24} |logits| {row['norm']:8.2f}  top {row['top_token']!r}")
        model_top = tokenizer.decode([int(out.logits[0, -1].argmax())])
        total_top = tokenizer.decode([int(out.stacked[:, 0, -1].sum(0).argmax())])
        print(f"  model's next token {model_top!r}; Σ terms (without remainder) {total_top!r}; "
              f"|remainder| {out.remainder[0, -1].norm():.2f} vs |logits| {out.logits[0, -1].norm():.2f}; "
              f"exact to {err:.1e}")
        summary["decoder_jet"] = {"terms": len(out.names), "max_error": err, "strongest_last_token": table,
                                  "model_next_token": model_top, "terms_next_token": total_top}
        note["text"] = f"{len(out.names)} terms, exact to {err:.1e}; top term {table[0]['term']}"

    with steps.step("render the path graph") as note:
        if shutil.which("dot") is None:
            note["text"] = "skipped: graphviz's `dot` is not installed (apt-get install graphviz)"
            print(note["text"])
        else:
            svg = ex.render(str(out_dir / "paths.svg"))
            note["text"] = f"paths.svg ({len(svg) // 1024} KiB)"

    with steps.step("export the expanded module") as note:
        from .export import export, load_expanded

        small = expand(gm, k=1, paths=P.max_blocks(1) & P.within("layers.0.*", "layers.29.*"))
        export(small, str(out_dir / "expansion.jetfx.zip"), example_tokens=ids)
        again = load_expanded(str(out_dir / "expansion.jetfx.zip"))(ids)
        with torch.no_grad():
            same = bool(torch.equal(again.stacked, small(ids).stacked))
        note["text"] = f"expansion.jetfx.zip ({len(small.path_names)} paths, k = 1), reloaded outputs identical: {same}"

    with steps.step("jet lens of the sentence (iterative, k = 1; joint, optimized weights)") as note:
        from . import lens as L

        iterative = L.iterative_lens(gm, ids, 1)
        iterative.save(out_dir / "lens", n=5)
        joint = L.joint_lens(gm, ids, 1, weights="optimized")
        joint.save(out_dir / "lens", n=5)
        summary["lens"] = {"iterative_k1_mean_cosine": iterative.mean_cosine,
                           "joint_k1_mean_cosine": joint.mean_cosine,
                           "joint_uniform_loss": joint.uniform_loss, "joint_optimized_loss": joint.optimized_loss}
        note["text"] = (f"lens/ (HTML, SVG, JSON); iterative mean cosine {iterative.mean_cosine:.3f}, "
                        f"joint {joint.mean_cosine:.3f}")

    if not quick:
        with steps.step("top jet bigrams from the weights alone (full vocabulary)") as note:
            from .ngram_db import NgramDB, extract

            with NgramDB(out_dir / "ngrams.sqlite") as db:
                tied = gm.jetfx.tied_embeddings
                rows = {}
                for path in ("embed", "layers.21.mlp"):
                    if path != "embed" and path not in {b.name for b in structure.blocks}:
                        continue
                    run_id, _ = extract(db, gm, path, top_k=200, drop_self=bool(tied))
                    rows[path] = [" ".join(repr(t) for t in r["text"]) for r in db.top(run_id, 15)]
                    print(f"  {path}: " + ", ".join(rows[path][:10]))
            summary["bigrams"] = rows
            note["text"] = "ngrams.sqlite (" + ", ".join(rows) + ")" + (" — tied E = U: self-transitions dropped" if tied else "")

    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    print("\n== summary (written to " + str(out_dir) + "/)")
    for name, seconds, text in steps.rows:
        print(f"  {seconds:7.1f} s  {name}: {text}")
    print(f"  total {sum(s for _, s, _ in steps.rows):.1f} s")
    return 0
