"""Serving a registered edit: pyfunc signature, predictions, clear errors, and a real ``mlflow models serve``.

Real MLflow on a SQLite file; the model is the tiny BERT with its tokenizer,
edited by one task vector, with two heads.
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
    return {"uri": uri, "name": "tv-serve", "version": rec["version"], "folder": folder, "root": root, "client": client, "rec": rec}


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
