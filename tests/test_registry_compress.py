"""``register.compress``: a thin version whose vectors are stored top-k / bfloat16, with the error recorded.

Real MLflow on a SQLite file and the tiny BERT with two task vectors. The
served weights are checked against base + Σλτ̂ computed here by hand (τ̂ = the
top-⌊d·n⌋ entries of τ by magnitude, rounded to bfloat16), the recorded
error against max |θ̂ − θ| computed here, and the store against the files
actually written; ``taskvec reproduce`` re-derives both hashes.
"""

from __future__ import annotations

import json
import math
import shutil
import types
from pathlib import Path

import pytest

from taskvec.errors import TaskvecError
from tests.conftest_pipeline import pipeline_env, tiny_project  # noqa: F401 - fixtures
from tests.conftest_tasks import make_model
from tests.test_pipeline_coeffs import composed  # noqa: F401 - fixture: a tiny project fine-tuned, extracted and composed

SPEC = {"dtype": "bfloat16", "density": 0.25}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    from taskvec.engine import apply, extract
    from taskvec.heads import build_head, load_encoder, save_head
    from tests.conftest import perturb

    root = tmp_path_factory.mktemp("compress")
    base = make_model(root / "base")
    vecs = [extract(base, perturb(base, root / f"ft{i}", seed=20 + i, scale=0.02), root / "vectors" / f"t{i}.safetensors") for i in (1, 2)]
    folder = root / "model"
    apply(base, [(v.path, 0.5) for v in vecs], folder)
    encoder, tokenizer, _ = load_encoder(folder)
    save_head(build_head(encoder, tokenizer, "senti", ["negative", "positive"], ["bad", "good"]), folder / "heads" / "senti.safetensors")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("compress", artifact_location=(root / "mlartifacts").as_uri())
    return types.SimpleNamespace(root=root, base=base, vecs=vecs, folder=folder, uri=uri, client=client, exp=exp)


def _register(s, folder: Path, name: str, vectors=None, compress=SPEC, weights="thin") -> dict:
    from pipeline.ops import registry

    rid = s.client.create_run(s.exp).info.run_id
    ledger = json.loads((folder / "taskvec.json").read_text())
    try:
        return registry.register_model(s.client, rid, folder, name=name, tags=registry.ledger_tags(ledger), vectors=[v.path for v in s.vecs] if vectors is None else vectors, weights=weights, compress=compress)
    finally:
        s.client.set_terminated(rid, "FINISHED")


def _hand(s, lambdas: list[float]) -> tuple[dict, dict]:
    """(θ̂ = base + Σλτ̂, θ = base + Σλτ) by hand, tensor by tensor, in float32."""
    import torch
    from safetensors.torch import load_file

    base = load_file(s.base / "model.safetensors")
    fts = [load_file(s.root / f"ft{i}" / "model.safetensors") for i in (1, 2)]
    served, exact = {}, {}
    for name, b in base.items():
        hat, full = b.clone(), b.clone()
        for ft, lam in zip(fts, lambdas):
            tau = ft[name] - b
            k = max(1, math.floor(SPEC["density"] * tau.numel()))
            keep = torch.zeros(tau.numel(), dtype=torch.bool)
            keep[tau.reshape(-1).abs().topk(k).indices] = True
            t_hat = torch.where(keep.reshape(tau.shape), tau, torch.zeros(())).to(torch.bfloat16).to(torch.float32)
            hat = hat + lam * t_hat
            full = full + lam * tau
        served[name], exact[name] = hat, full
    return served, exact


def test_compressed_version_serves_base_plus_compressed_vectors(store, monkeypatch, tmp_path):
    """Stored: the compressed copies only (smaller); served: base + Σλτ̂ exactly; recorded: the real max |θ̂ − θ|."""
    import mlflow
    import pandas as pd
    import torch
    from safetensors.torch import load_file

    from pipeline.ops import registry
    from pipeline.ops.materialise import MANIFEST
    from taskvec.io import TensorSource, file_sha256

    monkeypatch.setenv("TASKVEC_CACHE_DIR", str(tmp_path / "cache"))
    rec = _register(store, store.folder, "tv-comp")
    mv = store.client.get_model_version("tv-comp", rec["version"])
    comp = json.loads(mv.tags["taskvec.compression"])
    assert "taskvec.vectors" not in mv.tags  # the exact vectors are not in the store
    assert comp["spec"] == SPEC

    # the store holds one compressed file per vector, filed under its own sha256, each smaller than the exact one
    stored = sorted(p for p in (store.root / "mlartifacts").rglob("*.safetensors") if "vectors" in p.parts)
    assert len(stored) == 2
    exact_shas = {v.sha256 for v in store.vecs}
    for p in stored:
        assert p.parent.name == file_sha256(p) and p.parent.name not in exact_shas
        assert p.stat().st_size < 0.6 * store.vecs[0].path.stat().st_size  # 25 % of entries, bf16 values + indices

    raw = registry.download_version(mv, tmp_path / "raw", store.uri, thin_ok=False)
    man = json.loads((raw / MANIFEST).read_text())
    ledger = json.loads((raw / "taskvec.json").read_text())
    assert man["compression"]["exact_output_hash"] == ledger["output_hash"] == mv.tags["taskvec.output_hash"]
    assert man["output_hash"] == comp["output_hash"] != ledger["output_hash"]
    for v in store.vecs:
        ref = man["vectors"][v.sha256]
        assert ref["compression"]["dtype"] == "bfloat16" and ref["compression"]["density"] == 0.25
        assert ref["compression"]["kept_fraction"] == pytest.approx(0.25, abs=0.02)
        assert 0 < ref["compression"]["relative_l2_error"] < 1

    # the served weights are exactly base + Σ 0.5·τ̂, and the recorded bound is the measured max |θ̂ − θ|
    served, exact = _hand(store, [0.5, 0.5])
    full = registry.download_version(mv, tmp_path / "full", store.uri)
    got = load_file(full / "model.safetensors")
    assert set(got) == set(served)
    for name in served:
        assert torch.equal(got[name], served[name]), name
    worst = max(float((served[n] - exact[n]).abs().max()) for n in served)
    assert worst > 0 and man["compression"]["max_abs_weight_error"] == pytest.approx(worst, rel=1e-5)
    with TensorSource(full) as src:
        assert src.content_hash(use_cache=False) == man["output_hash"]

    # and it serves through the pyfunc
    mlflow.set_tracking_uri(store.uri)
    mlflow.set_registry_uri(store.uri)
    out = mlflow.pyfunc.load_model(f"models:/tv-comp/{rec['version']}").predict(pd.DataFrame({"text": ["good"], "task": ["senti"]}))
    assert set(out["probabilities"][0]) == {"negative", "positive"}

    # reproduce: the exact rebuild (vectors from outputs/vectors, as DVC keeps them) and the served rebuild (from the store)
    (tmp_path / "proj" / "outputs" / "vectors").mkdir(parents=True)
    for v in store.vecs:
        shutil.copy(v.path, tmp_path / "proj" / "outputs" / "vectors" / v.path.name)
    rep = registry.reproduce(types.SimpleNamespace(root=tmp_path / "proj"), "tv-comp", rec["version"], client=store.client)
    assert rep["ok"] and rep["registered_hash"] == ledger["output_hash"] == rep["rebuilt_hash"]
    assert rep["served"]["hash"] == man["output_hash"] and rep["served"]["spec"] == SPEC


def test_a_second_version_reuses_the_compressed_vectors(store, monkeypatch, tmp_path):
    """Compression is deterministic: a re-tuned λ over the same vectors adds no vector bytes to the store."""
    from taskvec.engine import apply

    monkeypatch.setenv("TASKVEC_CACHE_DIR", str(tmp_path / "cache"))
    _register(store, store.folder, "tv-reuse")
    before = sorted(p for p in (store.root / "mlartifacts").rglob("*.safetensors") if "vectors" in p.parts)
    folder = store.root / "model-b"
    apply(store.base, [(v.path, 0.25) for v in store.vecs], folder)
    rec = _register(store, folder, "tv-reuse")
    after = sorted(p for p in (store.root / "mlartifacts").rglob("*.safetensors") if "vectors" in p.parts)
    assert after == before and rec["version"] == "2"


def test_compression_refusals_register_nothing(store, tmp_path):
    """A missing vector, full weights with compression, a bad spec: one line each, and no version."""
    from pipeline.params import RegisterSection

    with pytest.raises(TaskvecError) as ei:
        _register(store, store.folder, "tv-bad", vectors=[store.vecs[0].path])
    assert "\n" not in str(ei.value) and "every vector of the ledger must be given" in str(ei.value)
    with pytest.raises(TaskvecError, match="needs weights: thin"):
        _register(store, store.folder, "tv-bad", weights="full")
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        store.client.get_registered_model("tv-bad")
    for bad in ({"weights": "full", "compress": {"dtype": "bfloat16"}}, {"compress": {"density": 0}}, {"compress": {"density": 1.5}}, {"compress": {"dtype": "int4"}}, {"compress": {"dtyp": "float16"}}):
        with pytest.raises(ValueError):
            RegisterSection.model_validate(bad)
    assert RegisterSection.model_validate({"compress": {"density": 0.1}}).compress.dtype == "bfloat16"


def test_register_step_stores_compressed_vectors_when_params_say_so(composed):
    """``register.compress`` in params.yaml reaches the registry: the version serves base + Σλτ̂ and says so."""
    import yaml
    from mlflow import MlflowClient

    from pipeline.steps import evaluate, register, search

    data = yaml.safe_load(composed.read_text())
    data["register"] = {**(data.get("register") or {}), "compress": {"dtype": "bfloat16", "density": 0.5}}
    data["search"] |= {"lambda_min": 0.5}  # a real edit (λ ≠ 0), so compression changes the served weights
    composed.write_text(yaml.safe_dump(data, sort_keys=False))
    search.main(composed)
    evaluate.main(composed)
    rec = register.main(composed)
    uri = f"sqlite:///{composed.parent / 'mlflow.db'}"
    mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(rec["model"], rec["version"])
    comp = json.loads(mv.tags["taskvec.compression"])
    assert comp["spec"] == {"dtype": "bfloat16", "density": 0.5} and "taskvec.vectors" not in mv.tags
    ledger = json.loads(mv.tags["taskvec.ledger"])
    assert set(comp["vectors"]) == {i["vector_sha256"] for e in ledger["edits"] for i in e.get("merge", [e])}
    assert all(float(e["lambda"]) >= 0.5 for e in ledger["edits"])
    assert comp["output_hash"] != ledger["output_hash"] == mv.tags["taskvec.output_hash"] and comp["max_abs_weight_error"] > 0
