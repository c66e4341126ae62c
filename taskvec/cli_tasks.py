"""``taskvec finetune | evaluate | search``: the data, training and λ-search commands.

The commands are plain functions; :func:`register` adds them to an app built
by :func:`taskvec.cli.build_app`, whose context carries the params schema the
whole app knows (the core's, or the pipeline's extension of it), so a params
file with pipeline sections is valid here too. Heavy
modules (torch, transformers, datasets) are imported inside the commands so
``taskvec --help`` stays fast. User errors are raised as ``TaskvecError``;
``taskvec.cli.main`` prints them as one line and exits 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from taskvec.errors import TaskvecError

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameters file declaring the tasks and budgets.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set-param", "-S", metavar="KEY.PATH=VALUE", help="Override a params value (repeatable), e.g. -S train.steps=4; the file is not modified.")]


def _load_params(ctx: typer.Context, path: Path, overrides: list[str] | None = None):
    """Validate ``path`` (plus ``-S`` overrides) with the schema of the running app (see :func:`taskvec.cli.build_app`)."""
    from taskvec.config import Params, load_params

    model = (ctx.find_root().obj or {}).get("params_model") or Params
    if not isinstance(model, type):  # a loader, so that commands which read no params file skip the schema's import
        model = model()
    return load_params(path, model=model, overrides=overrides)


def finetune(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="Task name declared under 'tasks' in the params file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: fine-tuned encoder (base format), tokenizer, heads/, finetune.json.")],
    params: ParamsOpt = Path("params.yaml"),
    base: Annotated[Optional[str], typer.Option("--base", help="Base model folder or hub id (default: params 'base').")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Optimiser steps (default: params train.steps).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder that taskvec did not write (never an input).")] = False,
    quiet: QuietOpt = False,
    set_param: SetOpt = None,
) -> None:
    """Fine-tune the base encoder on TASK with its frozen zero-shot head (or MLM for kind: mlm).

    Only the encoder is saved, with the base's tensor names, so
    `taskvec extract BASE OUT` gives the task vector directly.
    """
    from taskvec.train import finetune as run

    result = run(task, _load_params(ctx, params, set_param), out, base=base, steps=steps, progress=not quiet, force=force)
    losses = result.losses
    loss = f"  loss {losses[0][1]:.4f} -> {losses[-1][1]:.4f}" if losses else ""
    typer.echo(f"wrote {result.out_dir}  {result.manifest['train']['steps']} steps in {result.seconds:.1f}s{loss}")


def evaluate(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model folder (or hub id) whose encoder is scored.")],
    task: Annotated[str, typer.Option("--task", "-t", help="Task name declared in the params file.")],
    split: Annotated[str, typer.Option("--split", help="validation | test.")] = "validation",
    params: ParamsOpt = Path("params.yaml"),
    head: Annotated[Optional[Path], typer.Option("--head", help="Head file (default: MODEL/heads/TASK.safetensors, else built from the base).")] = None,
    max_rows: Annotated[Optional[int], typer.Option("--max-rows", min=1, help="Row cap (default: params eval.max_rows).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the metrics as JSON here.")] = None,
    set_param: SetOpt = None,
) -> None:
    """Accuracy and macro-F1 of MODEL on one task split."""
    from taskvec.evaluate import evaluate_model
    from taskvec.io import atomic_path

    if split not in ("validation", "test"):
        raise TaskvecError(f"--split must be validation or test, got {split!r}")
    result = evaluate_model(model, task, _load_params(ctx, params, set_param), split=split, head_path=head, max_rows=max_rows)
    if out is not None:
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    suffix = f"  wrote {out}" if out is not None else ""
    typer.echo(f"{task} {split}: accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  n {result['n']}{suffix}")


def _reference(items: list[str]) -> dict[str, float] | None:
    if not items:
        return None
    reference = {}
    for item in items:
        task, sep, value = item.partition("=")
        try:
            reference[task] = float(value)
        except ValueError:
            sep = ""
        if not sep or not task:
            raise TaskvecError(f"bad --reference {item!r}: expected TASK=ACCURACY")
    return reference


def search(
    ctx: typer.Context,
    base: Annotated[str, typer.Argument(help="Base model folder or hub id the vectors were taken from.")],
    vector: Annotated[list[str], typer.Option("--vector", "-v", help="Task vector as PATH[:WEIGHT] (repeatable); τ = Σ weight·τᵢ.")],
    objective: Annotated[str, typer.Option("--objective", help="addition: θ+λτ, maximise mean normalised accuracy. negation: θ−λτ, minimise target accuracy; controls lose ≤ max-control-drop points.")],
    task: Annotated[list[str], typer.Option("--task", "-t", help="Task(s) scored: the added tasks (addition, paired with --vector in order) or the targets (negation).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: curve.csv, curve.png, search.json.")],
    control: Annotated[Optional[list[str]], typer.Option("--control", "-c", help="Control task(s) (repeatable; required for negation): each may lose at most --max-control-drop points.")] = None,
    strategy: Annotated[Optional[str], typer.Option("--strategy", help="golden (≤ 8 evaluations) | grid (the paper's 21 points). Default: params search.strategy.")] = None,
    reference: Annotated[Optional[list[str]], typer.Option("--reference", help="Fine-tuned accuracy as TASK=ACC (addition); default: measured by applying each vector alone.")] = None,
    max_control_drop: Annotated[Optional[float], typer.Option("--max-control-drop", min=0, help="Accuracy points a control may lose against the base (upper confidence bound on validation). Default: params search.max_control_drop.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    quiet: QuietOpt = False,
    set_param: SetOpt = None,
) -> None:
    """Search the scaling coefficient λ for a task-vector composition, reloading nothing per candidate."""
    from taskvec.search_run import run_search, write_outputs
    from taskvec.vector import TaskVector, parse_vector_arg

    if strategy not in (None, "golden", "grid"):
        raise TaskvecError(f"--strategy must be golden or grid, got {strategy!r}")
    settings = _load_params(ctx, params, set_param)
    if max_control_drop is not None:
        if not math.isfinite(max_control_drop):
            raise TaskvecError(f"--max-control-drop must be a finite number of points, got {max_control_drop}")
        settings.search.max_control_drop = max_control_drop
    vectors = [(TaskVector.load(path).tensors, weight) for path, weight in map(parse_vector_arg, vector)]
    result = run_search(
        base,
        vectors,
        objective,
        task,
        settings,
        controls=control or (),
        reference=_reference(reference or []),
        strategy=strategy,
        progress=not quiet,
    )
    write_outputs(result, out)
    if result.note:
        typer.echo(f"control constraint: {result.note}")
    typer.echo(
        f"best λ {result.best_lambda:.4g}  {objective} score {result.best_score:.4f}  "
        f"{len(result.evaluations)} evaluations in {result.seconds:.1f}s  wrote {out}"
    )


def register(app: typer.Typer) -> None:
    """Add ``finetune``, ``evaluate`` and ``search`` to ``app``."""
    app.command("finetune")(finetune)
    app.command("evaluate")(evaluate)
    app.command("search")(search)
