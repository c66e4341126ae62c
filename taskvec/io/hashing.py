"""Content hashing of tensors and files, with the on-disk hash cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from taskvec.io.atomic import atomic_path

class ContentHasher:
    """Incremental form of :meth:`TensorSource.content_hash` (feed tensors in sorted name order)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, name: str, dtype: str, shape: tuple[int, ...], data: memoryview | bytes) -> None:
        self._h.update(f"{name}\0{dtype}\0{list(shape)}\0".encode())
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _hash_cache_file() -> Path:
    root = os.environ.get("TASKVEC_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "taskvec")
    return Path(root) / "content-hashes.json"


def _hash_cache_get(key: str) -> str | None:
    try:
        return json.loads(_hash_cache_file().read_text()).get(key)
    except (OSError, ValueError):
        return None


def _hash_cache_put(key: str, digest: str) -> None:
    path = _hash_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
        cache[key] = digest
        if len(cache) > 10000:
            cache = dict(list(cache.items())[-5000:])
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(cache))
    except OSError:
        pass  # the cache is an optimisation only


def file_sha256(path: str | os.PathLike, *, use_cache: bool = True) -> str:
    """sha256 of a file's bytes, cached like content hashes (by path, size, mtime, inode)."""
    path = Path(path)

    def compute() -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        return h.hexdigest()

    return _cached(_stat_key("file:", [path]) if use_cache else None, compute)


def _stat_key(kind: str, files) -> str | None:
    """Cache key of a set of files: (resolved path, size, mtime, inode) each, as DVC keys file hashes."""
    if os.environ.get("TASKVEC_NO_HASH_CACHE"):
        return None
    parts = []
    for file in sorted(Path(f) for f in files):
        st = file.stat()
        parts.append(f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}")
    return kind + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _cached(key: str | None, compute) -> str:
    """``compute()``, memoised in the hash cache under ``key`` (no caching when key is None)."""
    if key is not None and (hit := _hash_cache_get(key)):
        return hit
    digest = compute()
    if key is not None:
        _hash_cache_put(key, digest)
    return digest
