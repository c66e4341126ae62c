#!/usr/bin/env python
"""Benchmark the λ search's overhead: search wall time vs (evaluations × one evaluation).

Run from the repository root::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_search.py            # MiniLM, sst2 + yelp, 500 rows each
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_search.py --rows 200 --strategy grid
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_search.py --finetuned runs/sst2   # a real task vector

What it does, all in one process:

1. Loads the base model and the tasks' validation splits once
   (:class:`taskvec.suite.Suite`), exactly as ``taskvec search`` does.
2. Builds τ: ``FINETUNED − BASE`` when ``--finetuned`` is given, otherwise
   seeded Gaussian noise with 1 % of each tensor's standard deviation.
3. Measures one evaluation (apply λ in place + score every task) as the
   median of ``--repeats`` evaluations at λ values off the search lattice.
4. Runs the search (addition objective, reference = λ=1 accuracies), timing
   the search loop and, separately, the loop plus writing curve.csv/png/json.
5. Prints both ratios against ``n_evals × one evaluation``; the goal is ≤ 1.1
   (the in-place update and bookkeeping cost almost nothing next to inference).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from taskvec.config import parse_params  # noqa: E402
from taskvec.heads import load_encoder  # noqa: E402
from taskvec.search import CachedEvaluator, addition_objective, search_lambda  # noqa: E402
from taskvec.search_run import write_outputs  # noqa: E402
from taskvec.suite import Suite  # noqa: E402

TASKS = {
    "sst2": {"source": "sst2", "labels": ["negative", "positive"]},
    "yelp": {"source": "yelp", "labels": ["negative", "positive"]},
}


def task_vector(encoder: torch.nn.Module, finetuned: str | None) -> dict[str, torch.Tensor]:
    base = {name: t.float() for name, t in encoder.state_dict().items() if t.is_floating_point()}
    if finetuned:
        tuned, _, _ = load_encoder(finetuned)
        state = tuned.state_dict()
        return {name: state[name].float() - value for name, value in base.items()}
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(t.shape, generator=gen) * (0.01 * float(t.std()) if t.numel() > 1 else 0.0) for name, t in base.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--finetuned", help="fine-tuned model folder: τ = finetuned − base (default: seeded noise)")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--rows", type=int, default=500, help="validation rows per task")
    parser.add_argument("--strategy", choices=["golden", "grid"], default="golden")
    parser.add_argument("--repeats", type=int, default=3, help="evaluations timed for the per-evaluation median")
    args = parser.parse_args()

    params = parse_params(
        {
            "base": args.base,
            "data_dir": args.data_dir,
            "tasks": TASKS,
            "eval": {"max_rows": {"validation": args.rows}},
            "search": {"strategy": args.strategy},
        }
    )
    started = time.perf_counter()
    suite = Suite.load(args.base, list(TASKS), params, splits=(params.search.split,))
    tau = task_vector(suite.encoder, args.finetuned)
    print(f"setup (load model + data + τ): {time.perf_counter() - started:.1f}s  torch threads {torch.get_num_threads()}")

    with suite.editor(tau) as editor:

        def evaluate(lam: float) -> dict[str, float]:
            editor.apply(lam)
            return suite.accuracies()

        reference = evaluate(1.0)  # also warms up
        singles = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            evaluate(0.0123 + 0.1 * i)  # off-lattice λ, so nothing is cached later
            singles.append(time.perf_counter() - t0)
        one = statistics.median(singles)

        objective = addition_objective(list(TASKS), reference)
        t0 = time.perf_counter()
        result = search_lambda(CachedEvaluator(evaluate), objective, params.search)
        loop = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            write_outputs(result, Path(tmp) / "search")
        with_outputs = time.perf_counter() - t0

    n = len(result.evaluations)
    print(f"one evaluation ({len(TASKS)} tasks × {args.rows} rows): median {one:.3f}s of {[round(s, 3) for s in singles]}")
    print(f"search ({result.strategy}): {n} evaluations, best λ {result.best_lambda:.3g}, score {result.best_score:.4f}")
    print(f"search loop {loop:.2f}s vs {n} × {one:.3f}s = {n * one:.2f}s  ->  ratio {loop / (n * one):.3f}")
    print(f"loop + writing outputs {with_outputs:.2f}s  ->  ratio {with_outputs / (n * one):.3f}  (goal ≤ 1.1)")


if __name__ == "__main__":
    main()
