"""``taskvec benchmark``: regenerate the paper-experiment results (negation, addition, analogy).

:func:`register` adds the command to the shared typer app (``taskvec.cli``
lists this module in ``_register_extensions``). Heavy imports happen inside
the command so ``taskvec --help`` stays fast.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer


def benchmark(
    config: Annotated[Path, typer.Option("--config", "-c", help="Experiment config (tasks, budgets, row caps, methods).")] = Path("benchmarks/experiments.yaml"),
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: results.md, results.json, plots, cache/.")] = Path("benchmarks/out/paper"),
    quick: Annotated[bool, typer.Option("--quick", help="Smoke-test budgets (a few minutes; numbers not meaningful).")] = False,
) -> None:
    """Fine-tune (cached), build task vectors and regenerate the negation / addition / analogy table.

    λ and every other choice are made on validation rows; test rows are only reported.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from benchmarks.paper.experiments import run_benchmark

    started = time.perf_counter()

    def log(msg: str) -> None:
        typer.echo(f"[{time.perf_counter() - started:7.1f}s] {msg}")

    run_benchmark(config, out, quick=quick, log=log)
    typer.echo((out / "results.md").read_text())


def register(app: typer.Typer) -> None:
    app.command("benchmark")(benchmark)
