"""Fixed cost per command: the wall time of ``taskvec`` commands that do (almost) no work.

Every row is the median of ``--repeat`` runs of a fresh process (the
``taskvec`` console entry point, ``pipeline.cli:main``), measured in the same
run as two baselines: the bare interpreter (``python -c pass``) and the
interpreter plus ``import torch``. Commands with no tensor math (``--help``,
``inspect --header``, ``lineage``) should cost about the interpreter plus the
CLI; ``inspect`` without ``--header`` computes norms and pays the torch
import, shown for comparison. ``lineage`` reads a registered version from a
fresh SQLite MLflow store (its cost includes importing MLflow).

    .venv/bin/python benchmarks/bench_startup.py              # 5 runs each
    .venv/bin/python benchmarks/bench_startup.py --repeat 9 --json benchmarks/out/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ENTRY = "import sys\nsys.argv = ['taskvec'] + sys.argv[1:]\nfrom pipeline.cli import main\nmain()\n"


def wall(argv: list[str], env: dict, repeat: int) -> float:
    """Median wall seconds of ``argv`` (each run must exit 0)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return statistics.median(times)


def fixtures(root: Path) -> tuple[Path, str]:
    """A tiny task vector and a SQLite MLflow store with one registered version (model ``m``)."""
    from mlflow import MlflowClient

    from taskvec.engine import extract
    from tests.conftest import make_tiny_bert, perturb

    base = make_tiny_bert(root / "base")
    vector = extract(base, perturb(base, root / "ft", seed=1), root / "v.safetensors", progress=False).path
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    ledger = {"base_model": str(base), "base_hash": "0" * 64, "output_hash": "0" * 64, "edits": []}
    client.create_model_version("m", source=str(root), tags={"taskvec.ledger": json.dumps(ledger)})
    return vector, uri


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, help="Also write the rows here.")
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="taskvec-startup-") as tmp:
        vector, uri = fixtures(Path(tmp))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": uri}
        taskvec = [py, "-c", ENTRY]
        rows = [
            ("python -c pass (baseline)", [py, "-c", "pass"]),
            ("python -c 'import torch' (baseline)", [py, "-c", "import torch"]),
            ("taskvec --help", [*taskvec, "--help"]),
            ("taskvec extract --help", [*taskvec, "extract", "--help"]),
            ("taskvec run --help", [*taskvec, "run", "--help"]),
            ("taskvec inspect --header V", [*taskvec, "inspect", "--header", str(vector)]),
            ("taskvec lineage m 1", [*taskvec, "lineage", "m", "1", "--params", str(REPO / "params.yaml")]),
            ("taskvec inspect V (tensor math)", [*taskvec, "inspect", str(vector)]),
        ]
        results = [(name, wall(argv, env, args.repeat)) for name, argv in rows]
    bare = results[0][1]
    print(f"fixed cost per command (median of {args.repeat} fresh processes; {sys.version.split()[0]}, {os.cpu_count()} CPUs)\n")
    print("| command | wall | − interpreter | × interpreter |")
    print("| --- | ---: | ---: | ---: |")
    for name, s in results:
        print(f"| `{name}` | {s:.2f} s | {s - bare:+.2f} s | {s / bare:.1f}× |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"repeat": args.repeat, "rows": [{"command": n, "wall_s": s} for n, s in results]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
