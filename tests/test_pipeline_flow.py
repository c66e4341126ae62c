"""The Prefect `edit` flow on a tiny model under Prefect's test harness, with a real MLflow SQLite store."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest_pipeline import pipeline_env, tiny_project  # noqa: F401

STEPS = {"finetune/senti", "finetune/topic", "extract/senti", "extract/topic", "compose", "search", "evaluate", "register"}


def best_lambda_in(grid: list[float], best: float) -> bool:
    return any(abs(x - best) < 1e-9 for x in grid)


@pytest.mark.slow
def test_edit_flow_registers_a_reproducible_version(tiny_project):
    import mlflow
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness
    from transformers import AutoModel

    from flows.edit import edit
    from pipeline import params as P
    from pipeline.ops import registry

    pf = str(tiny_project / "params.yaml")
    with prefect_test_harness(server_startup_timeout=180):
        first = edit(pf, dvc_sync=False)
        second = edit(pf, dvc_sync=False)
        (tiny_project / "outputs" / "vectors" / "senti.safetensors").unlink()
        third = edit(pf, dvc_sync=False)
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            keys = {a.key for a in client.read_latest_artifacts(limit=20)}
    assert {"edit-summary", "edit-results"} <= keys

    # first run computes everything and registers version 1 as challenger
    assert set(first["states"]) == STEPS and all(s == "Completed" for s in first["states"].values()), first["states"]
    reg = first["registered"]
    assert (reg["model"], reg["version"], reg["alias"]) == ("tiny-edit", "1", "challenger")
    # an unchanged re-run recomputes nothing and registers nothing new
    assert all(s == "Cached" for s in second["states"].values()), second["states"]
    assert second["registered"]["version"] == "1"
    # a deleted output is rebuilt; its unchanged downstream steps stay cached
    assert third["states"]["extract/senti"] == "Completed" and third["states"]["finetune/senti"] == "Cached"
    assert third["states"]["compose"] == "Cached" and third["registered"]["version"] == "1"

    p = P.load(pf)
    uri = f"sqlite:///{tiny_project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("tiny-edit", "challenger")
    assert str(mv.version) == "1"
    tags = mv.tags
    ledger = json.loads(tags["taskvec.ledger"])
    local_ledger = json.loads((tiny_project / "outputs" / "model" / "taskvec.json").read_text())
    assert ledger["output_hash"] == local_ledger["output_hash"] == tags["taskvec.output_hash"] == first["output_hash"]
    assert [e["vector_sha256"] for e in ledger["edits"]] == [e["vector_sha256"] for e in json.loads(tags["taskvec.edits"])]
    assert tags["prefect.flow_run_id"] == first["flow_run_id"] != "none"
    assert tags["params.sha256"] == P.params_hash(pf)
    assert set(json.loads(tags["data.digests"])) >= {"senti/train", "topic/train", "spam/test"}
    for key in ("git.commit", "dvc.lock", "taskvec.base_hash", "taskvec.composition", "metrics.summary"):
        assert key in tags

    # registered thin (params: register.weights defaults to thin): the artifact holds no weights, the vectors are in the store
    assert tags["taskvec.weights"] == "thin"
    assert set(json.loads(tags["taskvec.vectors"])) == {e["vector_sha256"] for e in registry.edits_of(ledger)}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    raw = registry.model_folder(mlflow.artifacts.download_artifacts("models:/tiny-edit/1", dst_path=str(tiny_project / "dl-raw")))
    assert not list(raw.glob("*.safetensors")) and (raw / "taskvec-thin.json").is_file()
    # the registered version loads back, as HF weights (materialised and hash-checked) and as a pyfunc, and carries the model card
    folder = registry.download_version(mv, tiny_project / "dl", uri)
    model = AutoModel.from_pretrained(folder)
    assert model.config.hidden_size == 32
    card = (folder / "README.md").read_text()
    assert ledger["output_hash"] in card and ledger["base_hash"] in card
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-edit@challenger")
    preds = pyfunc.predict([{"text": "the movie was great", "task": "senti"}, {"text": "free prize call", "task": "spam"}])["label"].tolist()
    assert preds[0] in ("negative", "positive") and preds[1] in ("ham", "spam")

    # rebuilding from the ledger gives the registered weights
    rep = registry.reproduce(p, "tiny-edit", "1")
    assert rep["ok"], rep
    shutil.rmtree(tiny_project / "outputs" / "vectors")  # vectors come from the registry's vector store
    rep = registry.reproduce(p, "tiny-edit", "challenger")
    assert rep["ok"] and all(s.startswith("runs:/") for s in rep["vectors"].values()), rep
    rec = registry.lineage(p, "tiny-edit", "1")
    assert rec["ledger"]["output_hash"] == ledger["output_hash"] and "challenger" in rec["aliases"]

    # one parent run per flow run, nested runs per step with params, metrics and dataset inputs
    parent = client.get_run(first["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {r.info.run_name for r in children}
    assert names == STEPS
    search_run = next(r for r in children if r.info.run_name == "search")
    assert "best_lambda" in search_run.data.metrics and search_run.inputs.dataset_inputs
    arts = {a.path for a in client.list_artifacts(search_run.info.run_id, "search")}
    assert {"search/curve.csv", "search/curve.png", "search/best.json"} <= arts
    # the λ curve with λ on the x-axis: a table artifact whose `lambda` column is the grid (param lambda_grid)
    assert "search/lambda_curve.json" in arts
    table = json.loads(open(client.download_artifacts(search_run.info.run_id, "search/lambda_curve.json", str(tiny_project / "dl2"))).read())
    lam = table["data"] and [row[table["columns"].index("lambda")] for row in table["data"]]
    assert lam == json.loads(search_run.data.params["lambda_grid"]) and best_lambda_in(lam, first["lambda"])
    # step runs span the step's real work (start = end of work − its measured seconds), not the logging
    for r in children:
        if r.info.run_name != "register":
            assert abs((r.info.end_time - r.info.start_time) - first["step_seconds"][r.info.run_name] * 1000) <= 2, r.info.run_name
    # a fully cached re-run records one run (the flow's), which lists what it reused
    second_children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{second['mlflow_run_id']}'")
    assert second_children == []
    assert set(client.get_run(second["mlflow_run_id"]).data.tags["taskvec.cached_steps"].split(",")) == STEPS
