"""Pipeline commands of the ``taskvec`` CLI (run, lineage, reproduce, promotion, audit, rollback).

Each group lives in its own module and exposes ``register(app)``; heavy
imports (prefect, mlflow, dvc) happen inside the commands, so ``taskvec
--help`` stays fast and the core engine commands never load them.
"""

from __future__ import annotations

import importlib

import typer

_GROUPS = ("pipeline.cli_pipeline", "pipeline.cli_ops")


def register(app: typer.Typer) -> None:
    for name in _GROUPS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(app)
