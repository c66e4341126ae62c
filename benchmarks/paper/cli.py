"""``taskvec benchmark``: regenerate the paper-experiment results (negation, addition, analogy).

:func:`register` adds the command to the shared typer app (``taskvec.cli``
lists this module in ``_register_extensions``). Heavy imports happen inside
the command so ``taskvec --help`` stays fast.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer


def benchmark(
    config: Annotated[Path, typer.Option("--config", "-c", help="Experiment config (tasks, budgets, row caps, methods).")] = Path("benchmarks/experiments.yaml"),
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: results.md, results.json, plots, cache/.")] = Path("benchmarks/out/paper"),
    quick: Annotated[bool, typer.Option("--quick", help="Smoke-test budgets (a few minutes; numbers not meaningful).")] = False,
    paper_json: Annotated[Optional[Path], typer.Option("--paper-json", help="Also write the summary (means over seeds ± 95% intervals) here, e.g. benchmarks/results/paper.json.")] = None,
    aggregate: Annotated[bool, typer.Option("--aggregate", help="Run nothing: summarise the seed runs already under OUT/seed-<s>/.")] = False,
    update: Annotated[bool, typer.Option("--update", help="Keep the experiments this run leaves out (e.g. -S bench.addition=null) from the existing --paper-json.")] = False,
    set_param: Annotated[Optional[list[str]], typer.Option("--set-param", "-S", metavar="KEY.PATH=VALUE", help="Override a config value (repeatable), e.g. -S bench.seeds=[0,1,2] -S eval.max_rows.test=500; the file is not modified.")] = None,
) -> None:
    """Fine-tune (cached), build task vectors and regenerate the negation / addition / analogy table.

    Every experiment runs once per seed of bench.seeds; the table and paper.json report
    the mean over seeds with a 95% t-interval. λ and every other choice are made on
    validation rows; test rows are only reported.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from benchmarks.paper.experiments import run_benchmark

    started = time.perf_counter()

    def log(msg: str) -> None:
        typer.echo(f"[{time.perf_counter() - started:7.1f}s] {msg}")

    run_benchmark(config, out, quick=quick, overrides=set_param, paper_json=paper_json, aggregate_only=aggregate, update=update, log=log)
    typer.echo((out / "results.md").read_text())


def register(app: typer.Typer) -> None:
    app.command("benchmark")(benchmark)
