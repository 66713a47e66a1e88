"""What the benchmark tools share: their JSON result printed to stdout and, with --out, written to a file."""

from __future__ import annotations

import json

from jetfx.files import write_atomic


def emit(result: dict, out: str | None = None) -> None:
    """Print `result` as JSON; also write it to `out` (atomically: an interrupted run leaves no half file)."""
    text = json.dumps(result, indent=1)
    if out:
        write_atomic(out, text)
    print(text)
