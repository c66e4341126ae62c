"""The README's code blocks as test input: extraction, scratch projects and the budget overrides.

Import explicitly from the test modules::

    from tests.conftest_readme import readme_block, scratch_project, run_readme_line

The commands are taken from README.md itself, so a README edit that breaks a
command breaks a test. The only change made to a command is the documented
budget override: ``-S KEY=VALUE`` appended to ``taskvec run|promote|rollback``
(and to the tasks commands that read eval rows), ``S='…'`` appended to
``make run``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DATA = ROOT.parent / "shared" / "data"
VENV = Path(sys.executable).parent.parent

#: the budget of a CPU test run, through the one documented override mechanism
RUN_BUDGET = ["train.steps=2", "train.batch_size=8", "search.max_evals=2", "eval.max_rows.validation=32", "eval.max_rows.test=32", "search.control_rows=32"]
EVAL_BUDGET = ["eval.max_rows.validation=32", "search.control_rows=32"]
#: which commands get which overrides (first two words of the README line)
BUDGET = {
    ("taskvec", "run"): RUN_BUDGET,
    ("taskvec", "promote"): EVAL_BUDGET,
    ("taskvec", "rollback"): EVAL_BUDGET,
    ("taskvec", "evaluate"): EVAL_BUDGET,
    ("taskvec", "search"): EVAL_BUDGET,
}

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="needs the offline data mirror ../shared/data")


def readme_blocks(lang: str = "bash", readme: Path = README) -> list[str]:
    """The bodies of the README's fenced code blocks of language ``lang``, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", readme.read_text(), flags=re.S | re.M)


def block_lines(block: str) -> list[str]:
    """The command lines of a block (comments after ``#`` dropped unless quoted; blank lines skipped)."""
    out = []
    for line in block.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def readme_block(marker: str, lang: str = "bash") -> list[str]:
    """The command lines of the README's ```lang block that contains ``marker``."""
    for block in readme_blocks(lang):
        if marker in block:
            return block_lines(block)
    raise AssertionError(f"no ```{lang} block with {marker!r} in README.md")


def with_budget(line: str) -> str:
    """The README line plus the documented budget override for its command (unchanged otherwise)."""
    words = line.split()
    if words[:2] == ["make", "run"]:
        return f"{line} S='{' '.join(RUN_BUDGET)}'"
    extra = BUDGET.get(tuple(words[:2]))
    return line + "".join(f" -S {o}" for o in extra) if extra else line


def scratch_project(tmp_path: Path) -> Path:
    """A scratch copy of the project as a user's checkout has it: shipped params.yaml, Makefile, the venv, ../shared/data."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("params.yaml", "Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, project / name)
    os.utime(project / "pyproject.toml", (0, 0))  # older than .venv/.installed: make's setup has nothing to do
    (project / ".venv").symlink_to(VENV)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(DATA)  # data_dir ../shared/data resolves as in the repo
    return project


def project_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The user's shell: the venv's bin first on PATH, offline, a private Prefect home, no tracking URI leaking in."""
    # (tests/conftest.py's MLFLOW_SQLALCHEMYSTORE_POOLCLASS is for the test process; with it MLflow logs a line per store)
    drop = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "TASKVEC_AUDIT_URL", "TASKVEC_PARAMS", "TASKVEC_FLOW_RUN_ID", "MLFLOW_SQLALCHEMYSTORE_POOLCLASS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        PATH=os.pathsep.join([str(VENV / "bin"), env.get("PATH", "")]),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
    )
    env.update(extra)
    return env


def run_readme_line(line: str, project: Path, env: dict[str, str], *, timeout: float = 1500) -> subprocess.CompletedProcess:
    """Run one README line (plus its budget) through bash in ``project``; fail the test with its stderr if it fails."""
    cmd = with_budget(line)
    proc = subprocess.run(["bash", "-c", cmd], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"README command failed ({proc.returncode}): {cmd}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc
