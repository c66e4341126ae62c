"""Content hashing of tensors and files, with the on-disk hash cache."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from taskvec.io.atomic import atomic_path

class ContentHasher:
    """Incremental form of :meth:`TensorSource.content_hash` (feed tensors in sorted name order)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, name: str, dtype: str, shape: tuple[int, ...], data: memoryview | bytes) -> None:
        self.begin(name, dtype, shape)
        self.feed(data)

    def begin(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        """Start a tensor; its bytes follow through :meth:`feed`, in order, in any number of parts."""
        self._h.update(f"{name}\0{dtype}\0{list(shape)}\0".encode())

    def feed(self, data: memoryview | bytes) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _hash_cache_file() -> Path:
    root = os.environ.get("TASKVEC_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "taskvec")
    return Path(root) / "content-hashes.json"


#: An entry stored less than this long after its files last changed is "racily clean" (as in
#: git's index): a same-size rewrite within one timestamp tick would not change the key, so
#: such an entry is re-hashed (and stored again, now trusted) instead of believed.
RACY_NS = 1_000_000_000


def _hash_cache_get(key: str) -> dict | None:
    try:
        hit = json.loads(_hash_cache_file().read_text()).get(key)
    except (OSError, ValueError):
        return None
    return hit if isinstance(hit, dict) and isinstance(hit.get("sha"), str) and isinstance(hit.get("at"), int) else None


def _hash_cache_put(key: str, digest: str) -> None:
    path = _hash_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
        cache[key] = {"sha": digest, "at": time.time_ns()}
        if len(cache) > 10000:
            cache = dict(list(cache.items())[-5000:])
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(cache))
    except OSError:
        pass  # the cache is an optimisation only


def file_sha256(path: str | os.PathLike, *, use_cache: bool = True) -> str:
    """sha256 of a file's bytes, cached like content hashes (by path, size, mtime, ctime, inode)."""
    path = Path(path)

    def compute() -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        return h.hexdigest()

    return _cached(_stat_key("file:", [path]) if use_cache else None, compute)


def _stat_key(kind: str, files) -> str | None:
    """Cache key of a set of files: (resolved path, device, inode, size, mtime, ctime) each.

    ctime is part of the key (as in git's index): restoring a rewritten
    file's mtime (``touch -r``, ``os.utime``) sets its ctime to now, which no
    user can set back, so the key changes. The key ends with ``:NEWEST``, the
    latest change time of the files, for the racily-clean check of :func:`_cached`.
    """
    if os.environ.get("TASKVEC_NO_HASH_CACHE"):
        return None
    parts = []
    newest = 0
    for file in sorted(Path(f) for f in files):
        st = file.stat()
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
        parts.append(f"{file.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}")
    return f"{kind}{hashlib.sha256(os.fsencode(chr(10).join(parts))).hexdigest()}:{newest}"


def _cached(key: str | None, compute, *, store: bool = True) -> str | None:
    """``compute()``, memoised in the hash cache under ``key`` (no caching when key is None).

    A hit is believed only if it was stored at least :data:`RACY_NS` after
    the files last changed; otherwise the hash is recomputed and stored again.
    """
    if key is not None and (hit := _hash_cache_get(key)):
        newest = int(key.rsplit(":", 1)[1])
        if hit["at"] - newest >= RACY_NS:
            return hit["sha"]
    digest = compute()
    if key is not None and store:
        _hash_cache_put(key, digest)
    return digest
