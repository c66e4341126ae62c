"""The README's story, as a user runs it: shipped params.yaml, the real CLI, budget reduced with -S only.

``make run`` → the engine examples → ``promote`` → ``approve`` → a second edit
(TIES) → ``promote`` → ``reject`` → ``lineage`` → ``rollback`` of the agnews
edit in the champion → ``reproduce`` of the rolled-back version (bit for bit)
→ ``audit verify``/``show`` → ``mlflow.pyfunc.load_model('models:/taskvec-edit@champion')``
and predict. The commands are the README's blocks themselves
(:mod:`tests.conftest_readme`); no fake evaluator, no hand-made params.

Once on the embedded stack (SQLite ``mlflow.db`` + ``mlartifacts/``, the
``taskvec`` command's own Prefect server), with bad input refused on the way
(one ``error:`` line, exit 2, nothing changed), and once against a real
``mlflow server`` on PostgreSQL with the audit log in PostgreSQL.
Run with ``-s`` to see the story's key lines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest_ops import _audit_db, fresh_db, fresh_schema, mlflow_server, pg  # noqa: F401
from tests.conftest_readme import VENV, needs_data, project_env, readme_block, run_readme_line, scratch_project, with_budget

pytestmark = [pytest.mark.slow, needs_data, pytest.mark.skipif(not (VENV / ".installed").is_file(), reason="make run needs the venv `make` set up (.venv/.installed)")]

MODEL = "taskvec-edit"
STORY = "taskvec promote --no-wait"
ENGINE = "taskvec extract sentence-transformers/all-MiniLM-L6-v2 outputs/finetuned/sst2"
EXPECTED = ["make run", "taskvec promote", "taskvec approve", "taskvec run", "taskvec promote", "taskvec reject", "taskvec lineage", "taskvec rollback", "taskvec reproduce", "taskvec audit verify", "taskvec audit show"]


class Story:
    def __init__(self, tmp_path: Path, tracking_uri: str | None, audit_url: str | None):
        self.project = scratch_project(tmp_path)
        extra = {k: v for k, v in (("MLFLOW_TRACKING_URI", tracking_uri), ("TASKVEC_AUDIT_URL", audit_url)) if v}
        self.env = project_env(tmp_path, **extra)
        self.tracking_uri = tracking_uri or f"sqlite:///{self.project / 'mlflow.db'}"
        self.audit_url = audit_url or f"sqlite:///{self.project / 'audit.db'}"
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        self.lines.append(text)

    def run(self, line: str) -> subprocess.CompletedProcess:
        proc = run_readme_line(line, self.project, self.env)
        self.say(f"$ {with_budget(line)}")
        return proc

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def state(self) -> tuple:
        """Everything a refused command must leave alone: versions, aliases, tags, the audit log."""
        from pipeline.ops.audit import AuditLog

        versions = sorted((int(v.version), tuple(sorted(v.aliases)), tuple(sorted(v.tags.items()))) for v in self.client().search_model_versions(f"name='{MODEL}'"))
        local = self.project / "audit.db"
        if self.audit_url.endswith(str(local)) and not local.exists():
            return versions, "no audit.db"  # (opening the log would create it)
        return versions, [(e.seq, e.action, e.version) for e in AuditLog(self.audit_url).entries()]

    def refused(self, cmd: str, expect: str) -> None:
        """Bad input: exit 2, exactly one ``error:`` line naming the cause, nothing changed."""
        before = self.state()
        proc = subprocess.run(["bash", "-c", cmd], cwd=self.project, env=self.env, capture_output=True, text=True, timeout=600)
        err = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], f"{cmd}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
        assert self.state() == before, f"{cmd} changed the registry or the audit log"
        self.say(f"$ {cmd}\n    -> exit 2: {err[0]}")


def _json_out(proc: subprocess.CompletedProcess) -> dict:
    out = proc.stdout
    return json.loads(out[out.index("{") :])


def _line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    found = [line for line in proc.stdout.splitlines() if line.startswith(prefix)]
    assert found, f"no line starting {prefix!r} in:\n{proc.stdout[-3000:]}"
    return found[-1]


def tell_story(story: Story, *, embedded: bool) -> None:
    lines = readme_block(STORY)
    assert [" ".join(line.split()[:3 if line.startswith("taskvec audit") else 2]) for line in lines] == EXPECTED, lines
    run_line = dict(enumerate(lines)).__getitem__

    # 1. make run: version 1, alias challenger
    p = story.run(run_line(0))
    story.say("    " + _line(p, "λ = "))
    story.say("    " + _line(p, f"registered {MODEL} version 1 (alias challenger)"))
    ledger1 = json.loads((story.project / "outputs" / "model" / "taskvec.json").read_text())
    assert [e["vector"] for e in ledger1["edits"]] == ["sst2.safetensors", "agnews.safetensors"]
    agnews_sha = ledger1["edits"][1]["vector_sha256"]

    if embedded:
        for line in readme_block(ENGINE):  # the engine examples, after make run
            story.run(line)
        assert {"sst2.safetensors", "agnews.safetensors", "both.safetensors", "both-top10.safetensors", "interference.png"} <= {p.name for p in story.project.iterdir()}
        for folder in ("multi", "forgot", "ties", "merged"):
            assert (story.project / folder / "taskvec.json").is_file(), folder
        story.say("    engine examples: all ran; outputs written")
        story.refused(f"taskvec reproduce {MODEL} champion", "no version with alias 'champion'")
        story.refused(f"taskvec rollback {MODEL} --remove {agnews_sha}", "no version with alias 'champion'")

    # 2. promote (no champion yet) → approve: version 1 becomes champion
    p = story.run(run_line(1))
    res = _json_out(p)
    assert res["status"] == "awaiting_approval" and res["version"] == "1" and res["champion"] is None, res
    story.say(f"    gates passed: {res['gates_passed']}; challenger validation accuracy " + ", ".join(f"{r['task']} {r['challenger']:.3f}" for r in res["comparison"]))
    p = story.run(run_line(2))
    story.say("    " + _line(p, f"champion of {MODEL}: none -> 1"))

    # 3. a second edit (TIES) → promote against champion 1 → reject
    p = story.run(run_line(3))
    story.say("    " + _line(p, "λ = "))
    story.say("    " + _line(p, f"registered {MODEL} version 2 (alias challenger)"))
    p = story.run(run_line(4))
    res = _json_out(p)
    assert res["version"] == "2" and res["champion"] == "1" and res["status"] in ("awaiting_approval", "gates_failed"), res
    story.say(f"    {res['status']}: " + ", ".join(f"{r['task']} {r['champion']:.3f} -> {r['challenger']:.3f}" for r in res["comparison"]))
    p = story.run(run_line(5))
    story.say("    " + _line(p, f"recorded reject of {MODEL} v2"))
    if embedded:
        story.refused(f"taskvec approve {MODEL} 2 --approver mallory --reason again", "rejected")
        story.refused("taskvec promote --version 2 -S eval.max_rows.validation=32", "was rejected")
        story.refused(f"taskvec reproduce {MODEL} 99", "99")
        story.refused("taskvec lineage no-such-model champion", "no-such-model")
        story.refused(f"taskvec rollback {MODEL} --remove {'0' * 64}", "unknown vector")
        story.refused(f"MLFLOW_TRACKING_URI=http://127.0.0.1:5399 taskvec reproduce {MODEL} champion", "127.0.0.1:5399")

    # 4. lineage, then roll the agnews edit back out of the champion: version 3, the new champion
    p = story.run(run_line(6))
    assert agnews_sha in p.stdout
    p = story.run(run_line(7))
    story.say("    " + _line(p, f"{MODEL}: version 3 = version 1 without edit {agnews_sha[:12]}"))
    client = story.client()
    v3 = client.get_model_version_by_alias(MODEL, "champion")
    assert str(v3.version) == "3" and v3.tags["taskvec.rollback_of"] == "1" and v3.tags["taskvec.removed_vector"] == agnews_sha
    ledger3 = json.loads(v3.tags["taskvec.ledger"])
    assert [e["vector_sha256"] for e in ledger3["edits"]] == [ledger1["edits"][0]["vector_sha256"]]
    assert ledger3["base_model"] == ledger1["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"  # an id, not where it was resolved
    story.say(f"    champion -> version 3: edits {[e['vector'] for e in ledger3['edits']]}, rollback max |diff| {v3.tags['taskvec.rollback_max_abs_diff']}")
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "2"  # (int from SQLite, str over REST)

    # 5. reproduce the rolled-back version bit for bit; the audit chain checks out
    p = story.run(run_line(8))
    assert f"{MODEL} version 3: OK" in p.stdout, p.stdout
    for line in p.stdout.strip().splitlines():
        story.say("    " + line)
    hashes = {line.split()[-1] for line in p.stdout.splitlines()[1:]}
    assert hashes == {ledger3["output_hash"]}
    p = story.run(run_line(9))
    story.say("    " + p.stdout.strip().splitlines()[0])
    p = story.run(run_line(10))
    actions = [e for e in ("request", "approve", "promote", "reject", "rollback") if e in p.stdout]
    assert actions == ["request", "approve", "promote", "reject", "rollback"], p.stdout
    from pipeline.ops.audit import AuditLog

    log = [(e.action, e.version) for e in AuditLog(story.audit_url).entries(model=MODEL)]
    story.say(f"    audit log: {log}")
    assert log[:3] == [("request", "1"), ("approve", "1"), ("promote", "1")] and ("reject", "2") in log and log[-1][0] == "rollback", log

    # 6. the champion as a pyfunc, as the README's serving paragraph loads it
    code = (
        "import mlflow, pandas as pd, json\n"
        f"m = mlflow.pyfunc.load_model('models:/{MODEL}@champion')\n"
        "df = pd.DataFrame({'text': ['a wonderful, moving film', 'a dull, lifeless mess', 'stocks fell as oil prices rose'], 'task': ['sst2', 'sst2', 'agnews']})\n"
        "out = m.predict(df)\n"
        "print(json.dumps(out.to_dict(orient='records') if hasattr(out, 'to_dict') else out, default=str))\n"
    )
    env = {**story.env, "MLFLOW_TRACKING_URI": story.tracking_uri}
    proc = subprocess.run([sys.executable, "-c", code], cwd=story.project, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["task"] for r in rows] == ["sst2", "sst2", "agnews"]
    assert rows[0]["label"] in ("negative", "positive") and rows[2]["label"] in ("World", "Sports", "Business", "Sci/Tech")
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)
    story.say(f"$ python -c \"mlflow.pyfunc.load_model('models:/{MODEL}@champion').predict(df)\"")
    for r in rows:
        story.say(f"    {r['task']}: {r['label']} ({r['probability']:.3f})")
    assert (story.project / "params.yaml").read_bytes() == (Path(__file__).resolve().parent.parent / "params.yaml").read_bytes()


def _print(story: Story, title: str) -> None:
    print(f"\n===== {title} =====\n" + "\n".join(story.lines))


def test_story_embedded(tmp_path):
    story = Story(tmp_path, None, None)
    try:
        tell_story(story, embedded=True)
    finally:
        _print(story, "the README story on the embedded stack (SQLite MLflow, taskvec's own Prefect server)")


def test_story_mlflow_server_on_postgresql(tmp_path, mlflow_server, fresh_schema):
    story = Story(tmp_path, mlflow_server, fresh_schema())
    try:
        tell_story(story, embedded=False)
    finally:
        _print(story, f"the README story against mlflow server {mlflow_server} on PostgreSQL, audit log on PostgreSQL")
