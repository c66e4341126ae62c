"""``taskvec deploy``: the work pool and the deployments of ``prefect.yaml`` in one command.

What it does, against the Prefect server of ``PREFECT_API_URL``:

1. creates the process work pool (``--pool``, default ``taskvec``) unless it exists;
2. runs ``prefect --no-prompt deploy --all`` from the project's code root
   (the folder holding ``prefect.yaml`` and ``flows/``) on a copy of
   prefect.yaml in which every deployment targets that pool, takes
   ``params_file`` as the *absolute* path of ``--params``, and the nightly
   deployment takes its cron, timezone, name and parameters from params.yaml's
   ``schedule:`` section. prefect.yaml has no ``pull:`` section, so Prefect
   records the absolute code root in each deployment's pull step
   (``set_working_directory``): a worker needs no variable such as
   ``TASKVEC_ROOT``, only ``prefect worker start --pool taskvec``.

Equivalent by hand, from the code root::

    prefect work-pool create taskvec --type process
    prefect deploy --all
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

#: the folder with prefect.yaml, flows/, tasks/ and pipeline/ (this file is pipeline/cli/deploy.py)
CODE_ROOT = Path(__file__).resolve().parent.parent.parent


def deployment_config(params_file: Path, pool: str, code_root: Path = CODE_ROOT) -> dict:
    """prefect.yaml with the pool, the absolute params file and params.yaml's schedule applied."""
    import yaml

    from flows.schedule import schedule_config

    config = yaml.safe_load((code_root / "prefect.yaml").read_text())
    params_abs = str(params_file.resolve())
    sched = schedule_config(params_abs)
    for dep in config.get("deployments", []):
        dep["work_pool"] = {**(dep.get("work_pool") or {}), "name": pool}
        params = dep.setdefault("parameters", {}) or {}
        if "params_file" in params or dep["entrypoint"].startswith("flows/schedule.py"):
            params["params_file"] = params_abs
        dep["parameters"] = params
        if dep["entrypoint"].endswith(":scheduled_edit"):
            dep["name"] = sched["name"]
            dep["parameters"] = {**params, **sched["parameters"], "params_file": params_abs}
            dep["schedules"] = [{"cron": sched["cron"], "timezone": sched["timezone"], "active": True}]
    config.pop("pull", None)  # Prefect then records the absolute code root (the cwd of `prefect deploy`)
    return config


def ensure_pool(pool: str) -> bool:
    """Create the process work pool ``pool``; False when it already existed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            return True
        except ObjectAlreadyExists:
            return False


def deploy(params_file: Path, pool: str = "taskvec", code_root: Path = CODE_ROOT, timeout: float = 300) -> dict:
    """Work pool + ``prefect deploy --all``; returns {pool, created, deployments: {name: working directory}}."""
    import yaml

    from pipeline.ops.services import check_prefect_api
    from taskvec.errors import TaskvecError

    if not os.environ.get("PREFECT_API_URL"):
        raise TaskvecError("taskvec deploy needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api after `prefect server start`)")
    if not params_file.is_file():
        raise TaskvecError(f"params file {params_file} does not exist")
    check_prefect_api()
    config = deployment_config(params_file, pool, code_root)
    created = ensure_pool(pool)
    with tempfile.TemporaryDirectory(prefix="taskvec-deploy-") as tmp:
        pf = Path(tmp) / "prefect.yaml"
        pf.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(pf)]
        try:
            proc = subprocess.run(cmd, cwd=code_root, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, PREFECT_CLI_PROMPT="false"))
        except subprocess.TimeoutExpired:
            raise TaskvecError(f"prefect deploy did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise TaskvecError(f"prefect deploy failed ({proc.returncode}): {tail[0]}")
    return {"pool": pool, "pool_created": created, "deployments": read_deployments([(d.get("entrypoint", ""), d["name"]) for d in config["deployments"]])}


def read_deployments(entries: list[tuple[str, str]]) -> dict[str, dict]:
    """``{flow/deployment: {id, pull_steps, work_pool}}`` as the server has them."""
    from prefect.client.orchestration import get_client

    from flows.promote import promote_flow
    from flows.rollback import rollback_flow
    from flows.schedule import scheduled_edit

    flow_names = {"scheduled_edit": scheduled_edit.name, "promote_flow": promote_flow.name, "rollback_flow": rollback_flow.name}
    out = {}
    with get_client(sync_client=True) as client:
        for entrypoint, name in entries:
            full = f"{flow_names.get(entrypoint.rsplit(':', 1)[-1], entrypoint)}/{name}"
            dep = client.read_deployment_by_name(full)
            out[full] = {"id": str(dep.id), "work_pool": dep.work_pool_name, "pull_steps": dep.pull_steps}
    return out


def register(app: typer.Typer) -> None:
    @app.command("deploy")
    def deploy_cmd(
        params: Annotated[Path, typer.Option("--params", "-p", help="params file the deployments run with (recorded as an absolute path).")] = Path("params.yaml"),
        pool: Annotated[str, typer.Option("--pool", help="Process work pool to create (if missing) and deploy to.")] = "taskvec",
    ) -> None:
        """Create the work pool and deploy prefect.yaml's flows (nightly edit, promote, rollback) to PREFECT_API_URL."""
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        rep = deploy(params, pool)
        typer.echo(f"work pool {rep['pool']} ({'created' if rep['pool_created'] else 'exists'})")
        for name, dep in rep["deployments"].items():
            wd = next((s[k].get("directory") for s in dep["pull_steps"] or [] for k in s if k.endswith("set_working_directory")), "?")
            typer.echo(f"deployed {name}  (runs in {wd})")
        typer.echo(f"start a worker: prefect worker start --pool {rep['pool']}")
