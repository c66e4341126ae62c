"""The MLflow model registry side of the pipeline: access, materialise, register, lineage, reproduce.

Everything that talks to the registry lives here, once: the client
(:func:`mlflow_client`), versions and aliases (:func:`get_version`,
:func:`alias_version`, :func:`ledger_of`), artifact downloads
(:func:`download_version`, :func:`model_folder`), the vector files of a
ledger (:class:`VectorResolver`), the one way to turn a ledger into weights
(:func:`materialise`) and the one way to register a model folder
(:func:`register_model`). Promotion, rollback, reproduce and the register
step all use these, with the tracking URI they were given threaded through
every client and every download.

**What is registered** (``register.weights`` of params.yaml, default
``thin``). A version is a logged MLflow *pyfunc* model
(:class:`pipeline.ops.serving.TaskvecModel`, the ``taskvec`` code shipped
with it via ``code_paths``, a signature ``text``/``task`` →
``label``/``probability``) whose ``model`` artifact is

* ``thin``: the edit ledger, the heads and the model card, and a manifest
  naming the base by content hash and each vector by sha256 and its place in
  the content-addressed vector store (:mod:`pipeline.ops.store`: one upload
  per vector, shared by every version). Loading it — ``mlflow.pyfunc``,
  serving, :func:`download_version` (and so promotion and rollback) —
  materialises base + Σλτ with :func:`materialise`, caches the weights
  locally by content hash and checks that hash
  (:mod:`pipeline.ops.materialise`). Registration materialises it once
  first, so a version that would not rebuild is never registered.
* ``full``: the whole Hugging Face folder, byte for byte, as before
  (``AutoModel.from_pretrained`` loads the raw artifact without taskvec);
  the vectors still go to the store once.

**Tags** on every version make it reproducible: ``taskvec.ledger`` (the whole
edit ledger), ``taskvec.base_model``/``taskvec.base_hash``/
``taskvec.output_hash``, ``taskvec.edits`` (ordered vector sha256, λ,
method), ``taskvec.weights`` (thin/full), ``taskvec.vectors`` (sha256 →
store URI), ``taskvec.composition``, ``git.commit``/``git.dirty``,
``dvc.lock`` (md5 of each input recorded in dvc.lock) and
``dvc.lock_sha256``, ``params.sha256``, ``data.digests``,
``prefect.flow_run_id``, plus the metrics summary (:mod:`pipeline.ops.provenance`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from taskvec.errors import TaskvecError

from pipeline.ops import store, tracking
from pipeline.ops.materialise import complete_weights, ledger_shas, materialise, read_manifest, segments
from pipeline.ops.provenance import LEDGER_TAG, _dump, dvc_lock_hashes, edits_of, ledger_tags, version_tags

__all__ = [
    "LEDGER_TAG", "VectorResolver", "alias_version", "download_version", "dvc_lock_hashes", "edits_of", "format_lineage",
    "get_version", "ledger_of", "ledger_tags", "lineage", "materialise", "mlflow_client", "model_folder", "register",
    "register_model", "reproduce", "segments", "version_tags",
]


def _load_pyfunc(data_path: str):
    """Loader of versions registered before the serving model (``loader_module="pipeline.ops.registry"``)."""
    from pipeline.ops.serving import EditedModel

    return EditedModel(data_path)


# ---------------------------------------------------------------------------
# Client, versions, aliases, downloads


def mlflow_client(tracking_uri: str | None = None):
    """A client on ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else params.yaml (tracking = registry URI)."""
    from mlflow import MlflowClient

    from pipeline.ops.services import mlflow_uri

    uri = mlflow_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _params_tracking_uri())
    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except Exception as exc:  # noqa: BLE001 - bad URI scheme, store that cannot be opened
        raise TaskvecError(f"MLflow tracking store {tracking.redact(uri)} is not usable: {tracking.redact(_first_line(exc))}") from None


def _params_tracking_uri() -> str | None:
    from pipeline.params import MlflowSection, load

    path = Path(os.environ.get("TASKVEC_PARAMS", "params.yaml"))
    return (load(path).mlflow if path.is_file() else MlflowSection()).tracking_uri


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_not_found(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "") or ""
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND") or "not found" in str(exc).lower()


def alias_version(client, model: str, alias: str) -> str | None:
    """The version an alias points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException as exc:
        if _is_not_found(exc):
            return None
        raise


def get_version(client, model: str, ref: str | int):
    """The model version for ``ref``: a number, or an alias (``champion``, ``@challenger``)."""
    from mlflow.exceptions import MlflowException

    ref = str(ref).strip().lstrip("@")
    try:
        client.get_registered_model(model)
    except MlflowException as exc:
        if _is_not_found(exc):
            raise TaskvecError(f"registered model {model!r} not found") from None
        raise TaskvecError(f"MLflow registry {tracking.redact(getattr(client, 'tracking_uri', ''))}: {tracking.redact(_first_line(exc))}") from None
    if not ref.isdigit():
        v = alias_version(client, model, ref)
        if v is None:
            raise TaskvecError(f"model {model!r} has no version with alias {ref!r}")
        ref = v
    try:
        return client.get_model_version(model, ref)
    except MlflowException as exc:
        if _is_not_found(exc):
            raise TaskvecError(f"model {model!r} has no version {ref}") from None
        raise


def ledger_of(client, mv) -> dict:
    """The edit ledger of a version: its ``taskvec.ledger`` tag, else taskvec.json in its artifact."""
    raw = (mv.tags or {}).get(LEDGER_TAG)
    if raw:
        try:
            return json.loads(raw)
        except ValueError:
            raise TaskvecError(f"{mv.name} version {mv.version}: tag {LEDGER_TAG} is not JSON") from None
    from taskvec.engine import read_ledger

    with tempfile.TemporaryDirectory(prefix="taskvec-ledger-") as tmp:
        led = read_ledger(download_version(mv, tmp, getattr(client, "tracking_uri", None), thin_ok=False))
    if led is None:
        raise TaskvecError(f"{mv.name} version {mv.version} has no edit ledger (no {LEDGER_TAG} tag, no taskvec.json)")
    return led


def download_version(mv, dst: str | os.PathLike | None = None, tracking_uri: str | None = None, *, thin_ok: bool = True) -> Path:
    """Download a version's artifact (from *this* store) into ``dst`` and return the model folder in it.

    A thin version is completed (:func:`pipeline.ops.materialise.complete_weights`):
    the folder returned holds the weights, checked against the version's
    output hash. ``thin_ok=False`` returns the folder as stored.
    """
    import mlflow

    # without dst, a local store's artifact would be returned in place: never write weights into the store
    dst = Path(tempfile.mkdtemp(prefix="taskvec-download-")) if dst is None else Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        # models:/m-… sources resolve their logged model through MLflow's global URI: point it at this store
        with _fluent_uri(tracking_uri) if tracking_uri else tracking.LOCK:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=mv.source, dst_path=str(dst), tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
    except Exception as exc:  # MlflowException, OSError …
        raise TaskvecError(f"cannot download {mv.name} version {mv.version} from {tracking.redact(mv.source)}: {tracking.redact(_first_line(exc))}") from None
    folder = model_folder(Path(path))
    return complete_weights(folder, tracking_uri) if thin_ok else folder


def model_folder(root: str | os.PathLike) -> Path:
    """The HF folder (with taskvec.json) in a downloaded artifact: the root, ``artifacts/model`` or ``data/model``."""
    root = Path(root)
    if (root / "taskvec.json").is_file():
        return root
    for cand in sorted(root.glob("artifacts/*")) + sorted(root.glob("data/*")) + sorted(root.glob("*")):
        if (cand / "taskvec.json").is_file():
            return cand
    raise TaskvecError(f"{root} holds no edited model folder (no taskvec.json)")


# ---------------------------------------------------------------------------
# Vector files of a ledger


def find_vector(sha: str, places: list[Path]) -> Path | None:
    """The first ``.safetensors`` file with sha256 ``sha`` among files and folders (searched recursively)."""
    from taskvec.io import file_sha256

    for place in places:
        place = Path(place)
        candidates = [place] if place.is_file() else sorted(place.rglob("*.safetensors")) if place.is_dir() else []
        for path in candidates:
            try:
                if path.stat().st_size and file_sha256(path) == sha:
                    return path
            except OSError:
                continue
    return None


def run_vectors(client, mv, dst: Path) -> list[Path]:
    """The vector folders logged with the version's run (``vectors/``, ``edit/``), downloaded once."""
    if not getattr(mv, "run_id", None):
        return []
    import mlflow

    found = []
    for sub in ("vectors", "edit"):
        try:
            with _fluent_uri(client.tracking_uri):
                found.append(Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=sub, dst_path=str(dst), tracking_uri=client.tracking_uri)))
        except Exception:  # noqa: BLE001 - no such artifact folder
            continue
    return found


def _json_tag(mv, key: str) -> dict:
    try:
        return json.loads((mv.tags or {}).get(key) or "{}")
    except ValueError:
        raise TaskvecError(f"{mv.name} version {mv.version}: tag {key} is not JSON") from None


class VectorResolver:
    """``sha256 → file``: explicit files, then the vector store (the version's ``taskvec.vectors``), its run artifacts, local folders."""

    def __init__(self, client, mv, workdir: Path, explicit: list[Path] | None = None, search_dirs: list[Path] | None = None):
        self.client, self.mv, self.workdir = client, mv, Path(workdir)
        self.explicit = [Path(p) for p in explicit or []]
        self.search_dirs = [Path(d) for d in search_dirs] if search_dirs is not None else [Path("outputs/vectors"), Path("outputs/edit")]
        self._run_dirs: list[Path] | None = None
        self.sources: dict[str, str] = {}

    def __call__(self, sha: str) -> Path:
        from taskvec.io import file_sha256

        for p in self.explicit:
            if not p.is_file():
                raise TaskvecError(f"vector file not found: {p}")
        hit = find_vector(sha, self.explicit)
        stored = _json_tag(self.mv, store.VECTORS_TAG).get(sha)
        if hit is None and stored:
            from pipeline.ops.materialise import fetch_vector

            self.sources[sha] = stored
            return fetch_vector(sha, stored, self.client.tracking_uri)
        if hit is None:
            if self._run_dirs is None:
                self._run_dirs = run_vectors(self.client, self.mv, self.workdir / "run-vectors")
            hit = find_vector(sha, self._run_dirs)
            if hit is not None:
                self.sources[sha] = f"runs:/{self.mv.run_id}/{hit.parent.name}/{hit.name}"
                return hit
            hit = find_vector(sha, self.search_dirs)
        if hit is not None:
            self.sources[sha] = str(hit)
            return hit
        if self.explicit:
            got = ", ".join(f"{p} ({file_sha256(p)[:12]})" for p in self.explicit)
            raise TaskvecError(f"no vector file with sha256 {sha[:12]} among {got}")
        raise TaskvecError(f"vector file with sha256 {sha[:12]} not found with version {self.mv.version}'s run or in {', '.join(map(str, self.search_dirs))}; give it with --vector PATH")


# ---------------------------------------------------------------------------
# register


@contextlib.contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``log_model``) at ``uri`` for the block, under the tracking lock."""
    import mlflow

    with tracking.LOCK:
        old_t, old_r = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(old_t)
            mlflow.set_registry_uri(old_r)
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def register_model(client, run_id: str, model_dir: str | os.PathLike, *, name: str, tags: dict[str, str], description: str = "", alias: str | None = None, vectors: list[Path] = (), version_description: str | None = None, weights: str = "thin", compress: dict | None = None) -> dict:
    """Log ``model_dir`` as the serving pyfunc in run ``run_id`` (same store as ``client``), register a new version.

    The one registration path: the register step and rollback both use it, so
    every version has an MLmodel, a signature, its artifacts under the run's
    experiment artifact root, and the ledger tags. ``vectors`` go to the
    content-addressed store (once each); ``weights="thin"`` logs the thin
    version (every ledger vector must be given or already stored, and the
    version must materialise to its output hash), ``"full"`` the whole folder.
    ``compress`` (``register.compress``, thin only) stores compressed copies
    of the given vectors instead (:func:`pipeline.ops.store.compress_vectors`)
    and records the served model's hash and max |θ̂ − θ| (tag
    ``taskvec.compression``); the exact vectors are not uploaded.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.ops import serving

    if weights not in store.WEIGHTS:
        raise TaskvecError(f"unknown weights mode {weights!r}: use thin or full")
    model_dir = Path(model_dir)
    ledger_file = model_dir / "taskvec.json"
    if not ledger_file.is_file():
        raise TaskvecError(f"{model_dir} has no edit ledger (taskvec.json); nothing registered")
    ledger = json.loads(ledger_file.read_text())
    if compress is not None and weights != "thin":
        raise TaskvecError("register.compress stores a thin version's vectors; it needs weights: thin")
    shas = ledger_shas(ledger)
    with tempfile.TemporaryDirectory(prefix="taskvec-code-") as code:
        files, packed, compression = list(vectors), None, None
        if compress is not None:
            packed, compression = _compressed(model_dir, ledger, list(vectors), dict(compress), Path(code))
            files = [packed[s]["file"] for s in shas]
        with _fluent_uri(client.tracking_uri):
            refs = store.put_vectors(client, client.get_run(run_id).info.experiment_id, files, shas if weights == "thin" and packed is None else [])
        if packed is not None:  # the version's refs are keyed by the exact vectors (the ledger's), pointing at the stored copies
            refs = {s: {**refs[packed[s]["stored_sha256"]], "stored_sha256": packed[s]["stored_sha256"], "compression": packed[s]["compression"]} for s in shas}
            tags = {**tags, store.COMPRESSION_TAG: _dump({**compression, "vectors": {s: r["uri"] for s, r in refs.items()}})}
        else:
            tags = {**tags, **({store.VECTORS_TAG: _dump({s: r["uri"] for s, r in refs.items()})} if refs else {})}
        tags[store.WEIGHTS_TAG] = weights
        artifact = model_dir
        if weights == "thin":
            artifact = Path(code) / "thin" / model_dir.name
            store.stage_thin(model_dir, refs, artifact, compression)
            store.verify_thin(artifact, files, client.tracking_uri)
        code_paths = serving.code_paths(Path(code) / "code")
        with _fluent_uri(client.tracking_uri), mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(type hints|input example).*", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=serving.TaskvecModel(),
                artifacts={"model": str(artifact)},
                code_paths=code_paths,
                pip_requirements=serving.requirements(store.base_requirements(ledger) if weights == "thin" else ()),
                signature=serving.signature(),
                metadata={"taskvec_output_hash": tags["taskvec.output_hash"], "taskvec_base_hash": tags["taskvec.base_hash"], "taskvec_weights": weights},
            )
    # MLflow's SQL registry resolves the logged model of a version through the *global* tracking URI
    # (MlflowClient() in create_model_version), so the registration runs with it pointed at this store too
    with _fluent_uri(client.tracking_uri):
        try:
            client.create_registered_model(name, description=description)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")):
                raise
        mv = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags, description=version_description or f"edit {tags['taskvec.output_hash'][:12]}", model_id=info.model_id)
        if alias:
            client.set_registered_model_alias(name, alias, mv.version)
    return {"model": name, "version": str(mv.version), "alias": alias, "model_uri": f"models:/{name}/{mv.version}", "source": info.model_uri, "run_id": run_id, "model_id": info.model_id, "weights": weights}


def _compressed(model_dir: Path, ledger: dict, vectors: list[Path], spec: dict, work: Path) -> tuple[dict, dict]:
    """Compress the ledger's vectors and materialise base + Σλτ̂ once: ``(packed, compression)`` for :func:`store.stage_thin`."""
    packed = store.compress_vectors(vectors, spec, work / "compressed")
    missing = [s[:12] for s in ledger_shas(ledger) if s not in packed]
    if missing:
        raise TaskvecError(f"register.compress compresses the exact vectors, so every vector of the ledger must be given; missing {', '.join(missing)}")
    from pipeline.ops.materialise import cache_model, model_scratch

    # built once, into the load cache: the registration's verify_thin then finds it there (a hash check, not a second build)
    with model_scratch("taskvec-served-") as served:
        got = materialise(ledger["base_model"], ledger["edits"], lambda s: packed[s]["file"], served, base_hash=ledger["base_hash"])
        compression = {"spec": spec, "output_hash": got["output_hash"], "max_abs_weight_error": store.weight_error(model_dir, served)}
        cache_model(served, got["output_hash"])
    return packed, compression


def register(tracker: tracking.Tracker, step: tracking.StepRun, model_dir: str | os.PathLike, *, name: str, alias: str, tags: dict[str, str], vectors: list[Path], description: str, weights: str = "thin", compress: dict | None = None) -> dict:
    """The register step's call: :func:`register_model` in ``step``'s run, then set ``alias``."""
    return register_model(tracker.client, step.run_id, model_dir, name=name, alias=alias, tags=tags, vectors=vectors, description=description, weights=weights, compress=compress)


# ---------------------------------------------------------------------------
# lineage / reproduce


def _client(p):
    """A read-only client on the params' store (no experiment is created)."""
    return mlflow_client(tracking.resolve_tracking_uri(p))


def lineage(p, model: str, version: str) -> dict:
    """The reproducibility record of a registered version (tags decoded, run and aliases)."""
    client = _client(p)
    mv = get_version(client, model, version)
    decoded: dict[str, Any] = {}
    for k, v in sorted((mv.tags or {}).items()):
        try:
            decoded[k] = json.loads(v) if v[:1] in "[{" else v
        except ValueError:
            decoded[k] = v
    return {
        "model": model,
        "version": str(mv.version),
        "aliases": list(getattr(mv, "aliases", []) or []),
        "status": mv.status,
        "source": tracking.redact(mv.source),
        "run_id": mv.run_id,
        "created": mv.creation_timestamp,
        "tracking_uri": tracking.redact(client.tracking_uri),
        "ledger": decoded.get(LEDGER_TAG),
        "tags": {k: v for k, v in decoded.items() if k != LEDGER_TAG},
    }


def format_lineage(rec: dict) -> str:
    lines = [f"{rec['model']} version {rec['version']}  aliases: {', '.join(rec['aliases']) or '–'}  status: {rec['status']}", f"source: {rec['source']}  run: {rec['run_id']}"]
    ledger = rec.get("ledger") or {}
    lines.append(f"base: {ledger.get('base_model')}  content hash {ledger.get('base_hash')}")
    for i, e in enumerate(edits_of(ledger), 1):
        extra = "".join(f" {k}={e[k]}" for k in ("density", "drop", "seed") if k in e)
        lines.append(f"  edit {i}: vector {e['vector_sha256']}  λ={e['lambda']:+.6g}  method={e['method']}{extra}")
    lines.append(f"output: content hash {ledger.get('output_hash')}")
    for k, v in rec["tags"].items():
        lines.append(f"{k}: {json.dumps(v, sort_keys=True) if not isinstance(v, str) else v}")
    return "\n".join(lines)


def reproduce(p, model: str, version: str, *, workdir: str | os.PathLike | None = None, client=None) -> dict:
    """Rebuild the weights of a registered version from its ledger (:func:`materialise`) and check the content hashes.

    Vectors come from the vector store (the version's ``taskvec.vectors``), the
    version's run artifacts (``vectors/``, older versions) or
    ``outputs/vectors``/``outputs/edit`` when their sha256 matches. The rebuild
    is fresh (not the load cache); a thin version's registered hash is the one
    its manifest records. The base is
    resolved from the ledger's ``base_model`` and must have the ledger's
    ``base_hash``. Returns a report with ``ok`` true when rebuilt == ledger == registered.
    """
    from taskvec.io import TensorSource

    from pipeline import params as P

    client = client or _client(p)
    mv = get_version(client, model, version)
    if LEDGER_TAG not in (mv.tags or {}):
        raise TaskvecError(f"{model} version {mv.version} has no {LEDGER_TAG} tag; it was not registered by the taskvec pipeline")
    ledger = ledger_of(client, mv)
    with tempfile.TemporaryDirectory(prefix="taskvec-reproduce-", dir=workdir) as tmp:
        tmp = Path(tmp)
        folder = download_version(mv, tmp / "registered", client.tracking_uri, thin_ok=False)
        manifest = read_manifest(folder)
        compression = (manifest or {}).get("compression")
        if manifest is not None:  # a thin version registers no weights, only the hash they must have
            registered_hash = compression["exact_output_hash"] if compression else manifest["output_hash"]
        else:
            with TensorSource(folder) as src:
                registered_hash = src.content_hash(use_cache=False)
        resolve = VectorResolver(client, mv, tmp, search_dirs=[p.root / P.OUTPUTS / "vectors", p.root / P.OUTPUTS / "edit"])
        rebuilt = materialise(ledger["base_model"], ledger["edits"], resolve, tmp / "rebuilt", base_hash=ledger["base_hash"])
        rebuilt_hash = rebuilt["output_hash"]
        served = None
        if compression:  # and the weights it serves: base + Σλτ̂ from the stored (compressed) vectors
            from pipeline.ops.materialise import fetch_stored

            refs = manifest["vectors"]
            got = materialise(ledger["base_model"], ledger["edits"], lambda s: fetch_stored(refs, s, client.tracking_uri), tmp / "served", base_hash=ledger["base_hash"])
            served = {"hash": got["output_hash"], "recorded": manifest["output_hash"], "spec": compression["spec"], "max_abs_weight_error": compression["max_abs_weight_error"]}
    return {
        "model": model,
        "version": str(mv.version),
        "ok": rebuilt_hash == ledger["output_hash"] == registered_hash and (served is None or served["hash"] == served["recorded"]),
        "served": served,
        "ledger_output_hash": ledger["output_hash"],
        "rebuilt_hash": rebuilt_hash,
        "registered_hash": registered_hash,
        "base_hash": ledger["base_hash"],
        "weights": "thin" if manifest is not None else "full",
        "vectors": resolve.sources,
    }
