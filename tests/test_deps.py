"""Derived code dependencies: one closure feeds dvc.yaml's code deps and the Prefect cache key."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import deps

ROOT = Path(__file__).resolve().parent.parent
DVC = str(Path(sys.executable).with_name("dvc"))


def test_dvc_yaml_code_deps_are_the_derived_ones():
    out = subprocess.run([sys.executable, "-m", "pipeline.deps", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    listed = deps.dvc_code_deps(ROOT / "dvc.yaml")
    assert set(listed) == set(deps.STEPS)
    for step in deps.STEPS:
        assert listed[step] == deps.step_code(step)


def test_closure_follows_lazy_and_transitive_imports():
    search = deps.step_code("search")
    # the search step imports the core λ search (the file both hand-kept lists missed)
    assert "taskvec/search.py" in search
    assert "pipeline/steps/search.py" in search and "pipeline/__init__.py" in search
    # nothing outside the project, nothing the step never imports
    assert all(p.split("/")[0] in deps.PACKAGES for p in search)
    assert "pipeline/ops/audit.py" not in search
    assert "flows/edit.py" not in search
    with pytest.raises(ValueError, match="unknown step"):
        deps.step_code("nope")


def test_the_c_kernel_source_is_code_of_every_step_that_applies_a_vector():
    """The fused kernel computes the weights written: editing its C source must rerun the stages."""
    for step in ("extract", "register"):
        assert "taskvec/_kernels.c" in deps.step_code(step)
    assert "taskvec/_kernels.c" in deps.dvc_code_deps(deps.ROOT / deps.DVC_FILE)["register"]


def test_imports_inside_functions_and_relative_imports_count(tmp_path):
    (tmp_path / "pipeline" / "steps").mkdir(parents=True)
    (tmp_path / "taskvec" / "sub").mkdir(parents=True)
    for init in ("pipeline/__init__.py", "pipeline/steps/__init__.py", "taskvec/__init__.py", "taskvec/sub/__init__.py"):
        (tmp_path / init).write_text("")
    (tmp_path / "pipeline/steps/search.py").write_text("import os\n\ndef main():\n    from taskvec.sub import lazy\n    return lazy\n")
    (tmp_path / "taskvec/sub/lazy.py").write_text("from . import helper\nfrom .. import top\n")
    (tmp_path / "taskvec/sub/helper.py").write_text("x = 1\n")
    (tmp_path / "taskvec/top.py").write_text("import numpy\n")
    (tmp_path / "taskvec/unused.py").write_text("")
    assert deps.step_code("search", tmp_path) == [
        "pipeline/__init__.py",
        "pipeline/steps/__init__.py",
        "pipeline/steps/search.py",
        "taskvec/__init__.py",
        "taskvec/sub/__init__.py",
        "taskvec/sub/helper.py",
        "taskvec/sub/lazy.py",
        "taskvec/top.py",
    ]


def _scratch_project(dst: Path) -> None:
    """A copy of the project's code and dvc.yaml, with tiny stand-ins for data and upstream outputs."""
    for package in deps.PACKAGES:
        shutil.copytree(ROOT / package, dst / package, ignore=shutil.ignore_patterns("__pycache__", "out"))
    shutil.copy(ROOT / "dvc.yaml", dst / "dvc.yaml")
    params = (ROOT / "params.yaml").read_text()
    (dst / "params.yaml").write_text(params.replace("data_dir: ../shared/data", "data_dir: data"))
    (dst / "data").mkdir()
    (dst / "data" / "rows.csv").write_text("text,label\nx,0\n")
    for rel in ("outputs/edit/vector.safetensors", "outputs/finetuned/t/model.safetensors", "outputs/search/curve.png", "outputs/search/best.json", "outputs/search/curve.csv"):
        path = dst / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("stand-in\n")


@pytest.mark.slow
def test_editing_an_imported_core_module_reruns_the_stage_and_changes_the_cache_key(tmp_path, monkeypatch):
    from tasks import common

    class _Ctx:
        class task:  # noqa: N801 - mimics prefect's TaskRunContext.task
            name = "search"

    def key(root: Path) -> str:
        monkeypatch.setattr(common, "ROOT", root)
        return common.cache_key(_Ctx, {"inputs": {"x": 1}})

    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    project = tmp_path / "project"
    project.mkdir()
    _scratch_project(project)

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([DVC, *args], cwd=project, capture_output=True, text=True, env=env, timeout=300)

    assert dvc("init", "--no-scm", "-q").returncode == 0
    commit = dvc("commit", "-f", "search")
    assert commit.returncode == 0, commit.stderr
    assert "changed" not in dvc("status", "search").stdout
    before = deps.code_hash("search", project)
    key_before = key(project)
    assert key_before == key(ROOT)  # a copy of the same code has the same key, wherever it lives

    # a module the step does not import: neither DVC nor the cache key moves
    with open(project / "pipeline" / "ops" / "audit.py", "a") as f:
        f.write("\n# unrelated edit\n")
    assert "changed" not in dvc("status", "search").stdout
    assert deps.code_hash("search", project) == before

    # a core module the search step imports (lazily, through the core search)
    with open(project / "taskvec" / "search.py", "a") as f:
        f.write("\n# a change to search_lambda\n")
    status = dvc("status", "search").stdout
    assert "changed deps" in status and "taskvec/search.py" in status, status
    after = deps.code_hash("search", project)
    assert after != before

    # the Prefect cache key of the step moves with it
    assert key(project) != key_before
