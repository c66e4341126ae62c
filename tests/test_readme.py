"""The README's code blocks are tests: each ```bash block runs as written (budget via -S only), each ```text synopsis matches the CLI.

Where the blocks run:

* the tasks session (``taskvec finetune sst2 …``): here, on the shipped params.yaml;
* ``make run``, the engine examples and the operations story: ``tests/test_story.py``,
  on the embedded stack and again on an ``mlflow server`` over PostgreSQL;
* :data:`EXCEPTIONS`: the README lines no test runs, each with its reason.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from tests.conftest_readme import ROOT, block_lines, needs_data, project_env, readme_block, readme_blocks, run_readme_line, scratch_project

#: a marker of each ```bash block -> the test that runs every line of it
RUNNERS = {
    "make test": "tests/test_story.py::test_story_embedded (make run; make test is an exception)",
    "taskvec extract sentence-transformers/all-MiniLM-L6-v2 outputs/finetuned/sst2": "tests/test_story.py::test_story_embedded",
    "taskvec finetune sst2": "tests/test_readme.py::test_readme_tasks_session_runs_verbatim_on_shipped_params",
    "taskvec promote --no-wait": "tests/test_story.py (embedded and PostgreSQL)",
}
#: README lines that no test runs, and why (keep this tiny)
EXCEPTIONS = {
    "make test": "runs this test suite itself (recursion); CI's .ci/run is exactly `make test`",
}
#: infra/README.md (the deployment section): its ```bash blocks need the compose stack; none runs here
INFRA_EXCEPTIONS = {
    "docker compose -f infra/compose.yaml": "needs Docker; the test machines have no container engine",
    "export MLFLOW_TRACKING_URI=http://localhost:5000": "client settings for the compose stack; tests/test_story.py runs the story with the same variables against a real mlflow server on PostgreSQL",
    "dvc remote add -d minio s3://dvc": "needs the compose stack's MinIO",
    "dask scheduler": "needs hosts named SCHEDULER; tests/test_cluster.py starts a real `dask scheduler` and two `dask worker` processes (one with --resources GPU=1) on 127.0.0.1 and runs the main job on them",
    "prefect worker start --pool taskvec": "needs a server on :4200 and the worker runs until stopped; tests/test_deploy.py runs `taskvec deploy` and `prefect worker start --pool taskvec --run-once` against a real server",
}
#: synopsis commands that no README block runs -> the test file that runs them (the file must name the command)
SYNOPSIS_ELSEWHERE = {
    "extract --low-rank": "tests/test_adapters.py",
    "merge --config": "tests/test_recipes.py",
    "champion-revert": "tests/test_ops_rollback.py",
    "deploy": "tests/test_deploy.py",
}


def _runner(block: str) -> str:
    found = [m for m in RUNNERS if m in block]
    assert len(found) == 1, f"README ```bash block matches {found or 'no'} runner marker; add its runner to RUNNERS:\n{block}"
    return found[0]


def test_every_bash_block_has_a_runner_and_exceptions_are_real():
    blocks = readme_blocks("bash")
    assert len(blocks) == len(RUNNERS), f"{len(blocks)} ```bash blocks, {len(RUNNERS)} runners"
    assert sorted(_runner(b) for b in blocks) == sorted(RUNNERS)
    lines = {line for b in blocks for line in block_lines(b)}
    for line in EXCEPTIONS:
        assert line in lines, f"exception {line!r} is not a README command any more: drop it"


def test_infra_blocks_are_the_listed_exceptions_and_say_so():
    from tests.conftest_readme import readme_blocks as blocks

    infra = blocks("bash", ROOT / "infra" / "README.md")
    assert sorted(m for b in infra for m in INFRA_EXCEPTIONS if m in b) == sorted(INFRA_EXCEPTIONS) and len(infra) == len(INFRA_EXCEPTIONS)
    assert "not run by the test suite" in (ROOT / "infra" / "README.md").read_text()


def _synopses() -> list[tuple[str, list[str], str]]:
    """(command, --options, line) of each ``taskvec …`` line of the ```text synopsis blocks (``audit show | verify``: two)."""
    out = []
    for block in readme_blocks("text"):
        for line in block_lines(block):
            if not line.startswith("taskvec "):
                continue
            words = shlex.split(line.replace("|", " "))
            options = sorted(set(re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", line)))
            for cmd in ["audit " + w for w in words[2:]] if words[1] == "audit" else [words[1]]:
                out.append((cmd, options, line))
    return out


def test_synopsis_lines_name_real_commands_and_options():
    from typer.testing import CliRunner

    from pipeline.cli import app

    synopses = _synopses()
    assert {c for c, _, _ in synopses} >= {"extract", "apply", "finetune", "run", "promote", "rollback", "audit verify", "deploy"}
    runner = CliRunner()
    for cmd, options, line in synopses:
        res = runner.invoke(app, [*cmd.split(), "--help"], env={"COLUMNS": "300", "NO_COLOR": "1"})
        assert res.exit_code == 0, f"`taskvec {cmd} --help` failed: {res.output[-500:]}"
        for opt in options:
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", res.output), f"README synopsis `{line}`: `taskvec {cmd}` has no option {opt}"


def test_every_synopsis_command_is_run_by_a_test():
    ran = [line for b in readme_blocks("bash") for line in block_lines(b)]
    for cmd, options, line in _synopses():
        key = next((k for k in SYNOPSIS_ELSEWHERE if k.split()[0] == cmd and all(o in options for o in k.split()[1:])), None)
        if key is not None:
            text = (ROOT / SYNOPSIS_ELSEWHERE[key]).read_text()
            assert all(f'"{w}"' in text for w in key.split()), f"{SYNOPSIS_ELSEWHERE[key]} does not run `taskvec {key}`"
        else:
            assert any(r.startswith(f"taskvec {cmd} ") or r == f"taskvec {cmd}" for r in ran), f"`{line}`: no README block runs `taskvec {cmd}`, and it is not in SYNOPSIS_ELSEWHERE"


def test_budget_is_only_the_documented_override():
    from tests.conftest_readme import with_budget

    assert with_budget("taskvec run") == "taskvec run -S train.steps=2 -S train.batch_size=8 -S search.max_evals=2 -S eval.max_rows.validation=32 -S eval.max_rows.test=32 -S search.control_rows=32"
    assert with_budget("make run").startswith("make run S='train.steps=2 ")
    assert with_budget("taskvec reproduce taskvec-edit champion") == "taskvec reproduce taskvec-edit champion"


@pytest.mark.slow
@needs_data
def test_readme_tasks_session_runs_verbatim_on_shipped_params(tmp_path):
    project = scratch_project(tmp_path)
    env = project_env(tmp_path)
    cmds = readme_block("taskvec finetune sst2")
    assert [shlex.split(c)[1] for c in cmds] == ["finetune", "evaluate", "extract", "search", "search"]
    for cmd in cmds:
        run_readme_line(cmd, project, env)
    assert (project / "params.yaml").read_bytes() == (ROOT / "params.yaml").read_bytes()
    ft = json.loads((project / "ft" / "sst2" / "finetune.json").read_text())
    assert ft["train"]["steps"] == 20
    metrics = json.loads((project / "ft" / "sst2-validation.json").read_text())
    assert metrics["n"] == 32 and 0.0 <= metrics["accuracy"] <= 1.0
    assert (project / "ft" / "sst2.safetensors").stat().st_size > 0
    for out in ("search", "forget"):
        files = {p.name for p in (project / "ft" / out).iterdir()}
        assert {"curve.csv", "curve.png"} <= files, files
