"""dvc.yaml stages run the project's interpreter (bin/python) without the venv's bin on PATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest_pipeline import REPO, dvc_project, pipeline_env  # noqa: F401


def test_bin_python_prefers_taskvec_python_then_the_nearest_venv(tmp_path):
    project = tmp_path / "proj"
    (project / "bin").mkdir(parents=True)
    (project / "bin" / "python").write_bytes((REPO / "bin" / "python").read_bytes())
    (project / "bin" / "python").chmod(0o755)
    fake = tmp_path / ".venv" / "bin"  # a venv one folder above the project (as for .dvc/tmp/exps copies)
    fake.mkdir(parents=True)
    (fake / "python").write_text("#!/bin/sh\necho venv-above \"$@\"\n")
    (fake / "python").chmod(0o755)
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(project / "bin" / "python"), "-V"], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "venv-above -V"
    out = subprocess.run([str(project / "bin" / "python"), "-c", "print(1)"], env={**env, "TASKVEC_PYTHON": "/bin/echo"}, capture_output=True, text=True)
    assert out.stdout.strip() == "-c print(1)"


@pytest.mark.slow
def test_dvc_exp_run_without_the_venv_on_path(pipeline_env, tmp_path):
    root = dvc_project(tmp_path / "dvcproj", tmp_path / "remote")
    (root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)  # the project's venv, as `make` creates it
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"  # no venv: a bare `python` here lacks torch
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "finetune@senti"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Running stage 'finetune@senti'" in proc.stdout
    assert (root / "outputs" / "finetuned" / "senti").is_dir()
