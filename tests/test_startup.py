"""Commands that do no tensor math never import torch: ``--help`` of every command, ``inspect --header``, ``lineage``.

Each command runs in a fresh interpreter (the real ``taskvec`` entry point,
``pipeline.cli:main``) that reports, as it exits, which heavy modules it
loaded. ``inspect`` without ``--header`` computes norms and must load torch:
the control showing the probe sees an import when there is one. The fixed
cost of each command is measured by ``benchmarks/bench_startup.py``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "datasets", "prefect")
PROBE = (
    "import atexit, gc, sys\n"
    # registered before main(), so it runs after the CLI's own exit handlers (last in, first out)
    f"atexit.register(lambda: print('\\nfrozen:', gc.get_freeze_count(), '\\nloaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr))\n"
    "sys.argv = ['taskvec'] + sys.argv[1:]\n"
    "from pipeline.cli import main\n"
    "main()\n"
)


def taskvec(*args, env: dict | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``taskvec ARGS``; return the process and the heavy modules it imported."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)
    assert "\nloaded:" in proc.stderr, proc.stderr
    return proc, set(filter(None, proc.stderr.rsplit("\nloaded:", 1)[1].strip().split(",")))


@pytest.fixture(scope="module")
def vector(tmp_path_factory) -> Path:
    from taskvec.engine import extract
    from tests.conftest import make_tiny_bert, perturb

    root = tmp_path_factory.mktemp("startup")
    base = make_tiny_bert(root / "base")
    return extract(base, perturb(base, root / "ft", seed=1), root / "v.safetensors", progress=False).path


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        *[[cmd, "--help"] for cmd in ("extract", "combine", "apply", "merge", "compress", "inspect", "finetune", "evaluate", "search")],
        *[[cmd, "--help"] for cmd in ("run", "lineage", "reproduce", "promote", "approve", "rollback", "benchmark")],
        ["audit", "verify", "--help"],
    ],
    ids=" ".join,
)
def test_help_imports_no_torch(argv):
    proc, loaded = taskvec(*argv)
    assert proc.returncode == 0 and "Usage: taskvec" in proc.stdout, proc.stderr
    assert not loaded, f"taskvec {' '.join(argv)} imported {sorted(loaded)}"


def test_inspect_header_reads_no_tensor_and_imports_no_torch(vector):
    from taskvec.vector import VectorFile

    proc, loaded = taskvec("inspect", "--header", "--json", vector)
    assert proc.returncode == 0, proc.stderr
    with VectorFile(vector) as vf:
        assert json.loads(proc.stdout) == [vf.describe()]
    assert not loaded, loaded
    proc, loaded = taskvec("inspect", "--header", vector)
    assert proc.returncode == 0 and f"{len(vf.names)} tensors, {vf.param_count:,} parameters" in proc.stdout and not loaded
    # a corrupt header is still refused in one line, and still without torch
    bad = vector.with_name("bad.safetensors")
    bad.write_bytes(vector.read_bytes()[:-1])
    proc, loaded = taskvec("inspect", "--header", bad)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "truncated" in proc.stderr and not loaded


def test_inspect_statistics_do_import_torch(vector):
    """The control: the probe reports an import when a command does tensor math."""
    proc, loaded = taskvec("inspect", vector)
    assert proc.returncode == 0, proc.stderr
    assert "torch" in loaded and "‖τ‖" in proc.stdout


def test_exit_skips_the_shutdown_collection_over_torch(vector):
    """The CLI freezes every object at exit, so the interpreter's final collection does not walk torch's objects."""
    proc, loaded = taskvec("inspect", vector)
    assert proc.returncode == 0 and "torch" in loaded, proc.stderr
    frozen = int(proc.stderr.rsplit("\nfrozen:", 1)[1].split()[0])
    assert frozen > 50_000, frozen  # torch alone leaves ~10^5 tracked objects
    # in process nothing is frozen while the command runs: only the exit handler does it
    from pipeline.cli import main

    assert gc.get_freeze_count() == 0
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--header", str(vector)])
    assert exc.value.code == 0 and gc.get_freeze_count() == 0


def test_lineage_imports_no_torch(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    ledger = {"base_model": "tiny", "base_hash": "b" * 64, "output_hash": "o" * 64, "edits": [{"vector_sha256": "v" * 64, "lambda": 0.5, "method": "sum"}]}
    client.create_model_version("m", source=str(tmp_path), tags={"taskvec.ledger": json.dumps(ledger)})
    proc, loaded = taskvec("lineage", "m", "1", "--params", REPO / "params.yaml", env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("m version 1") and "λ=+0.5  method=sum" in proc.stdout, proc.stdout
    assert not loaded, loaded
