#!/usr/bin/env python
"""Regenerate the paper-experiment results table (negation, addition, analogy).

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/paper_experiments.py \
        [--config benchmarks/experiments.yaml] [--out benchmarks/out/paper] [--quick]

Same as ``taskvec benchmark``. Writes ``results.md``, ``results.json``,
``negation.png``, ``addition.png``, ``analogy.png`` and one λ curve per search
(``curves/*/curve.png``) into ``--out`` and prints the markdown. Fine-tunes and
task vectors are cached under ``<out>/cache`` keyed by base/task/budget, so a
re-run only repeats the searches and evaluations. The logic lives in
:mod:`benchmarks.paper.experiments`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "benchmarks" / "experiments.yaml"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "paper"))
    parser.add_argument("--quick", action="store_true", help="smoke-test budgets (minutes; numbers not meaningful)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from benchmarks.paper.experiments import run_benchmark

    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    run_benchmark(args.config, args.out, quick=args.quick, log=log)
    print((Path(args.out) / "results.md").read_text(), flush=True)
    log(f"wrote {args.out}/results.md, results.json and plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
