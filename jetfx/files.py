"""Files jetfx writes: output paths checked before any computing, and written atomically.

A long computation that ends in "No such file or directory" wastes the computation, and a file
half-written when the process is interrupted is worse than no file. So commands check every output
path first (`check_output_file`, `check_output_folder`, `check_input_file`), and results are written
to a temporary file in the same folder and moved into place with `os.replace` (`write_atomic`), which
readers see either whole or not at all.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import InputError


def _writable_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise InputError(f"{what}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{what}: the folder {folder} is not writable; choose another place")


def check_output_file(path, what: str = "output file") -> Path:
    """An output file's folder must exist and be writable (it is not created), and the path must
    not be a folder. Returns the path."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise InputError(f"{what}: a file name is needed, got {path!r}")
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what}: {p} is a folder; give a file name inside it, e.g. {p / 'out'}")
    folder = p.absolute().parent
    if not folder.exists():
        raise InputError(f"{what}: the folder {folder} does not exist; create it first (mkdir -p {folder}) "
                         "or choose another path")
    _writable_folder(folder, what)
    return p


def check_output_folder(path, what: str = "output folder") -> Path:
    """An output folder may be missing (it is created, with its parents, when results are written),
    but the nearest existing ancestor must be a writable folder, and no part of it may be a file."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise InputError(f"{what}: a folder name is needed, got {path!r}")
    p = Path(path)
    ancestor = p.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{what}: {ancestor} is a file, so {p} cannot be a folder; choose another path")
    _writable_folder(ancestor, what)
    return p


def check_input_file(path, what: str = "input file") -> Path:
    """An input file must exist, be a file and be readable."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what}: {p} does not exist")
    if not p.is_file():
        raise InputError(f"{what}: {p} is not a file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{what}: {p} is not readable")
    return p


def write_atomic(path, data: str | bytes) -> Path:
    """Write `data` to `path` whole or not at all: a temporary file in the same folder, flushed,
    then `os.replace`d over `path` (an interruption leaves the old file, or none, never half)."""
    p = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.absolute().parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p
