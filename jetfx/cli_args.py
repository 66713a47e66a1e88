"""Argument types and model options shared by the `jetfx` subcommands.

Bad values are refused where they are read: by argparse (exit status 2 and a one-line message
naming the option), or by `load_model` before a model is loaded — never after minutes of work.
Importing this module does not import torch (the parser is built without it).
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings

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

    from .models import load

    device = check_device(args)
    return load(args.model, dtype=getattr(torch, getattr(args, "dtype", "float32")), device=device)


# ---------------------------------------------------------------------------------------------
# running a command


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"jetfx: warning: {message}", file=file or sys.stderr)


def _terminate(signum, frame):  # SIGTERM ends a run like Ctrl-C: finished work is kept
    raise KeyboardInterrupt


def run_command(parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse `argv` and run the chosen subcommand (`func`), as every `jetfx` command does.

    Exit status: 0 done, 2 bad input (one line saying what to do), 1 an operating-system error
    (disk full, …), 130 interrupted (finished work is kept; re-running the command resumes)."""
    from .errors import JetfxError

    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    shown, term = warnings.showwarning, signal.getsignal(signal.SIGTERM)
    warnings.showwarning = _show_warning
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        term = None
    try:
        return int(args.func(args) or 0)
    except JetfxError as e:
        print(f"jetfx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"jetfx: {e}" if str(e) else "jetfx: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"jetfx: error: {e}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = shown
        if term is not None:
            signal.signal(signal.SIGTERM, term)
