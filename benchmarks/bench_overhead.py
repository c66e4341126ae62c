"""Orchestration overhead of the edit pipeline: Prefect + MLflow + DVC as a share of the run's wall time.

Runs ``taskvec run --json`` (the README's main job) in a subprocess on a
*cold* copy of the project (a temporary folder with params.yaml, dvc.yaml,
.dvc/config and the code, git-initialised, nothing computed yet; the
Prefect and MLflow stores start empty too) and measures:

* ``wall``      — the whole command, process start to exit;
* ``compute``   — the critical path of the step entry points themselves
  (max over tasks of fine-tune + extract, then compose, search, evaluate;
  each measured around ``pipeline.<step>.main`` / its subprocess, so a
  step's own imports count as compute, as they would under ``dvc repro``);
* ``mlflow``    — seconds spent in MLflow calls (``pipeline.ops.tracking.LOCK``
  holds, including registering the model);
* ``dvc``       — ``dvc commit`` + ``dvc push`` of the outputs;
* ``prefect``   — the rest: interpreter start-up and imports, the ephemeral
  API server, task scheduling, cache-key hashing of the inputs.

``overhead = wall − compute``; goal ≤ 10 % of ``wall``. A second, warm run
(everything cached) is timed too. Results go to ``benchmarks/out/overhead.json``.

Fresh SQLite stores (the Prefect database of the new Prefect home, the
project's ``mlflow.db``) are seeded from migrated empty copies kept per library
version in ``~/.cache/taskvec`` (``TASKVEC_DB_TEMPLATES``) when those exist,
as for any project on a machine that ran taskvec before; the report says
whether they did. ``--no-db-templates`` measures the first run on a machine
(Alembic migrations of both stores included).

    .venv/bin/python benchmarks/bench_overhead.py            # default params (≈ 15 CPU minutes)
    .venv/bin/python benchmarks/bench_overhead.py --params tests-like.yaml --keep
    .venv/bin/python benchmarks/bench_overhead.py --from-summary run.json --wall 812   # analyse a finished run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def analyse(summary: dict, wall: float) -> dict:
    states = summary.get("states", {})
    steps = summary.get("step_seconds", {})
    ran = {k: v for k, v in steps.items() if states.get(k) == "Completed"}
    chains = [ran.get(f"finetune/{t}", 0.0) + ran.get(f"extract/{t}", 0.0) for t in {k.split("/", 1)[1] for k in steps if "/" in k}]
    compute = (max(chains) if chains else 0.0) + sum(ran.get(k, 0.0) for k in ("compose", "search", "evaluate"))
    register = ran.get("register", 0.0)
    mlflow_s = float(summary.get("mlflow_seconds", 0.0))
    dvc_s = float(summary.get("timings", {}).get("dvc", 0.0))
    overhead = max(0.0, wall - compute)
    prefect_s = max(0.0, overhead - mlflow_s - dvc_s - max(0.0, register - mlflow_s))
    return {
        "wall_s": round(wall, 1),
        "compute_critical_path_s": round(compute, 1),
        "overhead_s": round(overhead, 1),
        "overhead_share": round(overhead / wall, 4) if wall else None,
        "breakdown_s": {"mlflow": round(mlflow_s, 1), "dvc": round(dvc_s, 1), "register_other": round(max(0.0, register - mlflow_s), 1), "prefect_and_startup": round(prefect_s, 1)},
        "steps_s": steps,
        "states": states,
        "goal": "overhead_share <= 0.10",
    }


def cold_project(params: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for d in ("pipeline", "taskvec", "bin"):
        shutil.copytree(REPO / d, dest / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / f, dest / f)
    text = params.read_text()
    data_dir = (params.resolve().parent / "../shared/data").resolve()
    text = text.replace("data_dir: ../shared/data", f"data_dir: {data_dir}")
    (dest / "params.yaml").write_text(text)
    (dest / ".gitignore").write_text("/outputs/\n/mlflow.db\n/mlartifacts/\n/dvc-remote/\n")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(dest / "dvc-remote")], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.email=b@example.com", "-c", "user.name=bench", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.email=b@example.com", "-c", "user.name=bench", "commit", "-qm", "bench"], cwd=dest, check=True)
    return dest


def timed_run(project: Path, env: dict) -> tuple[dict, float]:
    cmd = [str(Path(sys.executable).parent / "taskvec"), "run", "--json", "--params", str(project / "params.yaml")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"taskvec run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = proc.stdout
    return json.loads(out[out.index("{"):]), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--from-summary", type=Path, help="analyse the --json summary of a finished run instead")
    ap.add_argument("--wall", type=float, help="with --from-summary: the run's wall time in seconds")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project")
    ap.add_argument("--no-db-templates", action="store_true", help="no migrated store templates: the first run on a machine")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "overhead.json")
    args = ap.parse_args()
    if args.from_summary:
        summary = json.loads(args.from_summary.read_text())
        report = {"cold": analyse(summary, args.wall or summary.get("seconds", 0.0))}
    else:
        tmp = Path(tempfile.mkdtemp(prefix="taskvec-bench-"))
        env = dict(os.environ, PREFECT_HOME=str(tmp / "prefect-home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.pop("MLFLOW_TRACKING_URI", None)
        if args.no_db_templates:
            env["TASKVEC_DB_TEMPLATES"] = str(tmp / "no-templates")
        templates = Path(env.get("TASKVEC_DB_TEMPLATES") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "taskvec")
        present = sorted(p.name for p in templates.glob("*-empty.db")) if templates.is_dir() else []
        try:
            project = cold_project(args.params, tmp / "project")
            cold, cold_wall = timed_run(project, env)
            warm, warm_wall = timed_run(project, env)
            report = {"cold": analyse(cold, cold_wall), "warm_rerun_wall_s": round(warm_wall, 1), "warm_states": warm.get("states"), "db_templates_at_start": present}
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
    report["cpu_count"] = os.cpu_count()
    report["loadavg_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
