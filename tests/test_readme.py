"""The README's tasks session runs verbatim on the shipped params.yaml (only the budget reduced with -S)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
TASKVEC = str(Path(sys.executable).with_name("taskvec"))
#: the one documented override mechanism, appended to commands that read eval rows
BUDGET = ["-S", "eval.max_rows.validation=32"]


def readme_block(marker: str) -> list[str]:
    """The commands of the README's ```bash block that contains ``marker``."""
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        if marker in block:
            return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    raise AssertionError(f"no ```bash block with {marker!r} in README.md")


def test_session_block_is_found_and_uses_the_documented_commands():
    cmds = readme_block("taskvec finetune sst2")
    assert [shlex.split(c)[1] for c in cmds] == ["finetune", "evaluate", "extract", "search", "search"]


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="needs the offline data mirror ../shared/data")
def test_readme_tasks_session_runs_verbatim_on_shipped_params(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")  # shipped, unchanged
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(DATA)  # data_dir ../shared/data resolves as in the repo
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for cmd in readme_block("taskvec finetune sst2"):
        argv = shlex.split(cmd)
        assert argv[0] == "taskvec"
        if argv[1] in ("evaluate", "search"):
            argv += BUDGET
        proc = subprocess.run([TASKVEC, *argv[1:], "-q"] if argv[1] in ("finetune", "extract", "search") else [TASKVEC, *argv[1:]], cwd=project, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
    assert (project / "params.yaml").read_bytes() == (ROOT / "params.yaml").read_bytes()
    ft = json.loads((project / "ft" / "sst2" / "finetune.json").read_text())
    assert ft["train"]["steps"] == 20
    metrics = json.loads((project / "ft" / "sst2-validation.json").read_text())
    assert metrics["n"] == 32 and 0.0 <= metrics["accuracy"] <= 1.0
    assert (project / "ft" / "sst2.safetensors").stat().st_size > 0
    for out in ("search", "forget"):
        files = {p.name for p in (project / "ft" / out).iterdir()}
        assert {"curve.csv", "curve.png"} <= files, files
