"""The full ``taskvec`` command: the core commands plus the pipeline's.

This is where the whole app is known, so the console entry point
(``taskvec = "pipeline.cli:main"``) sits here. The core app is built by
:func:`taskvec.cli.build_app` with the pipeline's params schema (so core
commands such as ``taskvec finetune`` accept the shipped params.yaml with all
its sections); this package then adds its command groups — run / lineage /
reproduce (:mod:`pipeline.cli.run`), promotion, audit and rollback
(:mod:`pipeline.cli.ops`) — and the paper benchmark
(:mod:`benchmarks.paper.cli`). Heavy imports (prefect, mlflow, dvc, torch)
happen inside the commands, so ``taskvec --help`` stays fast.
"""

from __future__ import annotations

import typer

from taskvec.cli import build_app, run_app


def _params_model():
    from pipeline.params import PipelineParams  # pydantic schemas: 0.1 s, paid only by commands that read params

    return PipelineParams


def build() -> typer.Typer:
    from benchmarks.paper import cli as paper
    from pipeline.cli import deploy, ops, run

    app = build_app(params_model=_params_model)
    for group in (run, ops, deploy, paper):
        group.register(app)
    return app


app = build()


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``taskvec``."""
    run_app(app, argv)


if __name__ == "__main__":
    main()
