"""The paper's three experiments (Ilharco et al., ICLR 2023) on small text encoders.

One entry point, :func:`run_benchmark`, regenerates ``results.md``,
``results.json`` and PNG plots from a config such as
``benchmarks/experiments.yaml`` (:class:`ExperimentParams` = :class:`Params`
plus a ``bench`` section):

1. **Negation** — for each target (``offensive``, ``sst2``): base vs
   ``θ − λ·τ_target`` vs ``θ − λ·r`` (``r`` a seeded Gaussian vector with the
   same per-tensor or global norm as ``τ_target``) vs gradient ascent on the
   target (−cross-entropy, AdamW; learning rate and step count chosen among
   validation probes). λ and the ascent checkpoint minimise the target's
   validation accuracy subject to the control (``agnews``) losing at most
   ``search.max_control_drop`` points — the upper confidence bound of its
   paired validation drop, on ``search.control_rows`` rows
   (:class:`taskvec.search.ControlConstraint`, the λ search's one mechanism).
2. **Addition** — the vectors of ``sst2, agnews, sms_spam, offensive``
   merged by task arithmetic (sum), TIES (top-k density), DARE (drop p,
   rescale) and DARE-TIES; each merge is built with unit weights and a single
   scale λ is searched to maximise mean normalised validation accuracy
   (accuracy / the task's own fine-tuned validation accuracy).
3. **Analogy** — ``τ_yelp ≈ τ_amazon + (τ_yelp_lm − τ_amazon_lm)``; λ
   maximises Yelp validation accuracy; compared on the Yelp test split with
   the base, the amazon-only vector and supervised Yelp fine-tuning.

Selection uses validation rows only; test rows are scored once per final
model and never compared to choose anything.

Statistics: the whole run is repeated for every seed of ``bench.seeds``
(:func:`~benchmarks.paper.spec.seed_params`: fine-tuning seed, row sampling
of capped splits, random vectors, DARE masks); each seed's results go to
``<out>/seed-<s>/`` and the summary — the mean over seeds with a 95 %
Student-t interval (:mod:`~benchmarks.paper.stats`) — to ``paper.json``
(schema: ``benchmarks/results/paper.schema.json``) and ``results.md``.

Recipe (the paper's, for text encoders): each task vector covers the encoder
only; every task is scored with its own *frozen* zero-shot head built from the
*base* encoder's embeddings of its label descriptions (:mod:`taskvec.heads`),
so the base has a measurable zero-shot accuracy. Fine-tunes go through
:func:`taskvec.train.finetune_task`, vectors through :func:`taskvec.engine.extract`;
both are cached under ``<out>/cache`` keyed by a hash of base, task spec and
budget, so a re-run only re-does the (cheap) searches and evaluations. All
evaluation goes through the core harness (:class:`taskvec.suite.Suite`: one
encoder on its device policy's device, CUDA when available) and all weight
edits happen in place on it (:class:`taskvec.suite.WeightEditor`); gradient
ascent trains that encoder on the same device.

Modules: :mod:`~benchmarks.paper.spec` (config), :mod:`~benchmarks.paper.vectors`
(cached fine-tunes and vectors), :mod:`~benchmarks.paper.suite` (evaluation and
λ search), :mod:`~benchmarks.paper.negation`, :mod:`~benchmarks.paper.addition`,
:mod:`~benchmarks.paper.analogy`, :mod:`~benchmarks.paper.stats`, :mod:`~benchmarks.paper.report`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.paper.addition import run_addition
from benchmarks.paper.analogy import run_analogy
from benchmarks.paper.negation import run_negation
from benchmarks.paper.report import plot_bars, render_markdown
from benchmarks.paper.spec import ExperimentParams, load_experiment_params, needed_tasks, quick_params, seed_params
from benchmarks.paper.stats import INTERVAL, goals, mean_tree, paper_summary
from benchmarks.paper.suite import open_suite
from benchmarks.paper.vectors import ensure_vector, global_norm, load_tau
from taskvec.errors import TaskvecError
from taskvec.io import atomic_path


def run_benchmark(
    config: str | Path = "benchmarks/experiments.yaml",
    out: str | Path = "benchmarks/out/paper",
    *,
    quick: bool = False,
    params: ExperimentParams | None = None,
    overrides: list[str] | None = None,
    paper_json: str | Path | None = None,
    aggregate_only: bool = False,
    update: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the configured experiments once per seed of ``bench.seeds`` and summarise them.

    Each seed's run goes to ``out/seed-<s>/`` (results.json, λ curves); ``out``
    gets ``paper.json`` (means over seeds with 95 % t-intervals, the issue's
    schema), ``results.json`` (every seed's results and the summary),
    ``results.md`` and plots of the means. ``paper_json``, when given, gets a
    copy of ``paper.json`` (``make paper`` commits ``benchmarks/results/paper.json``).
    ``aggregate_only`` runs nothing: it summarises the seeds' ``out/seed-<s>/results.json``
    (e.g. after running the seeds as separate processes with ``-S bench.seeds=[s]``).
    ``update`` (needs ``paper_json``) re-runs part of it: the experiments this run
    leaves out (e.g. ``-S bench.addition=null``) keep their results from the
    existing ``paper_json`` (:func:`merge_sections`), which must be over the same seeds.
    Returns ``{"seeds": {seed: results}, "paper": summary}``.
    """
    started = time.perf_counter()
    if update and paper_json is None:
        raise TaskvecError("--update keeps the other experiments of an existing --paper-json: give --paper-json")
    params = params or load_experiment_params(config, overrides=overrides)
    if quick:
        params = quick_params(params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if params.bench.threads:
        torch.set_num_threads(params.bench.threads)
    runs: dict[int, dict] = {}
    for seed in params.bench.seeds:
        if aggregate_only:
            found = out / f"seed-{seed}" / "results.json"
            if not found.is_file():
                raise TaskvecError(f"no results for seed {seed}: {found} (run that seed first)")
            runs[seed] = json.loads(found.read_text())
            continue
        log(f"[bench] seed {seed} ({len(runs) + 1}/{len(params.bench.seeds)})")
        runs[seed] = run_seed(seed_params(params, seed), out / f"seed-{seed}", out / "cache", config=config, quick=quick, log=log)
    chance = {t: 1 / len(params.task(t).labels) for t in needed_tasks(params)[1]}
    paper = mean_tree([paper_summary(r, chance) for r in runs.values()])
    paper |= {
        "split": "test",
        "seeds": list(params.bench.seeds),
        "interval": INTERVAL,
        "budget": budget(params, quick=quick, overrides=overrides),
        "seconds": round(time.perf_counter() - started, 1),
        "seconds_per_seed": {seed: r["meta"]["seconds"] for seed, r in runs.items()},
        "device": next(iter(runs.values()))["meta"]["device"],
    }
    if update:
        paper = merge_sections(paper, Path(paper_json))
    paper["goals"] = goals(paper, max_control_drop=params.search.max_control_drop)
    missing = [name for name in SECTIONS if name not in paper]
    paper["complete"] = len(runs) >= 3 and not missing and not quick and not any((k.get("budget") or {}).get("quick", True) for k in paper.get("kept", {}).values())
    if not paper["complete"]:
        paper["note"] = f"partial result: {len(runs)} seed(s){', without ' + ', '.join(missing) if missing else ''}{', --quick budget' if quick else ''}; budget below"
    means = mean_tree([{k: v for k, v in r.items() if k != "meta"} for r in runs.values()])
    means["meta"] = next(iter(runs.values()))["meta"] | {"seconds": paper["seconds"], "seconds_per_seed": paper["seconds_per_seed"], "seeds": list(params.bench.seeds)}
    text = json.dumps(paper, indent=2, default=float) + "\n"
    publish = [(out / "paper.json", text), (out / "results.json", json.dumps({"paper": paper, "seeds": runs}, indent=2, default=float) + "\n")]
    publish.append((out / "results.md", render_markdown(means, paper)))
    if paper_json is not None:
        publish.append((Path(paper_json), text))
    for path, content in publish:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(content)
    plot_bars(means, out)
    return {"seeds": runs, "paper": paper}


SECTIONS = ("negation", "addition", "analogy")


def merge_sections(paper: dict, previous_path: Path) -> dict:
    """``paper`` plus the experiments it lacks, taken from the summary at ``previous_path``.

    Each kept experiment is named under ``kept`` with the budget, time and
    device of the run that produced it (so the file says which numbers came
    from which run); the seeds must be the same. Refused in one line when
    the file is missing, unreadable, over other seeds, or has nothing to keep.
    """
    try:
        previous = json.loads(previous_path.read_text())
    except FileNotFoundError:
        raise TaskvecError(f"--update: no summary to update at {previous_path}") from None
    except (OSError, ValueError) as exc:
        raise TaskvecError(f"--update: cannot read {previous_path}: {exc}") from None
    if not isinstance(previous, dict) or sorted(previous.get("seeds") or []) != sorted(paper["seeds"]):
        seeds = previous.get("seeds") if isinstance(previous, dict) else None
        raise TaskvecError(f"--update: {previous_path} is over seeds {seeds}, this run over {paper['seeds']}: run the same seeds")
    kept = [name for name in SECTIONS if name not in paper and name in previous]
    if not kept:
        raise TaskvecError(f"--update: this run has every experiment {previous_path} has; write it without --update")
    earlier = previous.get("kept") or {}
    own = {key: previous.get(key) for key in ("budget", "seconds_per_seed", "device")}
    return paper | {name: previous[name] for name in kept} | {"kept": {name: earlier.get(name, own) for name in kept}}


def budget(params: ExperimentParams, *, quick: bool, overrides: list[str] | None) -> dict:
    """What one seed's run costs: fine-tuning budget, row caps, λ search and gradient-ascent budgets."""
    neg = params.bench.negation
    return {
        "quick": quick,
        "overrides": list(overrides or []),
        "train": {k: v for k, v in params.train.model_dump().items() if k in ("steps", "batch_size", "lr", "max_length")},
        "train_steps_override": dict(params.bench.steps),
        "rows": {"validation": params.eval.max_rows.validation, "control_validation": params.search.control_rows, "test": params.eval.max_rows.test},
        "search": {k: v for k, v in params.search.model_dump().items() if k != "split"},
        "gradient_ascent": neg.gradient_ascent.model_dump() if neg else None,
    }


def run_seed(params: ExperimentParams, out: Path, cache: Path, *, config: str | Path = "", quick: bool = False, log: Callable[[str], None] = print) -> dict:
    """One seed's run (``params`` from :func:`seed_params`): fine-tunes (cached), vectors, the three experiments."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(params.bench.seed)
    ft_tasks, scored = needed_tasks(params)
    if not scored:
        raise TaskvecError("nothing to run: the bench section enables no experiment")
    log(f"[bench] fine-tunes: {', '.join(ft_tasks)}; scored tasks: {', '.join(scored)}")
    vec_paths = {t: ensure_vector(params, t, cache, log) for t in ft_tasks}
    taus = {t: load_tau(p) for t, p in vec_paths.items()}
    t0 = time.perf_counter()
    suite = open_suite(params, scored)
    log(f"[bench] evaluation suite ready in {time.perf_counter() - t0:.0f}s")
    results: dict = {}
    timings: dict = {"finetune_and_extract": round(t0 - started, 1)}
    for name, fn, enabled in (
        ("negation", run_negation, params.bench.negation),
        ("addition", run_addition, params.bench.addition),
        ("analogy", run_analogy, params.bench.analogy),
    ):
        if not enabled:
            continue
        t1 = time.perf_counter()
        log(f"[bench] {name} ...")
        results[name] = fn(suite, taus, params, out, log)
        suite.reset()
        timings[name] = round(time.perf_counter() - t1, 1)
    results["meta"] = {
        "base": params.base,
        "config": str(config),
        "quick": quick,
        "seed": params.bench.seed,
        "train": params.train.model_dump(),
        "train_steps_override": params.bench.steps,
        "eval_rows": {"validation": params.eval.max_rows.validation, "control_validation": params.search.control_rows, "test": params.eval.max_rows.test},
        "search": params.search.model_dump(),
        "vectors": {t: {"path": str(p), "norm": global_norm(taus[t])} for t, p in vec_paths.items()},
        "data": suite.lineage(),
        "timings_s": timings,
        "seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "device": str(suite.policy.device),
        "selection": "λ, gradient-ascent lr/steps chosen on validation only; test scored once per final model",
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    return results
