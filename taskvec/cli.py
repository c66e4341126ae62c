"""The core ``taskvec`` command line: engine, data, training and evaluation commands.

:func:`build_app` assembles the core commands (engine commands here, data /
training / evaluation commands from :mod:`taskvec.cli_tasks`) on a fresh typer
app. The core names no layer above it: the full ``taskvec`` command (console
entry point ``pipeline.cli:main``) is assembled by the pipeline, which calls
:func:`build_app` with its params schema and adds its own commands.
:func:`run_app` runs any such app so that every user error is one line on
stderr (``error: …``) and exit status 2.
"""

from __future__ import annotations

import atexit
import functools
import gc
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from taskvec.errors import TaskvecError
from taskvec.methods import METHOD_NAMES, OPTIONS


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
Method = Annotated[str, typer.Option("--method", "-m", help=f"{' | '.join(METHOD_NAMES)}.")]
Density = Annotated[Optional[float], typer.Option("--density", "-k", help=OPTIONS["density"].help)]
Drop = Annotated[Optional[float], typer.Option("--drop", "-p", help=OPTIONS["drop"].help)]
Seed = Annotated[int, typer.Option("--seed", help=OPTIONS["seed"].help)]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Admit pickle .bin checkpoints (loaded with weights_only=True).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output that taskvec did not write (never an input).")]
ShardSize = Annotated[str, typer.Option("--max-shard-size", help="Shard output weights above this size, e.g. 5GB.")]


@dataclass(frozen=True)
class MergeArgs:
    """The merge options as given on the command line (``None``: not given)."""

    method: str = "sum"
    density: float | None = None
    drop: float | None = None
    seed: int = 0

    def given(self) -> bool:
        return self.method != "sum" or self.density is not None or self.drop is not None

    def options(self):
        from taskvec.engine import MergeOptions

        return MergeOptions(method=self.method, density=1.0 if self.density is None else self.density, drop=0.0 if self.drop is None else self.drop, seed=self.seed)


_MERGE_PARAMS = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d) for n, a, d in (("method", Method, "sum"), ("density", Density, None), ("drop", Drop, None), ("seed", Seed, 0))]


def merge_options(command):
    """Give ``command`` the options ``--method/--density/--drop/--seed`` (declared once, here), passed to it as one :class:`MergeArgs` in its parameter ``merging``."""
    signature = inspect.signature(command, eval_str=True)
    params = []
    for p in signature.parameters.values():
        params += _MERGE_PARAMS if p.name == "merging" else [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)]

    @functools.wraps(command)
    def run(**kwargs):
        merging = MergeArgs(**{p.name: kwargs.pop(p.name) for p in _MERGE_PARAMS})
        return command(**kwargs, merging=merging)

    run.__signature__ = signature.replace(parameters=params)
    return run


def _vectors(args: list[str]) -> list[tuple[str, float]]:
    from taskvec.vector import parse_vector_arg

    return [parse_vector_arg(a) for a in args]


def _dtype(name: str):
    from taskvec.io import parse_dtype

    return parse_dtype(name)


def extract(
    base: Annotated[str, typer.Argument(help="Base (pre-trained) model folder or hub id.")],
    finetuned: Annotated[str, typer.Argument(help="Fine-tuned model folder or hub id (same architecture and init), or a PEFT LoRA adapter folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output task-vector file (.safetensors).")],
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only tensors matching this glob (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Leave out tensors matching this glob (repeatable), e.g. 'classifier.*'.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Storage dtype: float32, float16 or bfloat16.")] = "float32",
    allow_pickle: AllowPickle = False,
    low_rank: Annotated[bool, typer.Option("--low-rank", help="LoRA adapter: keep the factors B, A (adapter-sized file, densified on read).")] = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Extract τ = θ_finetuned − θ_base (or τ = scaling·B·A of a PEFT LoRA adapter folder) into a task-vector file."""
    from taskvec.engine import extract as run

    res = run(base, finetuned, out, include=include or (), exclude=exclude or (), dtype=_dtype(dtype), allow_pickle=allow_pickle, progress=not quiet, force=force, low_rank=low_rank)
    typer.echo(f"wrote {res.path}  sha256 {res.sha256}  {res.tensors} tensors, {res.param_count:,} parameters")


@merge_options
def combine(
    vectors: Annotated[list[str], typer.Argument(help="Vectors as PATH[:LAMBDA]; λ defaults to 1, negative negates. Analogy: C:1 B:1 A:-1.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output task-vector file.")],
    merging: MergeArgs,
    dtype: Annotated[str, typer.Option("--dtype", help="Storage dtype.")] = "float32",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Combine task vectors into one (sum, negation, analogy, TIES, DARE…)."""
    from taskvec.engine import combine as run

    res = run(_vectors(vectors), out, options=merging.options(), dtype=_dtype(dtype), progress=not quiet, force=force)
    typer.echo(f"wrote {res.path}  sha256 {res.sha256}  {res.tensors} tensors, {res.param_count:,} parameters")


@merge_options
def apply(
    base: Annotated[str, typer.Argument(help="Base model folder or hub id the vectors were taken from.")],
    vectors: Annotated[list[str], typer.Argument(help="Vectors as PATH[:LAMBDA].")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")],
    merging: MergeArgs,
    max_shard_size: ShardSize = "5GB",
    allow_pickle: AllowPickle = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Write θ_base + merge(λ·τ) as a complete Hugging Face model folder."""
    from taskvec.engine import apply as run
    from taskvec.engine import parse_size

    ledger = run(base, _vectors(vectors), out, options=merging.options(), max_shard_bytes=parse_size(max_shard_size), allow_pickle=allow_pickle, progress=not quiet, force=force)
    typer.echo(f"wrote {out}  weights {ledger['output_hash'][:12]}  edits {len(ledger['edits'])}")


@merge_options
def merge(
    base: Annotated[Optional[str], typer.Argument(help="Base model folder or hub id (not with --config).")] = None,
    finetuned: Annotated[Optional[list[str]], typer.Argument(help="Fine-tuned models as PATH[:LAMBDA] (not with --config).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="A mergekit YAML recipe (task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs) in place of BASE/FINETUNED/--method.")] = None,
    merging: MergeArgs = MergeArgs(),
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only merge tensors matching this glob.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Keep the base's value for tensors matching this glob.")] = None,
    max_shard_size: ShardSize = "5GB",
    allow_pickle: AllowPickle = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Extract and apply in one streaming pass (like mergekit's task_arithmetic/ties/dare)."""
    from taskvec.engine import merge as run
    from taskvec.engine import parse_size

    if out is None:
        raise TaskvecError("merge needs --out/-o OUT_DIR")
    if config is not None:
        if base or finetuned or merging.given():
            raise TaskvecError("--config takes the models, method and parameters from the recipe: drop BASE/FINETUNED and --method/--density/--drop")
        from taskvec.recipes import run_recipe

        ledger = run_recipe(config, out, seed=merging.seed, include=include or (), exclude=exclude or (), max_shard_bytes=parse_size(max_shard_size), allow_pickle=allow_pickle, progress=not quiet, warn=lambda m: typer.echo(m, err=True))
        typer.echo(f"wrote {out}  weights {ledger['output_hash'][:12]}")
        return
    if not base or not finetuned:
        raise TaskvecError("merge needs BASE and at least one FINETUNED model (or --config recipe.yml)")
    pairs = _vectors(finetuned)
    ledger = run(base, pairs, out, options=merging.options(), include=include or (), exclude=exclude or (), max_shard_bytes=parse_size(max_shard_size), allow_pickle=allow_pickle, progress=not quiet, force=force)
    typer.echo(f"wrote {out}  weights {ledger['output_hash'][:12]}")


def compress(
    vector: Annotated[Path, typer.Argument(help="Task-vector file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output task-vector file.")],
    density: Annotated[Optional[float], typer.Option("--density", "-k", help="Keep the top fraction (0, 1] by magnitude.")] = None,
    drop: Drop = None,
    seed: Seed = 0,
    dtype: Annotated[str, typer.Option("--dtype", help="Storage dtype: float32, float16 or bfloat16.")] = "float32",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Store a vector sparsified (top-k or DARE) and/or in half precision; report the error."""
    from taskvec.engine import compress as run

    r = run(vector, out, density=density, drop=drop, seed=seed, dtype=_dtype(dtype), progress=not quiet, force=force)
    typer.echo(
        f"wrote {r['path']}  sha256 {r['sha256'][:12]}  {r['storage']} {r['dtype']}  kept {r['kept_fraction']:.2%}  "
        f"size {r['output_bytes'] / r['input_bytes']:.2%} of input  rel-L2 error {r['relative_l2_error']:.3e}  max |err| {r['max_abs_error']:.3e}"
    )


def inspect_cmd(
    vectors: Annotated[list[Path], typer.Argument(help="One or more task-vector files.")],
    png: Annotated[Optional[Path], typer.Option("--png", help="Also save the cosine / sign-conflict heatmap here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    header: Annotated[bool, typer.Option("--header", help="Only what each file's header records (base, tensors, parameters, dtype, storage, recipe) and its sha256: no tensor math.")] = False,
) -> None:
    """Norms per layer, sparsity, and cosine / sign-conflict matrices between vectors."""
    if header:
        return _inspect_headers(vectors, png, as_json)
    from taskvec.inspection import format_report, inspect_vectors, save_heatmap
    from taskvec.io import check_output

    if png:  # never over an input vector, a folder or a device (an existing picture may be replaced)
        check_output(png, vectors, kind="file", force=True)
    report = inspect_vectors(vectors)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if png:
        save_heatmap(report, png)
        typer.echo(f"wrote {png}")


def _inspect_headers(vectors: list[Path], png: Path | None, as_json: bool) -> None:
    """``inspect --header``: each vector's header and sha256, validated as on every read (torch is never imported)."""
    from taskvec.vector import VectorFile

    if png:
        raise TaskvecError("--header reads no tensors, so it draws no --png: drop one of them")
    described = []
    for path in vectors:
        with VectorFile(path) as vf:
            described.append(vf.describe())
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    for d in described:
        typer.echo(f"{Path(d['path']).stem}  sha256 {d['sha256'][:12]}  {d['tensors']} tensors, {d['param_count']:,} parameters  {d['dtype']} {d['storage']}  base {d['base_model']} ({d['base_hash'][:12]})")


ENGINE_COMMANDS = {"extract": extract, "combine": combine, "apply": apply, "merge": merge, "compress": compress, "inspect": inspect_cmd}


def build_app(params_model=None) -> typer.Typer:
    """A fresh typer app with the core commands.

    ``params_model`` is the schema the data/training commands validate
    params files with (default: the core :class:`taskvec.config.Params`); an
    app that adds sections to params.yaml passes its extended schema (or a
    function returning it, imported only by the commands that read params),
    so every command accepts the whole file.
    """
    from taskvec import cli_tasks

    app = typer.Typer(
        name="taskvec",
        help="Task arithmetic for Hugging Face models: extract, combine and apply task vectors, and run the audited edit pipeline.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"], "obj": {"params_model": params_model}},
    )
    for name, fn in ENGINE_COMMANDS.items():
        app.command(name)(fn)
    cli_tasks.register(app)
    return app


def _one_line(text: object) -> str:
    """A message as one printable line (a non-UTF-8 file name is shown with escapes, never a traceback)."""
    line = " ".join(str(text).split())
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(message: object, code: int) -> None:
    typer.echo(f"error: {_one_line(message)}", err=True)
    sys.exit(code)


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run ``app``, turning every error the user can fix into one line and exit status 2.

    ``TaskvecError``, click usage errors (missing argument, bad option value,
    unknown command) and OS errors (read-only file system, permission denied,
    disk full: named by the user's path, never a temp file) all end in one
    ``error: …`` line on stderr.
    """
    from typer._click import exceptions as click_exc

    # At exit (after every other atexit handler: they run last-in first-out),
    # move every live object to the permanent generation, so the interpreter's
    # shutdown collection does not walk torch's ~10^5 objects: 0.2 s off every
    # command that imported torch (benchmarks/bench_startup.py). Nothing is
    # frozen while the process runs, so in-process callers (tests) are unaffected.
    atexit.unregister(gc.freeze)  # once, however often run_app is called in one process
    atexit.register(gc.freeze)

    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 file name is printed with escapes, not a traceback
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass
    try:
        rv = app(args=argv, prog_name="taskvec", standalone_mode=False)
    except TaskvecError as exc:
        _error(exc, exc.exit_code)
    except click_exc.NoArgsIsHelpError as exc:
        exc.show()  # bare ``taskvec`` / ``taskvec GROUP``: the help text, as before
        sys.exit(exc.exit_code)
    except click_exc.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _error(f"{exc.format_message()}{hint}", 2)
    except click_exc.ClickException as exc:
        _error(exc.format_message(), 2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:  # disk full, permission denied…: still one line, naming the user's path
        from taskvec.io import user_path

        where = f": {user_path(exc.filename)}" if exc.filename else ""
        _error(f"{exc.strerror or exc}{where}", 2)
    except UnicodeError as exc:  # e.g. a file name that is not valid UTF-8 reached an encoder
        _error(f"cannot encode or decode text ({exc.reason}); rename files with non-UTF-8 names", 2)
    sys.exit(rv if isinstance(rv, int) else 0)


app = build_app()


def main(argv: list[str] | None = None) -> None:
    """The core commands alone (``python -m taskvec.cli``); the full command is ``pipeline.cli:main``."""
    run_app(app, argv)


if __name__ == "__main__":
    main()
