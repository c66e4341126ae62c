"""Serving a registered edit: pyfunc signature, predictions, clear errors, and a real ``mlflow models serve``.

Real MLflow on a SQLite file; the model is the tiny BERT with its tokenizer,
edited by one task vector, with two heads, registered thin (ledger + the
vector in the content-addressed store, materialised on load); the thin
registry's storage, caching and hash checks are tested on the same store.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest_ops import free_port, http_service
from tests.conftest_tasks import make_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A registered version (alias champion) in a SQLite store: (tracking uri, model name, version, model folder)."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.ops import registry
    from taskvec.engine import apply, extract
    from taskvec.heads import build_head, load_encoder, save_head
    from tests.conftest import perturb

    root = tmp_path_factory.mktemp("serving")
    base = make_model(root / "base")
    ft = perturb(base, root / "ft", seed=3, scale=0.02)
    vec = extract(base, ft, root / "vectors" / "senti.safetensors")
    folder = root / "model"
    apply(base, [(vec.path, 0.5)], folder)
    encoder, tokenizer, _ = load_encoder(folder)
    save_head(build_head(encoder, tokenizer, "senti", ["negative", "positive"], ["bad", "good"]), folder / "heads" / "senti.safetensors")
    save_head(build_head(encoder, tokenizer, "topic", ["film", "feeling", "other"], ["movie", "happy", "the"]), folder / "heads" / "topic.safetensors")
    ledger = json.loads((folder / "taskvec.json").read_text())

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("serve", artifact_location=(root / "mlartifacts").as_uri())
    rid = client.create_run(exp).info.run_id
    rec = registry.register_model(client, rid, folder, name="tv-serve", tags=registry.ledger_tags(ledger), alias="champion", vectors=[vec.path])
    client.set_terminated(rid, "FINISHED")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return {"uri": uri, "name": "tv-serve", "version": rec["version"], "folder": folder, "root": root, "client": client, "rec": rec, "base": base, "vec": vec, "experiment": exp}


def _expected(folder: Path, text: str, task: str) -> dict[str, float]:
    """softmax(SCALE · cos(embedding, head rows)) computed from the folder, independently of the pyfunc."""
    import torch

    from taskvec.heads import encode, load_encoder, load_head

    encoder, tokenizer, _ = load_encoder(folder)
    head = load_head(folder / "heads" / f"{task}.safetensors")
    emb = encode(encoder, tokenizer, [text])
    probs = torch.softmax(head.scale * emb @ head.weight.T, dim=-1)[0]
    return dict(zip(head.labels, probs.tolist()))


def test_registered_version_is_a_servable_pyfunc(served):
    import mlflow
    from mlflow.models import Model

    client = served["client"]
    mv = client.get_model_version(served["name"], served["version"])
    logged = client.get_logged_model(served["rec"]["model_id"])
    assert logged.artifact_location.startswith((served["root"] / "mlartifacts").as_uri())  # under the experiment's artifact root
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(served["root"] / "dl"), tracking_uri=served["uri"]))
    info = Model.load(str(local / "MLmodel"))
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["text", "task"]
    reqs = (local / "requirements.txt").read_text()
    assert "taskvec" not in reqs and "torch==" in reqs and "transformers==" in reqs
    assert (local / "code" / "taskvec" / "heads.py").is_file() and (local / "code" / "pipeline" / "ops" / "serving.py").is_file()
    # the artifact is the model folder, byte for byte
    from pipeline.ops.registry import model_folder

    got = model_folder(local)
    assert (got / "taskvec.json").read_bytes() == (served["folder"] / "taskvec.json").read_bytes()
    assert (got / "heads" / "senti.safetensors").read_bytes() == (served["folder"] / "heads" / "senti.safetensors").read_bytes()


def test_load_model_by_alias_and_predict(served):
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"models:/{served['name']}@champion")
    df = pd.DataFrame({"text": ["good", "bad", "movie", "the film was good"], "task": ["senti", "senti", "topic", "senti"]})
    out = model.predict(df)
    assert list(out.columns) == ["task", "label", "probability", "probabilities"]
    # a text equal to a head's label text has cosine 1 with that row: it is the argmax
    assert out["label"].tolist()[:3] == ["positive", "negative", "film"]
    for (text, task), row in zip(zip(df["text"], df["task"]), out.to_dict("records")):
        exp = _expected(served["folder"], text, task)
        assert row["probabilities"].keys() == exp.keys()
        for label, p in exp.items():
            assert row["probabilities"][label] == pytest.approx(p, abs=1e-6)
        assert row["label"] == max(exp, key=exp.get) and row["probability"] == pytest.approx(max(exp.values()), abs=1e-6)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)


def test_missing_or_unknown_task_is_a_clear_error(served):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"models:/{served['name']}@champion")
    with pytest.raises(MlflowException, match="task"):
        model.predict(pd.DataFrame({"text": ["a wonderful, moving film"]}))
    with pytest.raises(MlflowException, match=r"unknown task 'agnews'.*senti, topic"):
        model.predict(pd.DataFrame({"text": ["a wonderful, moving film"], "task": ["agnews"]}))
    with pytest.raises(MlflowException, match="needs a 'task'"):
        model.predict(pd.DataFrame({"text": ["x"], "task": [""]}))


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_mlflow_models_serve_answers_http(served):
    port = free_port()
    log = served["root"] / "serve.log"
    # `mlflow models serve` execs `uvicorn` from PATH: a shim running this interpreter's uvicorn module
    shim = served["root"] / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "uvicorn").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m uvicorn "$@"\n')
    (shim / "uvicorn").chmod(0o755)
    env = {**os.environ, "MLFLOW_TRACKING_URI": served["uri"], "MLFLOW_REGISTRY_URI": served["uri"], "PATH": f"{shim}:{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{served['name']}@champion", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with http_service(cmd, env=env, log=log, health=f"http://127.0.0.1:{port}/ping", timeout=240, what="mlflow models serve") as base:
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["text", "task"], "data": [["good", "senti"], ["movie", "topic"]]}})
        assert status == 200, body
        preds = body["predictions"]
        assert [p["label"] for p in preds] == ["positive", "film"]
        exp = _expected(served["folder"], "good", "senti")
        assert preds[0]["probability"] == pytest.approx(exp["positive"], abs=1e-6)
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["text"], "data": [["good"]]}})
        assert status == 400 and "task" in body.get("message", ""), body
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["text", "task"], "data": [["good", "agnews"]]}})
        assert status == 400 and "unknown task 'agnews'" in body.get("message", ""), body


# ---------------------------------------------------------------------------
# The thin registry: vectors stored once, materialised on load, hash-checked, full weights on request


def _files(root: Path, name: str) -> list[Path]:
    return sorted(p for p in root.rglob(name) if p.is_file())


def _stored(served) -> list[Path]:
    """The artifact-store files holding the fixture's vector (filed under its sha256)."""
    return sorted(p for d in (served["root"] / "mlartifacts").rglob(served["vec"].sha256) for p in d.iterdir())


def _register(served, folder: Path, weights: str = "thin", name: str = "tv-thin") -> str:
    from pipeline.ops import registry

    client = served["client"]
    rid = client.create_run(served["experiment"]).info.run_id
    ledger = json.loads((folder / "taskvec.json").read_text())
    rec = registry.register_model(client, rid, folder, name=name, tags=registry.ledger_tags(ledger), vectors=[served["vec"].path], weights=weights)
    client.set_terminated(rid, "FINISHED")
    return rec["version"]


def _edited(served, lam: float, tag: str) -> Path:
    import shutil

    from taskvec.engine import apply

    out = served["root"] / f"edit-{tag}"
    if not out.exists():
        apply(served["base"], [(served["vec"].path, lam)], out)
        shutil.copytree(served["folder"] / "heads", out / "heads")
    return out


def test_thin_versions_store_each_vector_once(served):
    """Two more versions of the same vector: its bytes are in the artifact store once, and no version holds weights."""
    from mlflow.models import Model

    from pipeline.ops import registry

    art = served["root"] / "mlartifacts"
    sha = served["vec"].sha256
    weights_bytes = (served["folder"] / "model.safetensors").stat().st_size

    def size() -> int:  # the artifact store, less the code every version ships (taskvec/, a few hundred kB)
        return sum(p.stat().st_size for p in art.rglob("*") if p.is_file() and "code" not in p.relative_to(art).parts)

    before = size()
    v1 = _register(served, _edited(served, 0.8, "a"))
    mid = size()
    v2 = _register(served, _edited(served, -0.3, "b"))
    after = size()
    # one stored copy of the vector (named by its sha256) for the fixture's version and these two
    stored = _stored(served)
    assert len(stored) == 1 and stored[0].read_bytes() == served["vec"].path.read_bytes() and stored[0].name == "senti.safetensors"
    assert sum(p.read_bytes() == served["vec"].path.read_bytes() for p in art.rglob("*.safetensors")) == 1
    # no weights anywhere in the artifact store: every version is thin
    assert _files(art, "model.safetensors") == []
    # the second and third version add their thin folder and MLmodel files only, never the vector again
    assert 0 < after - mid < 0.1 * weights_bytes and 0 < mid - before < 0.1 * weights_bytes, (before, mid, after, weights_bytes)
    client = served["client"]
    for v in (v1, v2):
        mv = client.get_model_version("tv-thin", v)
        assert mv.tags["taskvec.weights"] == "thin"
        assert json.loads(mv.tags["taskvec.vectors"]) == {sha: f"runs:/{stored[0].parents[3].name}/vectors/{sha}/senti.safetensors"}
        raw = registry.download_version(mv, served["root"] / f"raw{v}", served["uri"], thin_ok=False)
        man = json.loads((raw / "taskvec-thin.json").read_text())
        assert man["output_hash"] == mv.tags["taskvec.output_hash"] and man["base"]["content_hash"] == mv.tags["taskvec.base_hash"]
        assert sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()) == ["heads/senti.safetensors", "heads/topic.safetensors", "taskvec-thin.json", "taskvec.json"]
        assert set(man["from_base"]) >= {"config.json", "tokenizer.json"}
        thin_bytes = sum(p.stat().st_size for p in raw.rglob("*") if p.is_file())
        assert thin_bytes < 0.1 * weights_bytes, (thin_bytes, weights_bytes)
        assert Model.load(str(raw.parents[1] / "MLmodel")).metadata["taskvec_weights"] == "thin"


def test_thin_load_materialises_once_and_checks_the_hash(served, monkeypatch, tmp_path):
    """The first load fetches the vector and materialises base + λτ into the cache; later loads use the cache."""
    import mlflow
    import pandas as pd

    from pipeline.ops import registry
    from pipeline.ops.materialise import cache_root
    from taskvec.io import TensorSource

    folder = _edited(served, 0.8, "a")
    v = _register(served, folder)
    output_hash = json.loads((folder / "taskvec.json").read_text())["output_hash"]
    monkeypatch.setenv("TASKVEC_CACHE_DIR", str(tmp_path / "cold"))
    model = mlflow.pyfunc.load_model(f"models:/tv-thin/{v}")
    entry = cache_root() / "models" / output_hash
    with TensorSource(entry) as s:
        assert s.content_hash(use_cache=False) == output_hash
    assert (cache_root() / "vectors" / served["vec"].sha256 / "senti.safetensors").read_bytes() == served["vec"].path.read_bytes()
    out = model.predict(pd.DataFrame({"text": ["the film was good"], "task": ["senti"]}))
    exp = _expected(folder, "the film was good", "senti")
    assert out["probabilities"][0] == pytest.approx(exp, abs=1e-6)
    # the store's copy gone: the cached materialisation still serves
    stored = _stored(served)[0]
    hidden = stored.with_suffix(".hidden")
    stored.rename(hidden)
    try:
        again = mlflow.pyfunc.load_model(f"models:/tv-thin/{v}")
        assert again.predict(pd.DataFrame({"text": ["the film was good"], "task": ["senti"]}))["label"].tolist() == out["label"].tolist()
        # download_version completes the folder: the full model, hashing to the version's output hash
        mv = served["client"].get_model_version("tv-thin", v)
        full = registry.download_version(mv, tmp_path / "dl", served["uri"])
        with TensorSource(full) as s:
            assert s.content_hash(use_cache=False) == output_hash
        assert not (full / "taskvec-thin.json").exists() and (full / "heads" / "senti.safetensors").is_file()
    finally:
        hidden.rename(stored)


def test_tampered_vector_or_ledger_is_refused_with_one_line(served, monkeypatch, tmp_path):
    import mlflow

    from pipeline.ops import registry
    from pipeline.ops.materialise import materialised
    from taskvec.errors import TaskvecError

    v = _register(served, _edited(served, 0.8, "a"))
    mv = served["client"].get_model_version("tv-thin", v)
    stored = _stored(served)[0]
    original = stored.read_bytes()
    data = bytearray(original)
    data[-3] ^= 0x40  # one bit of the last float: same size, same header
    stored.write_bytes(bytes(data))
    try:
        monkeypatch.setenv("TASKVEC_CACHE_DIR", str(tmp_path / "cold"))
        with pytest.raises(TaskvecError) as ei:
            mlflow.pyfunc.load_model(f"models:/tv-thin/{v}")
        msg = str(ei.value)
        assert "\n" not in msg and f"vector {served['vec'].sha256[:12]}" in msg and "altered" in msg and "refusing" in msg
        with pytest.raises(TaskvecError, match="altered"):
            registry.download_version(mv, tmp_path / "dl", served["uri"])
        assert not (tmp_path / "cold" / "models" / mv.tags["taskvec.output_hash"]).exists()
    finally:
        stored.write_bytes(original)
    # a ledger changed after registration (λ 0.8 → 0.9): the materialised weights miss the recorded hash
    raw = registry.download_version(mv, tmp_path / "raw", served["uri"], thin_ok=False)
    ledger = json.loads((raw / "taskvec.json").read_text())
    ledger["edits"][0]["lambda"] = 0.9
    (raw / "taskvec.json").write_text(json.dumps(ledger))
    with pytest.raises(TaskvecError) as ei:
        materialised(raw, served["uri"])
    msg = str(ei.value)
    assert "\n" not in msg and f"the version records {ledger['output_hash'][:12]}" in msg and "refusing to load" in msg


def test_full_weights_stay_available(served, tmp_path):
    """``weights="full"``: the artifact is the whole folder (AutoModel loads it without taskvec); the vector is still stored once."""
    import mlflow
    import pandas as pd
    from transformers import AutoModel

    from pipeline.ops import registry
    from taskvec.io import TensorSource

    folder = _edited(served, 0.8, "a")
    v = _register(served, folder, weights="full", name="tv-full")
    mv = served["client"].get_model_version("tv-full", v)
    assert mv.tags["taskvec.weights"] == "full"
    raw = registry.download_version(mv, tmp_path / "raw", served["uri"], thin_ok=False)
    assert (raw / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes() and not (raw / "taskvec-thin.json").exists()
    assert AutoModel.from_pretrained(raw).config.hidden_size == 32
    with TensorSource(raw) as s:
        assert s.content_hash(use_cache=False) == mv.tags["taskvec.output_hash"]
    assert len(_stored(served)) == 1
    out = mlflow.pyfunc.load_model(f"models:/tv-full/{v}").predict(pd.DataFrame({"text": ["good"], "task": ["senti"]}))
    assert out["probabilities"][0] == pytest.approx(_expected(folder, "good", "senti"), abs=1e-6)
    with pytest.raises(Exception, match="unknown weights mode 'fat'"):
        _register(served, folder, weights="fat", name="tv-full")
