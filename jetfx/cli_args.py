"""Argument types and model options shared by the `jetfx` subcommands.

Bad values are refused where they are read: by argparse (exit status 2 and a one-line message
naming the option), or by `load_model` before a model is loaded — never after minutes of work.
Importing this module does not import torch (the parser is built without it).
"""

from __future__ import annotations

import argparse

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("float32", "float64", "bfloat16")


def integer(minimum: int, what: str):
    """An argparse type: an integer ≥ `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = integer(1, "a positive integer")
non_negative_int = integer(0, "a non-negative integer")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def token_ids(text: str) -> list[int]:
    """'1,2,3' → [1, 2, 3] (token ids, non-negative)."""
    ids = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit():
            raise argparse.ArgumentTypeError(f"expected comma-separated token ids such as 1,2,3, got {text!r} "
                                             f"({part!r} is not a token id)")
        ids.append(int(part))
    if not ids:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids such as 1,2,3, got {text!r}")
    return ids


def add_model_args(p: argparse.ArgumentParser, device_default: str | None = "cpu", dtype: bool = True) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in name, model folder or hub name (default {DEFAULT_MODEL})")
    p.add_argument("--device", default=device_default,
                   help="cpu, cuda, cuda:1, mps (default: cpu)")
    if dtype:
        p.add_argument("--dtype", choices=DTYPES, default="float32",
                       help="weights and computation (default float32; float64 for high jet orders)")


def check_device(args):
    """The torch.device of --device, checked (an InputError that says what to do otherwise)."""
    from .devices import check_device as check

    return check(args.device or "cpu")


def load_model(args):
    """(model, tokenizer) from --model, --device, --dtype; the device is checked first."""
    import torch

    import jetfx

    device = check_device(args)
    return jetfx.load(args.model, dtype=getattr(torch, getattr(args, "dtype", "float32")), device=device)
