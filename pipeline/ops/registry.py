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

**What is registered.** The edited model folder (a plain Hugging Face encoder
folder with ``taskvec.json``, ``heads/`` and the ``README.md`` model card) is
logged as an MLflow *pyfunc* model (:class:`pipeline.ops.serving.TaskvecModel`,
the folder as its ``model`` artifact, the ``taskvec`` code shipped with it via
``code_paths``, a signature ``text``/``task`` → ``label``/``probability``) and
registered as a new version. The artifact *is* the Hugging Face folder, byte
for byte (``artifacts/model``), so ``AutoModel.from_pretrained`` loads it
without MLflow; loading does not need the base model or the vectors —
rebuilding base + Σλτ is what :func:`reproduce` does, as an audit.

**Tags** on every version make it reproducible: ``taskvec.ledger`` (the whole
edit ledger), ``taskvec.base_model``/``taskvec.base_hash``/
``taskvec.output_hash``, ``taskvec.edits`` (ordered vector sha256, λ,
method), ``taskvec.composition``, ``git.commit``/``git.dirty``,
``dvc.lock`` (md5 of each input recorded in dvc.lock) and
``dvc.lock_sha256``, ``params.sha256``, ``data.digests``,
``prefect.flow_run_id``, plus the metrics summary. The task vectors are
logged with the version's run under ``vectors/`` so :func:`reproduce` needs
nothing but the registry and the base model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from taskvec.errors import TaskvecError

from pipeline.ops import tracking

LEDGER_TAG = "taskvec.ledger"


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
        led = read_ledger(download_version(mv, tmp, getattr(client, "tracking_uri", None)))
    if led is None:
        raise TaskvecError(f"{mv.name} version {mv.version} has no edit ledger (no {LEDGER_TAG} tag, no taskvec.json)")
    return led


def download_version(mv, dst: str | os.PathLike | None = None, tracking_uri: str | None = None) -> Path:
    """Download a version's artifact (from *this* store) and return the model folder in it."""
    import mlflow

    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        # models:/m-… sources resolve their logged model through MLflow's global URI: point it at this store
        with _fluent_uri(tracking_uri) if tracking_uri else tracking.LOCK:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=mv.source, dst_path=None if dst is None else str(dst), tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
    except Exception as exc:  # MlflowException, OSError …
        raise TaskvecError(f"cannot download {mv.name} version {mv.version} from {tracking.redact(mv.source)}: {tracking.redact(_first_line(exc))}") from None
    return model_folder(Path(path))


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


class VectorResolver:
    """``sha256 → file``: explicit files first, then the version's run artifacts, then local search folders."""

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
# Ledger → weights: the one canonical rebuild


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

    Reproduce, rollback and registration all build weights with this, so they
    agree bit for bit. With no edits, ``out`` is a copy of the base with a
    ledger whose output hash is the base's. Returns the ledger written.
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
            # the first step names the base as the ledger does (a hub id stays an id: no absolute path in the new ledger)
            ledger = apply(base if i == 0 else current, [(resolve(e["vector_sha256"]), float(e["lambda"])) for e in items], step, options=options)
            current = step
    if base_hash is not None and ledger.get("base_hash") != base_hash:
        raise TaskvecError(f"base {base} has content hash {str(ledger.get('base_hash'))[:12]}, the ledger records {base_hash[:12]}")
    return ledger


# ---------------------------------------------------------------------------
# provenance helpers


def dvc_lock_hashes(root: str | os.PathLike) -> tuple[dict[str, str], str | None]:
    """``({path: md5}, sha256 of dvc.lock)`` for every stage out and external dep recorded in dvc.lock."""
    import hashlib

    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return {}, None
    raw = lock.read_bytes()
    data = yaml.safe_load(raw) or {}
    hashes: dict[str, str] = {}
    for name, stage in (data.get("stages") or {}).items():
        if name == "register":
            continue
        for kind in ("outs", "deps"):
            for entry in stage.get(kind) or []:
                path = entry.get("path", "")
                if kind == "deps" and not (path.startswith("outputs/") or path.startswith("..") or path.startswith("/")):
                    continue  # code deps are covered by git.commit
                md5 = entry.get("md5") or entry.get("hash") or ""
                if md5:
                    hashes[path] = md5
    return dict(sorted(hashes.items())), hashlib.sha256(raw).hexdigest()


def edits_of(ledger: dict) -> list[dict]:
    """Flat ordered list of {vector_sha256, vector, lambda, method, ...} of a ledger."""
    out = []
    for e in ledger.get("edits", []):
        opts = {k: v for k, v in e.items() if k not in ("merge", "vector_sha256", "vector", "lambda")}
        for item in e.get("merge", [e]):
            out.append({"vector_sha256": item["vector_sha256"], "vector": item.get("vector"), "lambda": item["lambda"], **opts})
    return out


def _dump(o: Any) -> str:
    return json.dumps(o, sort_keys=True, separators=(",", ":"), default=str)


def ledger_tags(ledger: dict) -> dict[str, str]:
    """The tags every registered version carries about its weights (ledger, hashes, ordered edits)."""
    core = {k: v for k, v in ledger.items() if k != "weight_files"}
    return {
        LEDGER_TAG: _dump(core),
        "taskvec.base_model": str(ledger["base_model"]),
        "taskvec.base_hash": str(ledger["base_hash"]),
        "taskvec.output_hash": str(ledger["output_hash"]),
        "taskvec.edits": _dump([{k: e[k] for k in ("vector_sha256", "lambda", "method")} for e in edits_of(ledger)]),
    }


def version_tags(*, ledger: dict, composition: dict, git: dict, dvc_hashes: dict, dvc_sha: str | None, params_sha: str, digests: dict, flow_run_id: str | None, summary: dict) -> dict[str, str]:
    tags = {
        **ledger_tags(ledger),
        "taskvec.composition": _dump(composition),
        "git.commit": str(git.get("commit")),
        "git.dirty": str(bool(git.get("dirty"))).lower(),
        "dvc.lock": _dump(dvc_hashes),
        "dvc.lock_sha256": str(dvc_sha),
        "params.sha256": params_sha,
        "data.digests": _dump(digests),
        "prefect.flow_run_id": str(flow_run_id or "none"),
        "metrics.summary": _dump(summary),
    }
    return {k: tracking.redact(v) for k, v in tags.items()}


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


def register_model(client, run_id: str, model_dir: str | os.PathLike, *, name: str, tags: dict[str, str], description: str = "", alias: str | None = None, vectors: list[Path] = (), version_description: str | None = None) -> dict:
    """Log ``model_dir`` as the serving pyfunc in run ``run_id`` (same store as ``client``), register a new version.

    The one registration path: the register step and rollback both use it, so
    every version has an MLmodel, a signature, its artifacts under the run's
    experiment artifact root, and the ledger tags.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.ops import serving

    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="taskvec-code-") as code:
        code_paths = serving.code_paths(Path(code))
        with _fluent_uri(client.tracking_uri), mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(type hints|input example).*", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=serving.TaskvecModel(),
                artifacts={"model": str(model_dir)},
                code_paths=code_paths,
                pip_requirements=serving.requirements(),
                signature=serving.signature(),
                metadata={"taskvec_output_hash": tags["taskvec.output_hash"], "taskvec_base_hash": tags["taskvec.base_hash"]},
            )
    # MLflow's SQL registry resolves the logged model of a version through the *global* tracking URI
    # (MlflowClient() in create_model_version), so the registration runs with it pointed at this store too
    with _fluent_uri(client.tracking_uri):
        for vec in vectors:
            client.log_artifact(run_id, str(vec), "vectors")
        try:
            client.create_registered_model(name, description=description)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")):
                raise
        mv = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags, description=version_description or f"edit {tags['taskvec.output_hash'][:12]}", model_id=info.model_id)
        if alias:
            client.set_registered_model_alias(name, alias, mv.version)
    return {"model": name, "version": str(mv.version), "alias": alias, "model_uri": f"models:/{name}/{mv.version}", "source": info.model_uri, "run_id": run_id, "model_id": info.model_id}


def register(tracker: tracking.Tracker, step: tracking.StepRun, model_dir: str | os.PathLike, *, name: str, alias: str, tags: dict[str, str], vectors: list[Path], description: str) -> dict:
    """The register step's call: :func:`register_model` in ``step``'s run, then set ``alias``."""
    return register_model(tracker.client, step.run_id, model_dir, name=name, alias=alias, tags=tags, vectors=vectors, description=description)


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

    Vectors come from the version's run artifacts (``vectors/``) or
    ``outputs/vectors``/``outputs/edit`` when their sha256 matches. The base is
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
        folder = download_version(mv, tmp / "registered", client.tracking_uri)
        with TensorSource(folder) as src:
            registered_hash = src.content_hash(use_cache=False)
        resolve = VectorResolver(client, mv, tmp, search_dirs=[p.root / P.OUTPUTS / "vectors", p.root / P.OUTPUTS / "edit"])
        rebuilt = materialise(ledger["base_model"], ledger["edits"], resolve, tmp / "rebuilt", base_hash=ledger["base_hash"])
        rebuilt_hash = rebuilt["output_hash"]
    return {
        "model": model,
        "version": str(mv.version),
        "ok": rebuilt_hash == ledger["output_hash"] == registered_hash,
        "ledger_output_hash": ledger["output_hash"],
        "rebuilt_hash": rebuilt_hash,
        "registered_hash": registered_hash,
        "base_hash": ledger["base_hash"],
        "vectors": resolve.sources,
    }
