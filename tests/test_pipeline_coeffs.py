"""The pipeline's search step with learned coefficients (search.strategy: per_task | adamerging), end to end on a tiny project."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from taskvec.errors import TaskvecError
from tests.conftest_pipeline import pipeline_env, tiny_project  # noqa: F401 - fixtures


@pytest.fixture
def composed(tiny_project):
    from pipeline.steps import compose, extract, finetune

    params_file = tiny_project / "params.yaml"
    for task in ("senti", "topic"):
        finetune.main(params_file, task=task)
        extract.main(params_file, task=task)
    compose.main(params_file)
    return params_file


def set_search(params_file, **search):
    data = yaml.safe_load(params_file.read_text())
    data["search"] |= search
    params_file.write_text(yaml.safe_dump(data, sort_keys=False))


def test_per_task_lambdas_reach_best_json_and_the_ledger(composed):
    from pipeline.steps import evaluate, search

    set_search(composed, strategy="per_task", max_evals=8)
    found = search.main(composed)
    best = json.loads((composed.parent / "outputs" / "search" / "best.json").read_text())
    assert best["strategy"] == "per_task" and len(best["lambdas"]) == 2
    assert best["evaluations"] <= 8
    assert best["lambda"] == pytest.approx(sum(best["lambdas"]) / 2)
    assert found["lambdas"] == best["lambdas"]
    result = evaluate.main(composed)
    edits = result["ledger"]["edits"]
    record = json.loads((composed.parent / "outputs" / "edit" / "compose.json").read_text())
    assert [e["vector_sha256"] for e in edits] == [i["sha256"] for i in record["inputs"]]
    assert [e["lambda"] for e in edits] == [round(lam, 10) for lam in best["lambdas"]]


@pytest.mark.parametrize("strategy", ["per_task", "adamerging"])
def test_learned_strategies_check_controls_with_their_uncertainty(composed, monkeypatch, strategy):
    """Every learned candidate is scored by the step's SuiteMetrics (control accuracy + paired SE of its drop), like golden/grid."""
    from pipeline.steps import search
    from taskvec.search import drop_se_key
    from taskvec.search_run import SuiteMetrics

    seen: list[dict] = []
    real = SuiteMetrics.__call__

    def spy(self):
        out = real(self)
        seen.append(out)
        return out

    monkeypatch.setattr(SuiteMetrics, "__call__", spy)
    data = yaml.safe_load(composed.read_text())
    data["search"] |= {"strategy": strategy, "max_evals": 4, "adamerging": {"steps": 2, "batch_size": 4}}
    data["edit"]["forget"] = []
    composed.write_text(yaml.safe_dump(data, sort_keys=False))
    search.main(composed)
    assert len(seen) >= (2 if strategy == "per_task" else 1) and all(drop_se_key("spam") in m and m[drop_se_key("spam")] >= 0 for m in seen)


def test_adamerging_writes_scaled_vectors_that_the_model_is_built_from(composed):
    from pipeline.steps import evaluate, search
    from taskvec.adamerging import group_of
    from taskvec.io import file_sha256
    from taskvec.vector import VectorFile

    set_search(composed, strategy="adamerging", adamerging={"steps": 3, "lr": 0.05, "batch_size": 8})
    search.main(composed)
    root = composed.parent
    best = json.loads((root / "outputs" / "search" / "best.json").read_text())
    assert best["strategy"] == "adamerging" and len(best["vectors"]) == 2
    table = best["adamerging"]["coefficients"]
    assert set(table) == {"+senti", "+topic"} and set(table["+senti"]) == {"other", "layer.0", "layer.1"}
    for entry in best["vectors"]:
        path = root / entry["path"]
        assert file_sha256(path) == entry["sha256"]
        with VectorFile(path) as scaled, VectorFile(root / "outputs" / "vectors" / f"{entry['task']}.safetensors") as source:
            assert scaled.recipe["op"] == "adamerging" and scaled.recipe["input"] == source.sha256
            for name in source.names:
                lam = table[entry["input"]][group_of(name)]
                assert torch.equal(scaled.read(name), lam * source.read(name))
    result = evaluate.main(composed)
    assert [e["vector_sha256"] for e in result["ledger"]["edits"]] == [v["sha256"] for v in best["vectors"]]
    assert all(e["lambda"] == 1.0 for e in result["ledger"]["edits"])


def test_learned_strategies_refuse_non_linear_merges(composed):
    from pipeline.steps import search

    data = yaml.safe_load(composed.read_text())
    data["edit"] |= {"method": "ties", "density": 0.5}
    data["search"] |= {"strategy": "per_task"}
    composed.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(TaskvecError, match="search.strategy per_task needs edit.method: sum"):
        search.main(composed)

