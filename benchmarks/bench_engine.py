#!/usr/bin/env python
"""The streaming engine against the I/O floor and mergekit 0.1.5, as a scaling curve.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_engine                       # 0.3, 1, 3, 6 GB float32 + 1 GB bf16/fp16
    .venv/bin/python -m benchmarks.bench_engine --sizes 0.3 1 --half 1 --repeats 3
    .venv/bin/python -m benchmarks.bench_engine --quick               # 0.1 GB smoke check
    .venv/bin/python -m benchmarks.bench_engine --sizes --half 3 --big-repeats 3 --paths --no-mergekit   # steadier floor

For every case (a model size and dtype):

1. Builds a synthetic Llama base and two fine-tuned copies under ``--root``
   (default ``/tmp/taskvec-bench``; deleted after the case unless ``--keep``)
   with :mod:`benchmarks.models`.
2. Runs, each in its own fresh process, interleaved over ``--repeats``: the
   **floor** (``python -c 'import taskvec.engine, torch'`` + read the three
   inputs sequentially + write one model-sized output: no arithmetic, no
   hashing), the **lean floor** (the same, exiting as the taskvec CLI does:
   every object frozen first, so no shutdown collection over torch's
   objects), the **baseline** (the import alone, for RSS), ``taskvec merge
   base ft1:1 ft2:1`` and ``mergekit-yaml`` (``task_arithmetic``, weights 1,
   in ``.bench-venv``: CPU torch of our version, then ``mergekit==0.1.5``).
   Then once each: ``extract``, ``apply`` of two vectors, ``combine
   --method ties``, ``merge --method ties --density 0.2`` and ``merge
   --method dare --drop 0.5`` (memory of every streaming path).
3. Before every run the inputs are read once (warm page cache where it
   fits) and dirty pages are flushed (``sync``). Wall time is
   ``perf_counter`` around the child; peak RSS is that child's ``ru_maxrss``
   from ``os.wait4`` (launched by a stdlib-only launcher, so the parent's
   pages do not count). A case is **disk-bound** when its inputs plus one
   output exceed the memory available at its start: reads then come from
   the disk and writes are throttled to its speed, for every tool alike.
4. Checks taskvec merge against mergekit (max |Δ|) and prints/writes the
   curve to ``benchmarks/out/engine.md`` / ``engine.json`` (``engine-quick.*``
   with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (make bench): the repository root holds the benchmarks package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.models import build_models, compare  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
BENCH_VENV = ROOT / ".bench-venv"
MERGEKIT_VERSION = "0.1.5"  # resolves with torch 2.13.0 + transformers 5.x, pulls no CUDA wheels
BASELINE_SNIPPET = "import taskvec.engine, torch"
MB = 10**6
PATHS = ("extract", "apply", "combine-ties", "merge-ties", "merge-dare")
MIB = 2**20
SLACK = 300 * MB  # the "+ 300 MB"; decimal MB, the stricter reading

# the floor: the baseline's imports, then read the inputs and write one output, 64 MiB at a time,
# then a normal interpreter exit (the floor). The lean floor is the same work exiting as the
# taskvec CLI does, every object frozen first (gc.freeze at exit), so the interpreter's shutdown
# collection over torch's objects (0.2-0.5 s) is in neither: the stricter comparison.
FLOOR_SNIPPET = r"""
import gc, os, sys, taskvec.engine, torch
out, lean, inputs = sys.argv[1], sys.argv[2] == "lean", sys.argv[3:]
buf = bytearray(64 << 20)
for path in inputs:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
view, left = memoryview(buf), os.path.getsize(inputs[0])
with open(out, "wb", buffering=0) as f:
    while left:
        left -= f.write(view[: min(left, len(buf))])
if lean:
    gc.freeze()
"""

# ---------------------------------------------------------------------------
# mergekit environment


def _venv_python() -> Path:
    return BENCH_VENV / "bin" / "python"


def ensure_mergekit() -> dict:
    """Create ``.bench-venv`` with CPU torch (same version as ours) and mergekit, if missing."""
    import torch

    torch_version = torch.__version__.split("+")[0]
    py = _venv_python()
    exe = BENCH_VENV / "bin" / "mergekit-yaml"
    if not exe.is_file():
        print(f"setting up mergekit in {BENCH_VENV.relative_to(ROOT)} (torch=={torch_version} first, then mergekit=={MERGEKIT_VERSION}) ...", flush=True)
        if not py.is_file():
            # sys.executable may itself be a venv's python; venv resolves the base interpreter
            subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        # torch first and pinned: a bare `torch` requirement would pull the CUDA build (GBs)
        subprocess.run([*pip, f"torch=={torch_version}"], check=True)
        constraints = BENCH_VENV / "constraints.txt"
        constraints.write_text(f"torch=={torch_version}\n")
        subprocess.run([*pip, "-c", str(constraints), f"mergekit=={MERGEKIT_VERSION}"], check=True)
    probe = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({p: m.version(p) for p in ('mergekit','torch','transformers','safetensors','accelerate','numpy')}))"
    )
    versions = json.loads(subprocess.run([str(py), "-c", probe], check=True, capture_output=True, text=True).stdout)
    cuda = subprocess.run([str(py), "-m", "pip", "list", "--disable-pip-version-check"], capture_output=True, text=True).stdout
    if "nvidia-" in cuda:
        print("warning: CUDA packages found in .bench-venv (torch was not installed CPU-only first)", file=sys.stderr)
    return versions


# ---------------------------------------------------------------------------
# Measurement


def warm(paths: list[Path]) -> None:
    """Read inputs once so every run starts from a warm page cache (where it fits); flush dirty pages."""
    buf = bytearray(64 * MIB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    os.sync()


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# The child's ru_maxrss includes whatever the process that exec'd it had mapped
# before exec (Linux carries the old mm's high-water mark across exec, and
# subprocess uses vfork): launched straight from this orchestrator, which has
# imported torch and transformers, every child would "peak" at ≥ 450 MiB. So
# each child is launched by a tiny stdlib-only launcher (python -I -S, ~10 MiB)
# that times it and reads its rusage with os.wait4.
_LAUNCHER = r"""
import json, os, subprocess, sys, time
cmd, log = json.loads(sys.argv[1]), sys.argv[2]
with open(log, "wb") as out:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
proc.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps({"rc": proc.returncode, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss": ru.ru_maxrss * 1024}))
"""


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def run_child(cmd: list[str], env: dict | None = None, cleanup: list[Path] = ()) -> dict:
    """Run ``cmd`` in a fresh process: wall seconds, CPU seconds and that child's peak RSS (bytes)."""
    for p in cleanup:
        _remove(p)
    os.sync()
    log = OUT / "last-child.log"
    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cmd), str(log)]
    done = subprocess.run(launcher, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"launcher failed: {done.stderr[-2000:]}")
    res = json.loads(done.stdout)  # Linux: ru_maxrss is in KiB, converted above
    if res.pop("rc") != 0:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return res


def _taskvec_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "taskvec"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "taskvec.cli"]


# ---------------------------------------------------------------------------
# One case


def run_case(size_gb: float, dtype: str, repeats: int, root: Path, keep: bool, check: bool, paths: tuple[str, ...] = PATHS, mergekit: bool = True) -> dict:
    case_root = root / f"{dtype}-{size_gb:g}gb"
    model = build_models(case_root, size_gb, dtype)
    dirs = model.pop("dirs")
    runs = case_root / "runs"
    runs.mkdir(exist_ok=True)
    env = {**os.environ, "TASKVEC_CACHE_DIR": str(runs / "hash-cache"), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    tv = _taskvec_cmd()
    v1, v2, vt = runs / "v1.safetensors", runs / "v2.safetensors", runs / "vt.safetensors"
    mk_cfg = runs / "mergekit.yml"
    mk_cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {dirs['base']}\nmodels:\n"
        f"  - model: {dirs['ft1']}\n    parameters:\n      weight: 1.0\n"
        f"  - model: {dirs['ft2']}\n    parameters:\n      weight: 1.0\n"
        f"dtype: {dtype}\n"
    )
    out_mk, out_tv, out_tt, out_x = runs / "merged-mergekit", runs / "merged-taskvec", runs / "merged-torch-path", runs / "other"
    inputs = [dirs[k] / "model.safetensors" for k in ("base", "ft1", "ft2")]
    merge = [*tv, "merge", str(dirs["base"]), f"{dirs['ft1']}:1", f"{dirs['ft2']}:1", "-q"]
    core = {
        "baseline": [sys.executable, "-c", BASELINE_SNIPPET],
        "floor": [sys.executable, "-c", FLOOR_SNIPPET, str(runs / "floor.out"), "plain", *map(str, inputs)],
        "lean floor": [sys.executable, "-c", FLOOR_SNIPPET, str(runs / "floor.out"), "lean", *map(str, inputs)],
        "taskvec merge": [*merge, "-o", str(out_tv)],
        "torch path": [*merge, "-o", str(out_tt)],  # the same command without the fused kernel (TASKVEC_KERNELS=0)
        "mergekit": [str(BENCH_VENV / "bin" / "mergekit-yaml"), str(mk_cfg), str(out_mk), "--no-cuda", "--lazy-unpickle", "--no-copy-tokenizer", "--quiet"],
    }
    if not mergekit:  # --no-mergekit: its 13-20 GB of RSS evicts the page cache the next run starts from
        del core["mergekit"]
        check = False
    others = {
        "extract": [*tv, "extract", str(dirs["base"]), str(dirs["ft1"]), "-o", str(v1), "-q"],
        "apply": [*tv, "apply", str(dirs["base"]), str(v1), str(v2), "-o", str(out_x), "-q"],
        "combine ties": [*tv, "combine", f"{v1}:1", f"{v2}:1", "--method", "ties", "--density", "0.2", "-o", str(vt), "-q"],
        "merge ties": [*merge, "--method", "ties", "--density", "0.2", "-o", str(out_x)],
        "merge dare": [*merge, "--method", "dare", "--drop", "0.5", "--seed", "1", "-o", str(out_x)],
    }
    envs = {"torch path": {**env, "TASKVEC_KERNELS": "0"}}
    cleanup = {"floor": [runs / "floor.out"], "lean floor": [runs / "floor.out"], "taskvec merge": [out_tv], "torch path": [out_tt], "mergekit": [out_mk], "extract": [v1], "apply": [out_x], "combine ties": [vt], "merge ties": [out_x], "merge dare": [out_x]}
    working_set = 4 * model["bytes_per_model"]
    available = mem_available()
    disk_bound = working_set > available
    print(f"case {dtype} {model['bytes_per_model'] / 1e9:.2f} GB: inputs + output {working_set / 1e9:.1f} GB, memory available {available / 1e9:.1f} GB{' → disk-bound' if disk_bound else ''}", flush=True)
    print("  preparing v2 (untimed; also caches the base's content hash) ...", flush=True)
    run_child([*tv, "extract", str(dirs["base"]), str(dirs["ft2"]), "-o", str(v2), "-q"], env, [v2])
    samples: dict[str, list[dict]] = {k: [] for k in [*core, *others]}
    load_before = os.getloadavg()[0]
    keys = list(core)
    for i in range(repeats):
        # rotate the order each repeat: on this VM a run's I/O can take 2.5x longer depending on
        # what ran just before it (page-cache reclaim, the file system's discard of deleted outputs),
        # so no command may always follow the same one
        for key in keys[i % len(keys):] + keys[: i % len(keys)]:
            cmd = core[key]
            warm(inputs)
            s = run_child(cmd, envs.get(key, env), cleanup.get(key, []))
            samples[key].append(s)
            print(f"  [{i + 1}/{repeats}] {key:<14} {s['wall_s']:7.2f} s  {s['maxrss'] / MIB:8,.0f} MiB", flush=True)
    diff = compare(out_tv, out_mk)["max_abs_diff"] if check else None
    torch_diff = compare(out_tv, out_tt)["max_abs_diff"]  # the kernel's bits are the torch path's: 0
    if torch_diff != 0:
        raise SystemExit(f"taskvec merge with and without the fused kernel differ by {torch_diff} ({dtype} {size_gb} GB)")
    for p in (out_tv, out_tt, out_mk, runs / "floor.out"):
        _remove(p)
    for key, cmd in ((k, c) for k, c in others.items() if k.replace(" ", "-") in paths):
        warm(inputs if key != "combine ties" else [v1, v2])
        s = run_child(cmd, env, cleanup.get(key, []))
        samples[key].append(s)
        print(f"  [once] {key:<14} {s['wall_s']:7.2f} s  {s['maxrss'] / MIB:8,.0f} MiB", flush=True)
        if key in ("apply", "merge ties", "merge dare", "combine ties"):
            _remove(out_x if key != "combine ties" else vt)
    median = {k: {f: statistics.median(x[f] for x in v) for f in ("wall_s", "cpu_s", "maxrss")} for k, v in samples.items() if v}
    base_rss = median["baseline"]["maxrss"]
    bound = 2 * model["largest_tensor"]["bytes"] + SLACK
    res = {
        "size_gb": size_gb,
        "dtype": dtype,
        "model": model,
        "repeats": repeats,
        "disk_bound": disk_bound,
        "working_set": working_set,
        "mem_available": available,
        "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "samples": samples,
        "median": median,
        "bound": bound,
        "above_baseline": {k: v["maxrss"] - base_rss for k, v in median.items() if k not in ("baseline", "floor", "lean floor", "mergekit")},
        "ratios": {
            "floor": median["taskvec merge"]["wall_s"] / median["floor"]["wall_s"],
            "lean_floor": median["taskvec merge"]["wall_s"] / median["lean floor"]["wall_s"],
            "torch_path": median["taskvec merge"]["wall_s"] / median["torch path"]["wall_s"],
            "torch_path_floor": median["torch path"]["wall_s"] / median["floor"]["wall_s"],
            "mergekit": median["taskvec merge"]["wall_s"] / median["mergekit"]["wall_s"] if mergekit else None,
            "mergekit_paired": statistics.median(t["wall_s"] / m["wall_s"] for t, m in zip(samples["taskvec merge"], samples["mergekit"])) if mergekit else None,
        },
        "max_abs_diff_vs_mergekit": diff,
        "max_abs_diff_vs_torch_path": torch_diff,
    }
    if not keep:
        shutil.rmtree(case_root, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------
# Report


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f}"


def _s(sample: dict | None) -> str:
    return "—" if sample is None else f"{sample['wall_s']:.2f} s"


def _x(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}×"


def _case(r: dict) -> str:
    return f"| {r['model']['bytes_per_model'] / 1e9:.2f} GB | {r['dtype']} |"


def render(results: list[dict], meta: dict) -> str:
    results = sorted(results, key=lambda r: (r["model"]["bytes_per_model"] * {"float32": 1}.get(r["dtype"], 2), r["dtype"]))
    lines = [
        f"# taskvec engine benchmark{' (quick)' if meta['quick'] else ''}",
        "",
        f"{meta['host']}. Synthetic Llama models (base + two fine-tuned copies); task-arithmetic merge, weights 1. "
        "Floor = interpreter with torch + reading the three inputs + writing one model-sized output; "
        "lean floor = the same, exiting as the taskvec CLI does (objects frozen first, no shutdown collection). "
        "Wall = median over the repeats; RSS above baseline = peak RSS minus that of `python -c 'import taskvec.engine, torch'`. "
        "Bound = 2 × largest tensor (stored bytes) + 300 MB. "
        f"Torch path = the same `taskvec merge` with `TASKVEC_KERNELS=0` (no fused kernel; bit-identical output, checked){'' if meta.get('kernel', True) else ' — the kernel was NOT built, so both rows ran the torch path'}.",
        "",
        "| model | dtype | largest tensor | floor | lean floor | taskvec merge | torch path | mergekit 0.1.5 | taskvec ÷ floor | taskvec ÷ lean floor | torch path ÷ floor | taskvec ÷ mergekit | taskvec RSS above baseline | bound | mergekit RSS | max \\|Δ\\| vs mergekit | page cache |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        m, model = r["median"], r["model"]
        diff = "—" if r["max_abs_diff_vs_mergekit"] is None else f"{r['max_abs_diff_vs_mergekit']:.3g}"
        lines.append(
            f"{_case(r)} {model['largest_tensor']['bytes'] / MIB:,.1f} MiB | {m['floor']['wall_s']:.2f} s | {_s(m.get('lean floor'))} | "
            f"{m['taskvec merge']['wall_s']:.2f} s | {_s(m.get('torch path'))} | {_s(m.get('mergekit'))} | {r['ratios']['floor']:.2f}× | {_x(r['ratios'].get('lean_floor'))} | "
            f"{_x(r['ratios'].get('torch_path_floor'))} | {_x(r['ratios']['mergekit'])} | "
            f"{_mib(r['above_baseline']['taskvec merge'])} MiB | {_mib(r['bound'])} MiB | {_mib(m['mergekit']['maxrss']) + ' MiB' if 'mergekit' in m else '—'} | {diff} | "
            f"{'**disk-bound**' if r['disk_bound'] else 'warm'} |"
        )
    lines += [
        "",
        "Other streaming paths (one run each): wall, and peak RSS above the baseline.",
        "",
        "| model | dtype | extract | apply (2 vectors) | combine ties | merge ties k=0.2 | merge dare p=0.5 | max RSS above baseline | within bound |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        m, above = r["median"], r["above_baseline"]
        keys = ("extract", "apply", "combine ties", "merge ties", "merge dare")
        if not any(k in m for k in keys):
            continue
        worst = max(above.values())
        lines.append(
            f"{_case(r)} "
            + " | ".join(f"{m[k]['wall_s']:.2f} s / {_mib(above[k])} MiB" if k in m else "—" for k in keys)
            + f" | {_mib(worst)} MiB | {'yes' if worst <= r['bound'] else 'NO'} |"
        )
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="*", default=None, help="float32 model sizes in GB (default 0.3 1 3 6)")
    ap.add_argument("--half", type=float, nargs="*", default=None, help="sizes in GB for the bfloat16 and float16 cases (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of floor/merge/mergekit per case, medians reported (cases under 3 GB)")
    ap.add_argument("--big-repeats", type=int, default=1, help="the same for cases of 3 GB and more (default 1: each run moves 12-24 GB)")
    ap.add_argument("--root", type=Path, default=Path("/tmp/taskvec-bench"), help="where models are built (deleted after each case)")
    ap.add_argument("--keep", action="store_true", help="keep the models and outputs")
    ap.add_argument("--no-check", action="store_true", help="skip the taskvec-vs-mergekit comparison")
    ap.add_argument("--no-mergekit", action="store_true", help="leave mergekit out (its 13-20 GB of RSS evicts the page cache: the floor is steadier without it)")
    ap.add_argument("--quick", action="store_true", help="one 0.1 GB float32 case, one repeat")
    ap.add_argument("--paths", nargs="*", choices=PATHS, default=list(PATHS), help="the other paths to run once per case")
    ap.add_argument("--paths-max-gb", type=float, default=None, help="run the other paths only for cases up to this size")
    ap.add_argument("--append", action="store_true", help="add these cases to the results already in benchmarks/out/engine.json")
    args = ap.parse_args(argv)
    sizes = [0.1] if args.quick else (args.sizes if args.sizes is not None else [0.3, 1, 3, 6])
    half = [] if args.quick else (args.half if args.half is not None else [1])
    cases = sorted([(s, "float32") for s in sizes] + [(s, d) for s in half for d in ("bfloat16", "float16")], key=lambda c: c[0])

    OUT.mkdir(parents=True, exist_ok=True)
    import safetensors
    import torch
    import transformers

    import taskvec

    versions = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "safetensors": safetensors.__version__, "taskvec": getattr(taskvec, "__version__", "?"),
        **({} if args.no_mergekit else {f"mergekit venv: {k}": v for k, v in ensure_mergekit().items()}),
    }
    from taskvec import kernels

    meta = {"kernel": kernels.built(), "quick": args.quick, "host": f"{platform.machine()}, {os.cpu_count()} CPU cores, {mem_available() / 1e9:.0f} GB memory available, {platform.system()} {platform.release()}", "versions": versions}
    stem = "engine-quick" if args.quick else "engine"
    results = json.loads((OUT / f"{stem}.json").read_text())["results"] if args.append and (OUT / f"{stem}.json").is_file() else []
    for size, dtype in cases:
        t0 = time.perf_counter()
        paths = tuple(args.paths) if args.paths_max_gb is None or size <= args.paths_max_gb else ()
        results.append(run_case(size, dtype, args.big_repeats if size >= 3 else args.repeats, args.root, args.keep, not args.no_check, paths, mergekit=not args.no_mergekit))
        print(f"  case done in {time.perf_counter() - t0:.0f} s", flush=True)
        table = render(results, meta)
        (OUT / f"{stem}.md").write_text(table)
        (OUT / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n")
    print()
    print(table)
    print(f"wrote {(OUT / f'{stem}.md').relative_to(ROOT)} and {stem}.json")
    ok = all(max(r["above_baseline"].values()) <= r["bound"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
