"""`taskvec deploy` against a real Prefect server; a real process worker runs the nightly flow to completion."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest_pipeline import pipeline_env, tiny_project  # noqa: F401


@pytest.fixture
def prefect_server(pipeline_env, monkeypatch):
    """A real Prefect API server (uvicorn, fresh database under the test's PREFECT_HOME), always stopped."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipeline.ops.services import PrefectServer

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = PrefectServer().start()
    try:
        server.wait(timeout=240)
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server
    finally:
        server.stop()
    assert "PREFECT_API_URL" not in os.environ


def _app():
    import typer

    from pipeline.cli import deploy

    app = typer.Typer()
    deploy.register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps `deploy` a subcommand
        pass

    return app


def test_deploy_without_a_server_is_one_line_error(tiny_project, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    res = CliRunner().invoke(_app(), ["deploy", "--params", str(tiny_project / "params.yaml")])
    assert res.exit_code != 0
    assert "PREFECT_API_URL" in str(res.exception or res.output)


def test_deployment_config_records_absolute_params_and_schedule(tiny_project):
    import yaml

    from pipeline.cli.deploy import CODE_ROOT, deployment_config

    pf = tiny_project / "params.yaml"
    raw = yaml.safe_load(pf.read_text())
    raw["schedule"] = {"cron": "15 4 * * 1", "timezone": "Europe/Paris", "deployment": "weekly"}
    pf.write_text(yaml.safe_dump(raw))
    cfg = deployment_config(pf, "pool-x")
    assert "pull" not in cfg and "pull" not in yaml.safe_load((CODE_ROOT / "prefect.yaml").read_text())
    nightly = next(d for d in cfg["deployments"] if d["entrypoint"].endswith(":scheduled_edit"))
    assert nightly["name"] == "weekly" and nightly["schedules"] == [{"cron": "15 4 * * 1", "timezone": "Europe/Paris", "active": True}]
    assert nightly["parameters"]["params_file"] == str(pf.resolve())
    assert {d["work_pool"]["name"] for d in cfg["deployments"]} == {"pool-x"}


@pytest.mark.slow
def test_taskvec_deploy_then_a_worker_runs_the_scheduled_flow(prefect_server, tiny_project, tmp_path):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from flows.schedule import FINGERPRINT_TAG
    from pipeline.cli.deploy import CODE_ROOT

    pf = tiny_project / "params.yaml"
    res = CliRunner().invoke(_app(), ["deploy", "--params", str(pf)])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "work pool taskvec (created)" in res.output and "deployed scheduled-edit/nightly-edit" in res.output

    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("taskvec")
        assert pool.type == "process"
        dep = client.read_deployment_by_name("scheduled-edit/nightly-edit")
        # the pull step holds the absolute code root: the worker needs no TASKVEC_ROOT
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(CODE_ROOT)}}]
        assert dep.parameters["params_file"] == str(pf.resolve()) and dep.work_pool_name == "taskvec"
        assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
        for name in ("promote/promote", "rollback/rollback"):
            assert client.read_deployment_by_name(name).work_pool_name == "taskvec"
        run = client.create_flow_run_from_deployment(dep.id)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TASKVEC_ROOT"}
    env["PREFECT_API_URL"] = prefect_server.api_url
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "taskvec", "--run-once"], cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = worker.communicate(timeout=600)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), (state, out[-4000:])
    # the scheduled flow ran the tiny edit pipeline and recorded its fingerprint on the registered model
    uri = f"sqlite:///{tiny_project / 'mlflow.db'}"
    mc = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(mc.get_model_version_by_alias("tiny-edit", "challenger").version) == "1"
    assert FINGERPRINT_TAG in mc.get_registered_model("tiny-edit").tags
