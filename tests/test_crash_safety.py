"""Crash safety: a writer killed with SIGKILL mid-write leaves nothing partial where readers look.

Every artifact is written to a temporary sibling (``.NAME.XXXX.tmp``) and
renamed into place when complete (:func:`taskvec.io.atomic_path`,
:func:`taskvec.io.atomic_dir`). Here a real ``taskvec`` process writing a
~200 MB synthetic model's task vector (``extract``) or edited model folder
(``apply``) is killed while its temporary sibling is growing, then:

* the destination does not exist (or, when it existed before, is byte for
  byte the previous complete version);
* a re-run with the stale temporary sibling still there completes, reaps it, and its
  result is exactly right;
* the re-run cleans up after itself: the only temporary siblings left are the
  ones the killed process left (SIGKILL gives it no chance to remove them;
  they are ignored by readers and by git, see the report on cleanup).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow

TASKVEC = [sys.executable, "-m", "taskvec.cli"]
N_TENSORS, ROWS, COLS = 6, 2048, 4096  # 6 x 32 MiB float32 = 192 MiB per model
SHIFT = 0.25
KILL_AFTER_BYTES = 16 * 1024 * 1024  # the temp file must hold this much before the kill (well inside the data)
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    free = shutil.disk_usage(tmp_path_factory.getbasetemp()).free
    if free < 3 * 1024**3:
        pytest.skip(f"needs ~2 GB of free disk space in the temp folder, {free / 1024**3:.1f} GB free")
    root = tmp_path_factory.mktemp("big")
    gen = torch.Generator().manual_seed(0)
    base = {f"layer.{i}.weight": torch.randn(ROWS, COLS, generator=gen) for i in range(N_TENSORS)}
    base["position_ids"] = torch.arange(16, dtype=torch.int64)
    for name, sd in (("base", base), ("ft", {k: v + SHIFT if v.is_floating_point() else v for k, v in base.items()})):
        (root / name).mkdir()
        save_file(sd, root / name / "model.safetensors")
        (root / name / "config.json").write_text('{"model_type": "synthetic"}\n')
    del base
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def big_vector(big_models):
    from taskvec import engine

    return engine.extract(big_models / "base", big_models / "ft", big_models / "v.safetensors").path


def _siblings(dest: Path) -> list[Path]:
    return sorted(dest.parent.glob(f".{dest.name}.*"))


def _grown(dest: Path) -> Path | None:
    """The temporary sibling being written, once it holds KILL_AFTER_BYTES (file, or the weights in a folder)."""
    for tmp in _siblings(dest):
        if not tmp.name.endswith(".tmp"):
            continue
        files = [tmp] if tmp.is_file() else list(tmp.glob("*.safetensors"))
        try:
            if sum(f.stat().st_size for f in files) >= KILL_AFTER_BYTES:
                return tmp
        except FileNotFoundError:
            continue
    return None


def _kill_mid_write(args: list[str], dest: Path) -> Path:
    """Start ``taskvec ARGS``, SIGKILL it once its temporary sibling is growing; return that sibling."""
    proc = subprocess.Popen(TASKVEC + args + ["-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    try:
        while (tmp := _grown(dest)) is None:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the writer finished (rc {proc.returncode}) before it could be killed mid-write: {err.decode()[-500:]}")
            if time.monotonic() > deadline:
                pytest.fail("no temporary sibling appeared")
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the writer was not killed mid-write (it had already exited)"
    return tmp


def _run(args: list[str]) -> None:
    proc = subprocess.run(TASKVEC + args + ["-q"], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr


def test_killed_extract_leaves_no_vector_and_rerun_completes(big_models, tmp_path):
    base, ft = big_models / "base", big_models / "ft"
    dest = tmp_path / "v.safetensors"
    args = ["extract", str(base), str(ft), "-o", str(dest)]

    stale = _kill_mid_write(args, dest)
    assert not dest.exists(), "a partial task vector is visible at the destination"
    assert stale.exists() and stale.stat().st_size < N_TENSORS * ROWS * COLS * 4, "the temp file should be partial"

    _run(args)  # the stale temporary sibling is still there
    tau = load_file(dest)
    b, f = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors")
    assert sorted(tau) == sorted(k for k, v in b.items() if v.is_floating_point())
    for name, t in tau.items():
        assert torch.equal(t, f[name] - b[name]), name
    assert _siblings(dest) == [], "the re-run must reap the dead writer's temp sibling and leave none of its own"


def test_killed_apply_leaves_no_folder_and_rerun_completes(big_models, big_vector, tmp_path):
    base, vec = big_models / "base", big_vector
    dest = tmp_path / "edited"
    args = ["apply", str(base), f"{vec}:0.5", "-o", str(dest)]

    stale = _kill_mid_write(args, dest)
    assert not dest.exists(), "a partial model folder is visible at the destination"
    assert stale.is_dir()

    _run(args)
    out, b, tau = load_file(dest / "model.safetensors"), load_file(base / "model.safetensors"), load_file(vec)
    assert torch.equal(out["position_ids"], b["position_ids"])
    for name, t in tau.items():
        assert torch.equal(out[name], b[name] + 0.5 * t), name
    assert (dest / "taskvec.json").is_file() and (dest / "config.json").is_file()
    assert _siblings(dest) == [], "the re-run must reap the dead writer's temp sibling and leave none of its own"


def test_killed_overwrite_keeps_the_previous_complete_folder(big_models, big_vector, tmp_path):
    """Re-applying onto an existing output: a kill mid-write leaves the old version intact."""
    base, vec = big_models / "base", big_vector
    dest = tmp_path / "edited"
    _run(["apply", str(base), f"{vec}:0.5", "-o", str(dest)])
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in dest.iterdir()}
    ledger = (dest / "taskvec.json").read_text()

    _kill_mid_write(["apply", str(base), f"{vec}:1", "-o", str(dest)], dest)
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in dest.iterdir()} == before
    assert (dest / "taskvec.json").read_text() == ledger
