"""Atomic output: temp paths beside the destination, renamed into place on success."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from taskvec.errors import TaskvecError, WriteError

def durable_writes() -> bool:
    """Whether to fsync outputs before renaming them into place (``TASKVEC_FSYNC=1``).

    The rename alone makes writes atomic for every reader and against a killed
    process; fsync adds durability against power loss at a large cost in wall
    time for GB-sized files, so it is opt-in (as in safetensors and mergekit,
    which never fsync).
    """
    return os.environ.get("TASKVEC_FSYNC", "").lower() in ("1", "true", "yes")


_HOST = socket.gethostname().replace(".", "_").replace("/", "_")


def _temp_prefix(dest: Path) -> str:
    """``.NAME.HOST-PID.``: lets a later writer recognise temp files of dead writers."""
    return f".{dest.name}.{_HOST}-{os.getpid()}."


def _reap_stale(dest: Path) -> None:
    """Remove temp siblings of ``dest`` left by killed writers on this host."""
    pattern = re.compile(re.escape(f".{dest.name}.{_HOST}-") + r"(\d+)\..*\.(?:tmp|old)$")
    try:
        siblings = list(dest.parent.iterdir())
    except OSError:
        return
    for item in siblings:
        m = pattern.match(item.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                item.unlink()


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _publish_mode(path: Path, *, folder: bool) -> None:
    """Give a temp file/folder the mode a plain open()/mkdir() would have (mkstemp uses 0600/0700)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO})
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[^.]+-\d+\..*\.(?:tmp|old)$")


def user_path(filename: str | os.PathLike) -> str:
    """The path a user asked for, for a temp path of :func:`atomic_path`/:func:`atomic_dir` (or below one)."""
    p = Path(os.fsdecode(filename))
    for i, part in enumerate(p.parts):
        m = _TEMP_NAME.match(part)
        if m:
            return str(Path(*p.parts[:i], m.group("name")))
    return str(p)


@contextlib.contextmanager
def _as_user_error(dest: Path) -> Iterator[None]:
    """An OS error while writing ``dest`` (disk full, read-only, permission) → one line naming ``dest``."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) and exc.filename is not None:
            raise
        names = [f for f in (exc.filename, exc.filename2) if f is not None]
        ours = not names and exc.errno in _WRITE_ERRNOS
        ours = ours or any(user_path(f) != str(Path(os.fsdecode(f))) or Path(os.fsdecode(f)) in (dest, dest.parent) for f in names)
        if not ours:
            raise
        raise WriteError(f"cannot write {dest}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``dest``; rename it onto ``dest`` on success.

    Temp files of writers that were killed (SIGKILL leaves them behind) are
    removed by the next writer of the same destination on the same host. An
    OS error while writing (disk full, read-only file system, permission
    denied) is reported as a :class:`TaskvecError` naming ``dest``.
    """
    dest = Path(dest)
    with _as_user_error(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        _reap_stale(dest)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            _publish_mode(tmp_path, folder=False)
            os.replace(tmp_path, dest)
        finally:
            if tmp_path.exists() or tmp_path.is_symlink():
                tmp_path.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; swap it into place on success.

    An existing ``dest`` is replaced only after the new folder is complete, in
    one atomic exchange where the OS supports it (Linux), so there is no
    moment at which ``dest`` is missing. A ``dest`` that is a symlink is
    written through (the folder it points to is replaced; the link stays).
    """
    dest = Path(dest)
    if dest.is_symlink():
        dest = Path(os.path.realpath(dest))
    if dest.exists() and not dest.is_dir():
        raise TaskvecError(f"output {dest} exists and is not a folder")
    if dest.exists() and not overwrite:
        raise TaskvecError(f"output folder {dest} already exists")
    with _as_user_error(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        _reap_stale(dest)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent))
        try:
            yield tmp
            _publish_mode(tmp, folder=True)
            if not dest.exists():
                os.replace(tmp, dest)
            elif not _exchange(tmp, dest):  # fallback: two renames, with a brief gap
                old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), suffix=".old", dir=dest.parent))
                os.replace(dest, old / "x")
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.is_symlink():
                tmp.unlink()
            elif tmp.exists():  # the failed output, or the old folder after an exchange
                shutil.rmtree(tmp, ignore_errors=True)
