"""Issue 10: one override mechanism (-S), path-free outputs, fixed fine-tune threads, coherent Prefect cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from taskvec.errors import TaskvecError
from taskvec.overrides import apply_overrides
from tests.conftest_pipeline import REPO, pipeline_env, write_project  # noqa: F401


# ---------------------------------------------------------------------------
# -S key.path=value


def test_apply_overrides_sets_nested_yaml_values_on_a_copy():
    data = {"train": {"steps": 120, "lr": 5e-5}, "edit": {"learn": ["a"]}}
    out = apply_overrides(data, ["train.steps=4", "train.lr=1e-3", "edit.learn=[a, b]", "search.strategy=grid", "eval.max_rows.test=null", "base=x/y"])
    assert out == {
        "train": {"steps": 4, "lr": 1e-3},
        "edit": {"learn": ["a", "b"]},
        "search": {"strategy": "grid"},
        "eval": {"max_rows": {"test": None}},
        "base": "x/y",
    }
    assert data == {"train": {"steps": 120, "lr": 5e-5}, "edit": {"learn": ["a"]}}  # untouched
    assert apply_overrides(data, ["train.steps=1", "train.steps=2"])["train"]["steps"] == 2  # last wins


@pytest.mark.parametrize("item, msg", [("train.steps", "expected KEY.PATH=VALUE"), ("=4", "expected KEY.PATH=VALUE"), ("train..steps=4", "expected KEY.PATH=VALUE"), ("train.steps.x=1", "train.steps is not a mapping"), ("train.steps=[1", "not valid YAML")])
def test_apply_overrides_refuses_malformed_items(item, msg):
    with pytest.raises(TaskvecError, match=msg.replace(".", r"\.").replace("[", r"\[")):
        apply_overrides({"train": {"steps": 3}}, [item])


def _cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "taskvec"), *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_core_finetune_takes_S_and_refuses_unknown_keys_through_the_schema(pipeline_env):
    root = write_project(pipeline_env / "proj", steps=4)
    before = (root / "params.yaml").read_bytes()
    bad = _cli("finetune", "senti", "--out", "ft", "-S", "train.stepz=2", cwd=root)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: params.yaml with -S: train.stepz: Extra inputs are not permitted"], bad.stderr
    wrong = _cli("finetune", "senti", "--out", "ft", "-S", "train.steps=zero", cwd=root)
    assert wrong.returncode == 2 and "train.steps" in wrong.stderr and not (root / "ft").exists()
    ok = _cli("finetune", "senti", "--out", "ft", "-q", "-S", "train.steps=2", "-S", "train.batch_size=4", cwd=root)
    assert ok.returncode == 0, ok.stderr
    manifest = json.loads((root / "ft" / "finetune.json").read_text())
    assert (manifest["train"]["steps"], manifest["train"]["batch_size"]) == (2, 4)
    assert (root / "params.yaml").read_bytes() == before


def test_run_overrides_are_validated_into_an_effective_params_file(pipeline_env):
    from flows.edit import EFFECTIVE_PARAMS, effective_params
    from pipeline import params as P

    root = write_project(pipeline_env / "proj", steps=4)
    before = (root / "params.yaml").read_bytes()
    assert effective_params(root / "params.yaml", []) == str(root / "params.yaml")
    with pytest.raises(TaskvecError, match=r"params.yaml with -S: search.gird_points: Extra inputs"):
        effective_params(root / "params.yaml", ["search.gird_points=3"])
    assert not (root / EFFECTIVE_PARAMS).exists()
    path = effective_params(root / "params.yaml", ["train.steps=2", "search.strategy=grid"])
    p = P.load(path)
    assert Path(path) == root / EFFECTIVE_PARAMS and p.root == root
    assert (p.train.steps, p.search.strategy, p.search.grid_points) == (2, "grid", 5)
    assert "-S train.steps=2" in Path(path).read_text()
    assert (root / "params.yaml").read_bytes() == before


def test_run_refuses_a_bad_override_in_one_line_before_prefect_starts(pipeline_env):
    root = write_project(pipeline_env / "proj", steps=4)
    proc = _cli("run", "-S", "search.strategy=best", cwd=root)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == ["error: params.yaml with -S: search.strategy: Input should be 'golden', 'grid', 'per_task' or 'adamerging'"], proc.stderr
    assert not (root / "outputs").exists() and not (root / ".taskvec-run-params.yaml").exists()


# ---------------------------------------------------------------------------
# Path-free identity and fixed threads


def portable_project(root: Path) -> Path:
    """``write_project`` with params that name everything relative to the project (as the shipped params.yaml does)."""
    write_project(root, steps=4)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["base"] = "tiny-base"
    params["data_dir"] = "data"
    for t in params["tasks"]:
        params["tasks"][t]["source"] = f"example/{t}"  # resolved through data_dir/<task>, like stanfordnlp/sst2
    params.setdefault("search", {})["control_splits"] = ["validation", "train"]  # as the shipped params.yaml: the control's rows name two files
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _run_steps(root: Path, monkeypatch) -> None:
    from pipeline.steps import compose, evaluate, extract, finetune, search

    monkeypatch.chdir(root)  # as under `dvc repro` (and the flow, which chdirs to the project root)
    pf = str(root / "params.yaml")
    for t in ("senti", "topic"):
        finetune.main(pf, task=t)
        extract.main(pf, task=t)
    compose.main(pf)
    search.main(pf)
    evaluate.main(pf)


def _files(root: Path) -> dict[str, bytes]:
    out = root / "outputs"
    return {f.relative_to(out).as_posix(): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file() and ".prefect" not in f.parts}


@pytest.mark.slow
def test_outputs_are_byte_identical_in_two_checkouts_and_name_no_absolute_path(pipeline_env, monkeypatch):
    from taskvec.vector import VectorFile

    a = portable_project(pipeline_env / "one" / "proj")
    b = pipeline_env / "two" / "elsewhere" / "proj"
    shutil.copytree(a, b)
    _run_steps(a, monkeypatch)
    _run_steps(b, monkeypatch)
    fa, fb = _files(a), _files(b)
    assert set(fa) == set(fb) and {"vectors/senti.safetensors", "edit/compose.json", "search/best.json", "model/taskvec.json", "model/README.md", "metrics/provenance.json", "finetuned/senti/finetune.json"} <= set(fa)
    assert [k for k in fa if fa[k] != fb[k]] == []
    for root in (a, b):
        for name, data in _files(root).items():
            assert str(pipeline_env).encode() not in data, f"{name} names an absolute path"
    with VectorFile(a / "outputs" / "vectors" / "senti.safetensors") as vf:
        assert set(vf.recipe) == {"op", "finetuned_hash", "include", "exclude"} and len(vf.recipe["finetuned_hash"]) == 64
    best = json.loads(fa["search/best.json"])
    assert "seconds" not in best and {t: d["origin"] for t, d in best["data"].items()} == {
        "senti": "data/senti/validation.csv", "topic": "data/topic/validation.csv", "spam": ["data/spam/validation.csv", "data/spam/train.csv"]}
    manifest = json.loads(fa["finetuned/senti/finetune.json"])
    assert "seconds" not in manifest and "base_path" not in manifest and manifest["data"]["origin"] == "data/senti/train.csv"
    compose = json.loads(fa["edit/compose.json"])
    assert compose["vector"] == "outputs/edit/vector.safetensors" and [i["path"] for i in compose["inputs"]] == ["outputs/vectors/senti.safetensors", "outputs/vectors/topic.safetensors"]


@pytest.mark.slow
def test_dvc_stage_command_and_prefect_task_fine_tune_the_same_bits(pipeline_env):
    """The stage's command (even with a thread count in the environment) and the flow's task give one fingerprint."""
    from pipeline.steps.finetune import THREADS
    from tasks.finetune import finetune_task

    a = portable_project(pipeline_env / "a")
    b = pipeline_env / "b"
    shutil.copytree(a, b)
    env = {**os.environ, "TASKVEC_TORCH_THREADS": "2", "OMP_NUM_THREADS": "2", "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "pipeline.steps.finetune", "--params", "params.yaml", "--task", "senti"], cwd=a, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    via_dvc = json.loads(proc.stdout)
    via_prefect = finetune_task.fn(str(b / "params.yaml"), "senti", {})
    assert via_dvc["content_hash"] == via_prefect["content_hash"]
    ma, mb = ((r / "outputs/finetuned/senti/finetune.json").read_bytes() for r in (a, b))
    assert ma == mb and json.loads(ma)["torch_threads"] == THREADS
    assert via_prefect["outputs_sha256"]  # the task's result vouches for its outputs
