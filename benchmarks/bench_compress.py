#!/usr/bin/env python
"""What ``register.compress`` costs in accuracy, on real task vectors: size and accuracy per compression spec.

Run from the repository root after ``make run`` (it reads the pipeline's
task vectors, ``outputs/vectors/<task>.safetensors``)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_compress.py            # every vector, 500 test rows
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_compress.py --rows 0   # whole test sets

For each vector τ of task T and each spec (exact float32; bfloat16; top-10 %,
top-3 % and top-1 % by magnitude in bfloat16 — ``taskvec compress``, the
code the registry uses), it builds base + λ·τ̂ (λ = 1: the fine-tune the
vector came from) and scores T's test split with the pipeline's own suite
(frozen zero-shot heads, params.yaml's eval settings). Prints the stored
size relative to the exact vector, the relative L2 error ‖τ − τ̂‖/‖τ‖, and
the accuracy difference to the exact vector (same rows, so paired). Results
in ``benchmarks/out/compress.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPECS = {  # name: (dtype, density)
    "exact": None,
    "bf16": ("bfloat16", None),
    "top10-bf16": ("bfloat16", 0.1),
    "top3-bf16": ("bfloat16", 0.03),
    "top1-bf16": ("bfloat16", 0.01),
}


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--vectors", nargs="*", type=Path, help="task vectors named <task>.safetensors (default: outputs/vectors/*)")
    ap.add_argument("--rows", type=int, default=500, help="test rows per task (0: all)")
    ap.add_argument("--lam", type=float, default=1.0)
    args = ap.parse_args(argv)

    import torch

    from pipeline import params as P
    from taskvec.compress import compress
    from taskvec.engine import apply
    from taskvec.suite import Suite

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    p = P.load(args.params)
    vectors = args.vectors or sorted((ROOT / P.OUTPUTS / "vectors").glob("*.safetensors"))
    if not vectors:
        raise SystemExit("no task vectors: run `make run` first, or give --vectors")
    tasks = [v.stem for v in vectors]
    started = time.perf_counter()
    suite = Suite.load(p.base, tasks, p, splits=("test",), max_rows={"test": args.rows or None})
    res: dict = {"lambda": args.lam, "rows": args.rows, "loadavg": os.getloadavg(), "vectors": {}}
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        tmp = Path(tmp)
        for vec, task in zip(vectors, tasks):
            rows = {}
            for name, spec in SPECS.items():
                stored, stats = vec, {"relative_l2_error": 0.0, "output_bytes": vec.stat().st_size}
                if spec is not None:
                    stored = tmp / f"{task}-{name}.safetensors"
                    stats = compress(vec, stored, dtype=getattr(torch, spec[0]), density=spec[1])
                model = tmp / f"{task}-{name}"
                apply(p.base, [(stored, args.lam)], model)
                acc = suite.score_model(model, "test", [task])[task]
                rows[name] = {"bytes": stats["output_bytes"], "size": stats["output_bytes"] / vec.stat().st_size, "relative_l2_error": stats["relative_l2_error"], "accuracy": acc}
                print(f"[{time.perf_counter() - started:5.0f}s] {task} {name}: accuracy {acc:.4f}", file=sys.stderr, flush=True)
            res["vectors"][task] = rows
    print(f"λ = {args.lam:g}; {args.rows or 'all'} test rows per task; load average {res['loadavg'][0]:.1f}")
    print("| vector | stored as | size / exact | ‖τ − τ̂‖ / ‖τ‖ | test accuracy | Δ vs exact (points) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for task, rows in res["vectors"].items():
        for name, r in rows.items():
            print(f"| {task} | {name} | {r['size']:.3f} | {r['relative_l2_error']:.3f} | {100 * r['accuracy']:.1f} | {100 * (r['accuracy'] - rows['exact']['accuracy']):+.1f} |")
    out = ROOT / "benchmarks" / "out" / "compress.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
