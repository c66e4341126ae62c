"""The MLflow model registry side of the pipeline: register, lineage, reproduce.

**What is registered.** The edited model folder (``outputs/model``: a plain
Hugging Face encoder folder with ``taskvec.json``, ``heads/`` and the
``README.md`` model card) is logged as an MLflow *pyfunc* model whose loader
is this module (``loader_module="pipeline.ops.registry"``, the folder as
``data_path``) and registered as a new version of the registered model, with
alias ``challenger``. Why a pyfunc over the stored weights rather than the
``transformers`` flavour or a pyfunc that rebuilds base + Σλτ at load time:

* the artifact *is* the Hugging Face folder, byte for byte, so
  ``AutoModel.from_pretrained(<downloaded>/data/model)`` loads it with no
  MLflow at all, and the ``transformers`` flavour's pipeline-task inference
  (which does not know our frozen-head encoders) is avoided;
* ``mlflow.pyfunc.load_model("models:/NAME@challenger").predict(df)`` scores
  texts with the task heads (columns ``text`` and ``task``) for serving;
* loading does not depend on the base model or the vector files being
  reachable; rebuilding base + Σλτ is what :func:`reproduce` does, as an
  audit, comparing content hashes.

**Tags** on every version make it reproducible: ``taskvec.ledger`` (the whole
edit ledger), ``taskvec.base_model``/``taskvec.base_hash``/
``taskvec.output_hash``, ``taskvec.edits`` (ordered vector sha256, λ,
method), ``taskvec.composition``, ``git.commit``/``git.dirty``,
``dvc.lock`` (md5 of each input recorded in dvc.lock) and
``dvc.lock_sha256``, ``params.sha256``, ``data.digests``,
``prefect.flow_run_id``, plus the metrics summary. The task vectors are
logged with the version's run under ``vectors/`` (``register.log_vectors``)
so :func:`reproduce` needs nothing but the registry and the base model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from taskvec.errors import TaskvecError

from pipeline.ops import tracking

LEDGER_TAG = "taskvec.ledger"


# ---------------------------------------------------------------------------
# pyfunc loader (mlflow.pyfunc.load_model calls _load_pyfunc(data_path))


class EditedModel:
    """Encoder + frozen heads. ``predict`` takes a DataFrame (``text``, ``task``) or a list of texts."""

    def __init__(self, folder: str | os.PathLike):
        from taskvec.heads import load_encoder

        self.folder = Path(folder)
        self.encoder, self.tokenizer, _ = load_encoder(self.folder)
        self.encoder.eval()
        self.ledger = json.loads((self.folder / "taskvec.json").read_text())
        self._heads: dict = {}

    def tasks(self) -> list[str]:
        return sorted(p.stem for p in (self.folder / "heads").glob("*.safetensors"))

    def head(self, task: str):
        from taskvec.heads import load_head

        if task not in self._heads:
            path = self.folder / "heads" / f"{task}.safetensors"
            if not path.is_file():
                raise TaskvecError(f"no head for task {task!r} (this model has: {', '.join(self.tasks()) or 'none'})")
            self._heads[task] = load_head(path)
        return self._heads[task]

    def predict(self, model_input: Any, params: dict | None = None) -> list[str]:
        import torch

        from taskvec.heads import encode

        if hasattr(model_input, "to_dict"):
            rows = model_input.to_dict("records")
        elif isinstance(model_input, dict):
            rows = [dict(zip(model_input, vals)) for vals in zip(*model_input.values())]
        else:
            rows = [dict(t) if isinstance(t, dict) else {"text": t} for t in model_input]
        default = (params or {}).get("task") or (self.tasks()[0] if self.tasks() else None)
        out: list[str] = []
        for row in rows:
            head = self.head(row.get("task") or default)
            emb = encode(self.encoder, self.tokenizer, [str(row["text"])])
            logits = head.scale * emb @ torch.nn.functional.normalize(head.weight.float(), dim=-1).T
            out.append(head.labels[int(logits.argmax(-1)[0])])
        return out


def _load_pyfunc(data_path: str) -> EditedModel:
    return EditedModel(data_path)


def model_folder(downloaded: str | os.PathLike) -> Path:
    """The HF folder inside a downloaded registered artifact (``data/model``), or the folder itself."""
    root = Path(downloaded)
    for cand in [root, *sorted((root / "data").glob("*"))] if (root / "data").is_dir() else [root]:
        if (cand / "taskvec.json").is_file():
            return cand
    raise TaskvecError(f"{root} holds no edited model folder (no taskvec.json)")


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


def version_tags(*, ledger: dict, composition: dict, git: dict, dvc_hashes: dict, dvc_sha: str | None, params_sha: str, digests: dict, flow_run_id: str | None, summary: dict) -> dict[str, str]:
    dump = lambda o: json.dumps(o, sort_keys=True, separators=(",", ":"), default=str)  # noqa: E731
    core = {k: v for k, v in ledger.items() if k != "weight_files"}
    tags = {
        LEDGER_TAG: dump(core),
        "taskvec.base_model": str(ledger["base_model"]),
        "taskvec.base_hash": str(ledger["base_hash"]),
        "taskvec.output_hash": str(ledger["output_hash"]),
        "taskvec.edits": dump([{k: e[k] for k in ("vector_sha256", "lambda", "method")} for e in edits_of(ledger)]),
        "taskvec.composition": dump(composition),
        "git.commit": str(git.get("commit")),
        "git.dirty": str(bool(git.get("dirty"))).lower(),
        "dvc.lock": dump(dvc_hashes),
        "dvc.lock_sha256": str(dvc_sha),
        "params.sha256": params_sha,
        "data.digests": dump(digests),
        "prefect.flow_run_id": str(flow_run_id or "none"),
        "metrics.summary": dump(summary),
    }
    return {k: tracking.redact(v) for k, v in tags.items()}


# ---------------------------------------------------------------------------
# register


def register(tracker: tracking.Tracker, step: tracking.StepRun, model_dir: str | os.PathLike, *, name: str, alias: str, tags: dict[str, str], vectors: list[Path], description: str) -> dict:
    """Log ``model_dir`` as a pyfunc model in ``step``'s run, register a new version, set ``alias``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from taskvec import __version__

    model_dir = Path(model_dir)
    client = tracker.client
    with tracking.LOCK, mlflow.start_run(run_id=step.run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            loader_module="pipeline.ops.registry",
            data_path=str(model_dir),
            pip_requirements=[f"taskvec=={__version__}", "torch", "transformers", "safetensors"],
            metadata={"taskvec_output_hash": tags["taskvec.output_hash"], "taskvec_base_hash": tags["taskvec.base_hash"]},
        )
    for vec in vectors:
        step.artifact(vec, "vectors")
    with tracking.LOCK:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")):
                raise
        mv = client.create_model_version(name, source=info.model_uri, run_id=step.run_id, tags=tags, description=f"edit {tags['taskvec.output_hash'][:12]}", model_id=info.model_id)
        client.set_registered_model_alias(name, alias, mv.version)
    return {"model": name, "version": str(mv.version), "alias": alias, "model_uri": f"models:/{name}/{mv.version}", "source": info.model_uri, "run_id": step.run_id, "model_id": info.model_id}


# ---------------------------------------------------------------------------
# lineage / reproduce


def _client(p):
    tracker = tracking.Tracker(p)
    return tracker, tracker.client


def get_version(client, model: str, version: str):
    from mlflow.exceptions import MlflowException

    v = str(version).lstrip("@")
    try:
        if v.isdigit():
            return client.get_model_version(model, v)
        return client.get_model_version_by_alias(model, v)
    except MlflowException as exc:
        raise TaskvecError(f"registered model {model!r} has no version {version!r}: {str(exc).splitlines()[0]}") from None


def lineage(p, model: str, version: str) -> dict:
    """The reproducibility record of a registered version (tags decoded, run and aliases)."""
    _, client = _client(p)
    mv = get_version(client, model, version)
    tags = dict(mv.tags or {})
    decoded: dict[str, Any] = {}
    for k, v in sorted(tags.items()):
        try:
            decoded[k] = json.loads(v) if v[:1] in "[{" else v
        except ValueError:
            decoded[k] = v
    aliases = list(getattr(mv, "aliases", []) or [])
    return {
        "model": model,
        "version": str(mv.version),
        "aliases": aliases,
        "status": mv.status,
        "source": tracking.redact(mv.source),
        "run_id": mv.run_id,
        "created": mv.creation_timestamp,
        "tracking_uri": tracking.redact(tracking.resolve_tracking_uri(p)),
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


def _find_vector(sha: str, candidates: list[Path]) -> Path | None:
    from taskvec.io import file_sha256

    for c in candidates:
        if c.is_file() and file_sha256(c) == sha:
            return c
    return None


def reproduce(p, model: str, version: str, *, workdir: str | os.PathLike | None = None) -> dict:
    """Rebuild the weights of a registered version from its ledger and check the content hashes.

    Vectors come from ``outputs/vectors`` when their sha256 matches, else from
    the version's run artifacts (``vectors/``). The base is resolved from the
    ledger's ``base_model`` and must have the ledger's ``base_hash``.
    Returns a report with ``ok`` true when rebuilt == ledger == registered.
    """
    from taskvec.engine import MergeOptions, apply
    from taskvec.io import TensorSource, resolve_model

    from pipeline import params as P

    tracker, client = _client(p)
    mv = get_version(client, model, version)
    tags = mv.tags or {}
    if LEDGER_TAG not in tags:
        raise TaskvecError(f"{model} version {mv.version} has no {LEDGER_TAG} tag; it was not registered by the taskvec pipeline")
    ledger = json.loads(tags[LEDGER_TAG])
    with tempfile.TemporaryDirectory(prefix="taskvec-reproduce-", dir=workdir) as tmp:
        tmp = Path(tmp)
        import mlflow

        with tracking.LOCK:
            downloaded = mlflow.artifacts.download_artifacts(f"models:/{model}/{mv.version}", dst_path=str(tmp / "registered"))
        folder = model_folder(downloaded)
        with TensorSource(folder) as src:
            registered_hash = src.content_hash(use_cache=False)
        with TensorSource(resolve_model(ledger["base_model"])) as src:
            base_hash = src.content_hash()
        if base_hash != ledger["base_hash"]:
            raise TaskvecError(f"base {ledger['base_model']} has content hash {base_hash[:12]}, the ledger records {ledger['base_hash'][:12]}")
        local = sorted((p.root / P.OUTPUTS / "vectors").glob("*.safetensors")) + sorted((p.root / P.OUTPUTS / "edit").glob("*.safetensors"))
        remote: list[Path] | None = None
        sources: dict[str, str] = {}

        def vector(sha: str) -> Path:
            nonlocal remote
            found = _find_vector(sha, local)
            if found:
                sources[sha] = str(found)
                return found
            if remote is None:
                try:
                    with tracking.LOCK:
                        d = client.download_artifacts(mv.run_id, "vectors", str(tmp / "vectors"))
                    remote = sorted(Path(d).rglob("*.safetensors"))
                except Exception:  # noqa: BLE001 - no vectors logged with this version
                    remote = []
            found = _find_vector(sha, remote)
            if not found:
                raise TaskvecError(f"vector {sha[:12]} of the ledger is neither in outputs/vectors nor in the run's artifacts")
            sources[sha] = f"runs:/{mv.run_id}/vectors/{found.name}"
            return found

        current: str | Path = ledger["base_model"]
        groups: list[tuple[list[tuple[str, float]], MergeOptions]] = []
        for e in ledger["edits"]:
            items = e.get("merge", [e])
            opts = MergeOptions(method=e.get("method", "sum"), density=e.get("density", 1.0), drop=e.get("drop", 0.0), seed=e.get("seed", 0))
            pairs = [(str(vector(i["vector_sha256"])), float(i["lambda"])) for i in items]
            if "merge" not in e and groups and groups[-1][1].method == "sum" and opts.method == "sum":
                groups[-1][0].extend(pairs)  # consecutive sum edits are one apply, as the pipeline wrote them
            else:
                groups.append((pairs, opts))
        rebuilt = None
        for n, (pairs, opts) in enumerate(groups):
            out = tmp / f"rebuilt-{n}"
            rebuilt = apply(current, pairs, out, options=opts)
            current = out
        rebuilt_hash = rebuilt["output_hash"] if rebuilt else base_hash
        ok = rebuilt_hash == ledger["output_hash"] == registered_hash
        return {
            "model": model,
            "version": str(mv.version),
            "ok": ok,
            "ledger_output_hash": ledger["output_hash"],
            "rebuilt_hash": rebuilt_hash,
            "registered_hash": registered_hash,
            "base_hash": base_hash,
            "vectors": sources,
        }
