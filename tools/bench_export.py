"""Benchmark the export of the demo's expansion: time, file size, and how often the parameters are held.

    .venv/bin/python tools/bench_export.py [--threads 2] [--model smollm2-135m] [--keep FILE]

Builds exactly what `jetfx demo` exports (SmolLM2-135M traced on the demo sentence, k = 1, the 5 paths
`P.max_blocks(1) & P.within("layers.0.*", "layers.29.*")`), exports it with the sentence as example
tokens, reloads it, and prints JSON:

- `expanded`: the ExpandedModule's `state_dict()` entries, its distinct storages (by data pointer),
  the bytes of those storages counted once, and the bytes `state_dict()` would hold were every entry
  its own copy (what a naive serializer writes);
- `trace_s` (`jetfx.trace`, itself a torch.export of the model: what any export of the expansion,
  which holds the whole model's graph, costs at least), `export_s`, `file_bytes`/`file_mb`, the
  archive's tensors (`names`: the weight entries of the `.pt2`'s config, `weights`: their raw
  payloads, and the payloads' bytes);
- `load_s`, and `max_abs_diff` between the reloaded module's outputs and the in-memory module's
  (stacked paths, remainder, logits).

Times are single wall-clock runs (an export is one long call): re-run on a quiet machine to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import zipfile

import torch


def storage_report(module: torch.nn.Module) -> dict:
    """state_dict entries, distinct storages among them and their bytes (each counted once)."""
    state = module.state_dict(keep_vars=True)
    storages: dict[tuple, int] = {}
    naive = 0
    for value in state.values():
        if not isinstance(value, torch.Tensor):
            continue
        storage = value.untyped_storage()
        storages[(value.device.type, storage.data_ptr())] = storage.nbytes()
        naive += value.numel() * value.element_size()
    return {"state_dict_entries": len(state), "distinct_storages": len(storages),
            "bytes_distinct": sum(storages.values()), "bytes_if_copied": naive}


def archive_report(path: str) -> dict:
    """The sizes of the tensor payloads inside the export's program (a zip in the zip)."""
    import io

    with zipfile.ZipFile(path) as outer:
        program = outer.read("program.pt2")
    with zipfile.ZipFile(io.BytesIO(program)) as inner:
        infos = inner.infolist()
        config = next(n for n in inner.namelist() if n.endswith("data/weights/model_weights_config.json"))
        names = len(json.loads(inner.read(config))["config"])
    payload = [i for i in infos if "/data/weights/" in i.filename and not i.filename.endswith(".json")
               and "config" not in i.filename]
    constants = [i for i in infos if "/data/constants/" in i.filename and not i.filename.endswith(".json")
                 and "config" not in i.filename]
    return {"names": names, "weights": len(payload), "weight_bytes": sum(i.file_size for i in payload),
            "constants": len(constants), "constant_bytes": sum(i.file_size for i in constants),
            "program_bytes": len(program)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--keep", default=None, help="also keep the export at this path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import jetfx
    from jetfx import paths as P
    from jetfx.demo import SENTENCE

    model, tokenizer = jetfx.load(args.model)
    t = time.perf_counter()
    gm = jetfx.trace(model, SENTENCE, tokenizer=tokenizer)  # a torch.export of the model: the floor of an export
    trace_s = time.perf_counter() - t
    ids = jetfx.tracing.as_tokens(SENTENCE, tokenizer)
    t = time.perf_counter()
    small = jetfx.expand(gm, k=1, paths=P.max_blocks(1) & P.within("layers.0.*", "layers.29.*"))
    expand_s = time.perf_counter() - t
    result: dict = {"model": args.model, "paths": list(small.path_names), "threads": args.threads,
                    "torch": torch.__version__, "trace_s": round(trace_s, 2), "expand_s": round(expand_s, 2),
                    "model_parameters": storage_report(model), "expanded": storage_report(small)}
    with tempfile.TemporaryDirectory() as folder:
        path = args.keep or os.path.join(folder, "expansion.jetfx.zip")
        t = time.perf_counter()
        jetfx.export(small, path, example_tokens=ids, overwrite=True)
        result["export_s"] = round(time.perf_counter() - t, 2)
        size = os.path.getsize(path)
        result["file_bytes"] = size
        result["file_mb"] = round(size / 2**20, 1)
        result["archive"] = archive_report(path)
        t = time.perf_counter()
        reloaded = jetfx.load_expanded(path)
        result["load_s"] = round(time.perf_counter() - t, 2)
        with torch.no_grad():
            again, here = reloaded(ids), small(ids)
        result["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in (
            (again.stacked, here.stacked), (again.remainder, here.remainder), (again.logits, here.logits)))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
