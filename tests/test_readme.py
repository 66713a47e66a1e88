"""The README runs as written, top to bottom, and shows what its code prints.

Its ```python blocks run in order in one namespace, its ```bash blocks through the shell (set-up
lines — `make`, `pip` — are skipped: the test runs on the machine they set up), both in a fresh
folder. A plain ``` block right after code is that code's output: its lines must appear in the
real output in order (a `…` line marks lines left out, a line ending in `…` is cut short; numbers
agree to 1e-3 relative, integers exactly), so a figure the README quotes is one the code prints.
"""
import contextlib
import io
import linecache
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
SETUP = ("make", "pip", "apt-get", "brew")
NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*(?:e[-+]?\d+)?)")


def readme_blocks():
    """(language, code, line number) of every fenced block, in order."""
    text = README.read_text()
    return [(m.group(1), m.group(2), text[: m.start()].count("\n") + 1) for m in FENCE.finditer(text)]


def _parts(line):
    """A line as (words, numbers): words compared exactly, numbers to a tolerance."""
    line = " ".join(line.split())
    numbers = [n for n in NUMBER.findall(line) if any(c.isdigit() for c in n)]
    return NUMBER.sub("#", line), numbers


def _same_number(shown, real):
    """Integers exactly; decimals to 1e-3 relative or half a unit of the last shown digit."""
    if not re.search(r"[.eE]", shown):
        return shown == real
    a, b = float(shown.replace(",", "")), float(real.replace(",", ""))
    return math.isclose(a, b, rel_tol=1e-3, abs_tol=0.5 * 10 ** -_decimals(shown))


def _decimals(number):
    mantissa = number.lower().split("e")[0]
    return len(mantissa.split(".")[1]) if "." in mantissa else 0


def _matches(shown, real):
    """A shown line equals a printed one; a shown line ending in `…` is the start of one."""
    shown, real = " ".join(shown.split()), " ".join(real.split())
    if shown.endswith("…"):
        shown = shown[:-1].rstrip()
        real = real[:len(shown)]
    (words, numbers), (real_words, real_numbers) = _parts(shown), _parts(real)
    return (words == real_words and len(numbers) == len(real_numbers)
            and all(_same_number(a, b) for a, b in zip(numbers, real_numbers)))


def check_output(shown, real, where):
    """Every shown line appears in `real`, in the same order (`…` lines mark what is left out)."""
    lines = [line for line in real.splitlines() if line.strip()]
    at = 0
    for line in shown.splitlines():
        if not line.strip() or line.strip() == "…":
            continue
        found = next((i for i in range(at, len(lines)) if _matches(line, lines[i])), None)
        assert found is not None, (
            f"README.md:{where}: the README shows\n  {line}\nbut the code printed (from line {at}):\n"
            + textwrap.indent("\n".join(lines[at:at + 40]), "  "))
        at = found + 1


def _run_bash(code, env):
    printed = []
    for command in code.splitlines():
        command = command.split(" #")[0].strip()
        if not command or command.startswith("#") or command.split()[0] in SETUP:
            continue
        done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stderr[-3000:]}"
        printed.append(done.stdout)
    return "".join(printed)


def test_readme_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=str(README.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    namespace = {"__name__": "readme"}
    blocks = readme_blocks()
    assert sum(lang == "python" for lang, _, _ in blocks) >= 5, "README lost its code blocks"
    printed, ran = None, 0
    for lang, code, line in blocks:
        if lang == "python":
            buffer, name = io.StringIO(), f"README.md:{line}"
            linecache.cache[name] = (len(code), None, code.splitlines(True), name)  # nnsight reads it
            with contextlib.redirect_stdout(buffer):
                exec(compile(code, name, "exec"), namespace)
            printed, ran = buffer.getvalue(), ran + 1
        elif lang == "bash":
            printed, ran = _run_bash(code, env), ran + 1
        elif lang in ("", "text"):
            assert printed is not None, f"README.md:{line}: an output block follows no code"
            check_output(code, printed, line)
            printed = None
        else:
            pytest.fail(f"README.md:{line}: unknown block language {lang!r} (python, bash or none)")
    assert ran >= 8


def test_output_check_catches_wrong_figures_names_and_order():
    """The comparison can fail: a figure off by more than its last digit, another block, another order."""
    check_output("cosine 0.8530, top-1 0.681\n…\nrun 1 …", "x\ncosine 0.85304, top-1 0.6812\nrun 1 of 3", 1)
    for shown, real in [("cosine 0.8530", "cosine 0.8630"), ("layers.3.mlp 7", "layers.4.mlp 7"),
                        ("count 1152921504606846976", "count 1152921504606846977"), ("a\nb", "b\na")]:
        with pytest.raises(AssertionError):
            check_output(shown, real, 1)
