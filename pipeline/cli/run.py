"""``taskvec run`` / ``taskvec lineage`` / ``taskvec reproduce``.

Heavy imports (prefect, mlflow) happen inside the commands so ``taskvec
--help`` stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.options import AsJson, Model, ParamsOpt, Version


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    # Prefect: ephemeral server unless PREFECT_API_URL points at one; no telemetry; patient start-up on a busy CPU
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        params: ParamsOpt = Path("params.yaml"),
        no_register: Annotated[bool, typer.Option("--no-register", help="Stop after evaluate.")] = False,
        no_dvc: Annotated[bool, typer.Option("--no-dvc", help="Do not dvc commit/push the outputs.")] = False,
        concurrency: Annotated[int, typer.Option("--concurrency", help="Fine-tunes run at once.")] = 2,
        as_json: Annotated[bool, typer.Option("--json", help="Print the flow's summary as JSON.")] = False,
        set_param: Annotated[Optional[list[str]], typer.Option("--set-param", "-S", metavar="KEY.PATH=VALUE", help="Override a params value for this run (repeatable), as `dvc exp run -S`: e.g. -S train.steps=4. params.yaml is not modified; the effective params go to .taskvec-run-params.yaml, and the run is not committed to DVC.")] = None,
    ) -> None:
        """Run the default edit flow end to end (Prefect; MLflow tracking; DVC commit + push)."""
        _offline_env()
        from pipeline import params as P

        overrides = list(set_param or [])
        effective = P.effective_params(params, overrides)
        p = P.load(effective)  # fail fast, one line, before Prefect starts
        from pipeline.ops.services import prefect_api

        # our own Prefect API server (dies with us), started before the heavy imports so they overlap
        with prefect_api() as api:
            from taskvec.data import validate_tasks

            validate_tasks(p, p.finetune.tasks + p.edit.eval_tasks())  # all data of the plan, before any training
            from flows.schedule import edit_flow

            edit = edit_flow(effective)  # Prefect's DaskTaskRunner when runner/TASKVEC_DASK_ADDRESS say so
            api.wait()
            summary = edit(str(params), register_model=not no_register, dvc_sync=False if no_dvc else None, finetune_concurrency=concurrency, overrides=overrides)
        if as_json:
            typer.echo(json.dumps(summary, indent=2, default=str))
            return
        from pipeline.steps.evaluate import results_markdown

        typer.echo(results_markdown(summary["metrics"]))
        typer.echo(f"λ = {summary['lambda']:g}   model {summary['model_dir']}   weights {summary['output_hash'][:12]}")
        reg = summary.get("registered")
        if reg:
            typer.echo(f"registered {reg['model']} version {reg['version']} (alias {reg['alias']}) in {summary['tracking_uri']}")
        cached = [k for k, v in summary["states"].items() if v == "Cached"]
        if cached:
            typer.echo(f"cached (not recomputed): {', '.join(cached)}")
        typer.echo(f"took {summary['seconds']:.1f} s   see: mlflow ui --backend-store-uri {summary['tracking_uri']}")

    @app.command("lineage")
    def lineage_cmd(model: Model, version: Version, params: ParamsOpt = Path("params.yaml"), as_json: AsJson = False) -> None:
        """Print a registered version's reproducibility record: ledger, commit, dvc.lock, params, data, flow run."""
        rec = _registry("lineage", params, model, version)
        from pipeline.ops import registry

        typer.echo(json.dumps(rec, indent=2, default=str) if as_json else registry.format_lineage(rec))

    @app.command("reproduce")
    def reproduce_cmd(model: Model, version: Version, params: ParamsOpt = Path("params.yaml"), as_json: AsJson = False) -> None:
        """Rebuild a registered version's weights from its ledger (base + Σλτ) and check the content hash."""
        rep = _registry("reproduce", params, model, version)
        if as_json:
            typer.echo(json.dumps(rep, indent=2))
        else:
            verdict = "OK: rebuilt weights match the ledger and the registered artifact" if rep["ok"] else "MISMATCH"
            typer.echo(f"{rep['model']} version {rep['version']}: {verdict}")
            typer.echo(f"  ledger     {rep['ledger_output_hash']}\n  rebuilt    {rep['rebuilt_hash']}\n  registered {rep['registered_hash']}")
            if rep.get("served"):
                sv = rep["served"]
                typer.echo(f"  served     {sv['hash']} (compressed {sv['spec']}: recorded {sv['recorded'][:12]}, max |θ̂ − θ| {sv['max_abs_weight_error']:.3e})")
        if not rep["ok"]:
            raise typer.Exit(1)


def _registry(operation: str, params: Path, model: str, version: str):
    """Run ``pipeline.ops.registry.<operation>(params, model, version)`` offline."""
    _offline_env()
    from pipeline import params as P
    from pipeline.ops import registry

    return getattr(registry, operation)(P.load(params), model, version)
