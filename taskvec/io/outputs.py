"""The output rule: an output can never destroy an input or data taskvec did not write.

:func:`check_output` is called by every command that writes (extract,
combine, compress: a vector file; apply, merge, finetune: a model folder)
before anything is read or written:

* the output (symlinks followed) must not be, contain or lie inside any
  input (symlinks followed, including the files a model folder's weights
  resolve to);
* an existing output must be of the kind written: a regular file for a
  vector, a folder for a model. Devices, FIFOs and sockets are refused always;
* an existing output must have been written by taskvec (a vector file whose
  header carries ``taskvec.format``; a folder holding ``taskvec.json`` or
  ``finetune.json``; an empty folder), unless ``force`` is given.

It returns the output's real path (a symlink is written through, never
replaced), which the caller hands to :func:`taskvec.io.atomic_path` /
:func:`taskvec.io.atomic_dir`, so a previous taskvec output is still replaced
atomically.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from taskvec.errors import TaskvecError

#: Files that mark a folder as a taskvec output (apply/merge ledger, finetune manifest).
FOLDER_MARKERS = ("taskvec.json", "finetune.json")


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def is_taskvec_folder(path: Path) -> bool:
    return any((path / m).is_file() for m in FOLDER_MARKERS)


def is_taskvec_vector(path: Path) -> bool:
    from taskvec.io.reader import read_safetensors_header

    try:
        _, meta = read_safetensors_header(path)
    except TaskvecError:
        return False
    return "taskvec.format" in meta


def input_paths(path: str | os.PathLike) -> list[Path]:
    """``path`` and, for a folder, the real paths of the files directly in it (symlinked weights)."""
    p = Path(path)
    out = [p]
    if p.is_dir():
        try:
            out += [c for c in p.iterdir() if c.is_symlink()]
        except OSError:
            pass
    return out


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, kind: str, force: bool = False) -> Path:
    """Refuse an output that could destroy an input or foreign data; return its real path.

    ``kind`` is ``"file"`` (a task vector) or ``"folder"`` (a model folder).
    """
    shown = Path(out)
    real = _real(out)
    for inp in inputs:
        for candidate in input_paths(inp):
            r = _real(candidate)
            if real == r:
                raise TaskvecError(f"output {shown} is the input {inp}; write to a new path")
            if _within(real, r):
                raise TaskvecError(f"output {shown} lies inside the input {inp}; write outside it")
            if _within(r, real):
                raise TaskvecError(f"output {shown} contains the input {inp}; write elsewhere")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return real
    except OSError as exc:
        raise TaskvecError(f"cannot use output {shown}: {exc.strerror}") from None
    if kind == "folder":
        if not stat.S_ISDIR(st.st_mode):
            raise TaskvecError(f"output {shown} exists and is not a folder")
        try:
            empty = not any(real.iterdir())
        except OSError as exc:
            raise TaskvecError(f"cannot use output {shown}: {exc.strerror}") from None
        if not empty and not force and not is_taskvec_folder(real):
            raise TaskvecError(
                f"output folder {shown} exists and was not written by taskvec (no {FOLDER_MARKERS[0]} or {FOLDER_MARKERS[1]}); "
                "its contents would be replaced: pass --force to do so"
            )
        return real
    if stat.S_ISDIR(st.st_mode):
        raise TaskvecError(f"output {shown} is a folder; give a file path such as {shown / 'vector.safetensors'}")
    if not stat.S_ISREG(st.st_mode):
        raise TaskvecError(f"output {shown} exists and is not a regular file (a device, FIFO or socket); refusing to replace it")
    if not force and not is_taskvec_vector(real):
        raise TaskvecError(f"output {shown} exists and is not a taskvec task vector; pass --force to replace it")
    return real
