#!/usr/bin/env python
"""Benchmark the streaming engine against mergekit's ``task_arithmetic``.

Run from the repository root::

    .venv/bin/python benchmarks/bench_engine.py            # 1 GiB (1.085 GB) float32 model
    .venv/bin/python benchmarks/bench_engine.py --quick    # ~100 MB smoke check
    .venv/bin/python benchmarks/bench_engine.py --size-gb 2 --repeats 3

What it does:

1. Builds (once; cached under ``benchmarks/out/``, git-ignored) a synthetic
   Llama-architecture model (``transformers.LlamaConfig``; tensor names and
   shapes taken from a ``LlamaForCausalLM`` instantiated on the meta device)
   in float32 plus two fine-tuned copies (base + small seeded noise on every
   floating tensor). The three checkpoints are written side by side, tensor by
   tensor, so building holds a handful of tensors, never a model.
2. Sets up mergekit in a separate virtual environment ``.bench-venv`` (also
   git-ignored) if missing: ``torch==<this torch>`` first — the local CPU
   wheel, never the CUDA build — then ``mergekit==MERGEKIT_VERSION``.
3. Runs every command in its own fresh child process, with a warm page cache
   (all inputs read once before each run, dirty pages flushed with ``sync``),
   timing it with ``time.perf_counter`` and taking the child's peak resident
   set size from ``os.wait4`` (``ru_maxrss`` of that one child). Each command
   runs ``--repeats`` times, interleaved; medians are reported, plus the
   median of the per-repeat taskvec/mergekit ratios (robust to load drifting
   between repeats) and each child's CPU time (user + sys), which is far less
   sensitive than wall time to other processes competing for the cores (the
   1-minute load average before and after is recorded in the report).
4. Checks that taskvec's and mergekit's merged weights agree (max |Δ| over all
   tensors, streamed) and prints a markdown table with both ratios, the memory
   bound ``2 × largest tensor + 300 MB`` above the interpreter's baseline and
   PASS/FAIL per goal; writes it to ``benchmarks/out/engine.md`` (and
   ``engine.json``), or to ``engine-quick.*`` with ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
BENCH_VENV = ROOT / ".bench-venv"
MERGEKIT_VERSION = "0.1.5"  # resolves with torch 2.13.0 + transformers 5.x, pulls no CUDA wheels
BASELINE_SNIPPET = "import taskvec.engine, torch"
MB = 10**6
MIB = 2**20
SLACK = 300 * MB  # the "+ 300 MB"; decimal MB, the stricter reading


# ---------------------------------------------------------------------------
# Synthetic model


def llama_config(size_gb: float):
    """A LlamaConfig whose float32 weights are at least ``size_gb`` GB (10^9 bytes)."""
    from transformers import LlamaConfig

    if size_gb >= 0.5:
        hidden, inter, vocab = 1024, 2816, 32000
    else:
        hidden, inter, vocab = 512, 1408, 8000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden  # embed_tokens + lm_head (untied) + final norm
    layers = max(1, math.ceil((size_gb * 1e9 / 4 - fixed) / per_layer))
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype="float32",
        architectures=["LlamaForCausalLM"],  # what save_pretrained records; mergekit needs it
    )


def llama_specs(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor ``save_pretrained`` would write, sorted by name."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())


class _SafetensorsOut:
    """Minimal streaming safetensors writer (independent of taskvec's own writer)."""

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...]]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape in specs:
            n = 4 * math.prod(shape)
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, t) -> None:
        self.f.write(memoryview(t.contiguous().reshape(-1).numpy()).cast("B"))

    def close(self) -> None:
        self.f.close()


def _gen(seed: int, name: str):
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def build_models(size_gb: float, rebuild: bool = False) -> dict:
    """Build (or reuse) base, ft1, ft2 under ``benchmarks/out/models-<size>``."""
    import torch

    cfg = llama_config(size_gb)
    specs = llama_specs(cfg)
    nbytes = sum(4 * math.prod(s) for _, s in specs)
    largest = max(specs, key=lambda s: math.prod(s[1]))
    root = OUT / f"models-{size_gb:g}gb"
    stamp = root / "build.json"
    meta = {
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings", "architectures")},
        "tensors": len(specs),
        "params": nbytes // 4,
        "bytes_per_model": nbytes,
        "largest_tensor": {"name": largest[0], "shape": list(largest[1]), "bytes": 4 * math.prod(largest[1])},
        "noise_std": 1e-3,
        "seeds": {"base": 0, "ft1": 1, "ft2": 2},
    }
    dirs = {k: root / k for k in ("base", "ft1", "ft2")}
    if not rebuild and stamp.is_file() and json.loads(stamp.read_text()) == meta and all((d / "model.safetensors").is_file() for d in dirs.values()):
        print(f"reusing synthetic models in {root.relative_to(ROOT)}", flush=True)
        return {"dirs": dirs, **meta}
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    print(f"building synthetic Llama model ({nbytes / 1e9:.3f} GB float32) and two fine-tuned copies in {root.relative_to(ROOT)} ...", flush=True)
    writers = {}
    for key, d in dirs.items():
        d.mkdir(parents=True)
        cfg.save_pretrained(d)
        writers[key] = _SafetensorsOut(d / "model.safetensors", specs)
    for name, shape in specs:
        if name.endswith("norm.weight"):
            base = torch.ones(shape)
        else:
            base = torch.randn(shape, generator=_gen(0, name)).mul_(0.02)
        writers["base"].write(base)
        for seed, key in ((1, "ft1"), (2, "ft2")):
            ft = torch.randn(shape, generator=_gen(seed, name)).mul_(meta["noise_std"]).add_(base)
            writers[key].write(ft)
            del ft
        del base
    for w in writers.values():
        w.close()
    stamp.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
    return {"dirs": dirs, **meta}


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
    """Read inputs once so every run starts from a warm page cache; flush dirty pages."""
    buf = bytearray(64 * MIB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    os.sync()


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


def run_child(cmd: list[str], env: dict | None = None, cleanup: list[Path] = ()) -> dict:
    """Run ``cmd`` in a fresh process: wall seconds and that child's peak RSS (bytes)."""
    for p in cleanup:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
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


def max_abs_diff(a: Path, b: Path) -> tuple[float, int]:
    """max |a − b| over all tensors of two model folders (streamed), and the tensor count."""
    from safetensors import safe_open

    def files(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    fa, fb = files(a), files(b)
    if set(fa) != set(fb):
        raise SystemExit(f"tensor names differ between {a} and {b}: {sorted(set(fa) ^ set(fb))[:5]}")
    worst = 0.0
    for name in sorted(fa):
        with safe_open(fa[name], framework="pt") as ha, safe_open(fb[name], framework="pt") as hb:
            ta, tb = ha.get_tensor(name), hb.get_tensor(name)
            if ta.shape != tb.shape or ta.dtype != tb.dtype:
                raise SystemExit(f"{name}: {ta.shape}/{ta.dtype} vs {tb.shape}/{tb.dtype}")
            worst = max(worst, float((ta.double() - tb.double()).abs().max()))
    return worst, len(fa)


# ---------------------------------------------------------------------------
# Report


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f}"


def render(res: dict) -> str:
    m = res["median"]
    base_rss = m["baseline"]["maxrss"]
    r = res["ratios"]
    g = res["goals"]
    ok = lambda b: "PASS" if b else "FAIL"  # noqa: E731
    model = res["model"]
    lines = [
        f"# taskvec engine benchmark{' (quick)' if res['quick'] else ''}",
        "",
        f"Synthetic Llama model: {model['config']['num_hidden_layers']} layers, hidden {model['config']['hidden_size']}, "
        f"intermediate {model['config']['intermediate_size']}, vocab {model['config']['vocab_size']}; "
        f"{model['params']:,} parameters = {model['bytes_per_model'] / 1e9:.3f} GB float32 per checkpoint "
        f"({model['tensors']} tensors; largest {model['largest_tensor']['name']} {model['largest_tensor']['shape']} = "
        f"{model['largest_tensor']['bytes'] / MB:.1f} MB). Inputs: base + two fine-tuned copies (base + N(0, {model['noise_std']:g}²) noise).",
        "",
        f"Median of {res['repeats']} interleaved runs, each a fresh process, warm page cache; "
        f"peak RSS = the child's `ru_maxrss` from `os.wait4`; CPU = the child's user + sys time. {res['host']}; "
        f"1-min load average {res['loadavg_1min']['before']:.1f} before, {res['loadavg_1min']['after']:.1f} after "
        f"(above {os.cpu_count()} means other processes competed for the cores and inflated wall times).",
        "",
        "| run | command | wall (s) | CPU (s) | peak RSS (MiB) | RSS above baseline (MiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for key, label in res["labels"].items():
        if key not in m:
            continue
        above = m[key]["maxrss"] - base_rss if key != "baseline" else 0
        lines.append(f"| {key} | `{label}` | {m[key]['wall_s']:.2f} | {m[key]['cpu_s']:.2f} | {_mib(m[key]['maxrss'])} | {_mib(above) if key != 'baseline' else '—'} |")
    lines += [
        "",
        "| goal | measured | target | result |",
        "| --- | ---: | ---: | --- |",
        f"| wall time, taskvec merge / mergekit | **{r['wall']:.3f}×** | ≤ 0.5× | {ok(g['wall'])} |",
        f"| (wall, median of per-repeat ratios) | {r['wall_paired_median']:.3f}× | | |",
        f"| (CPU time, taskvec merge / mergekit; paired median) | {r['cpu']:.3f}× ({r['cpu_paired_median']:.3f}×) | | |",
        f"| peak RSS, taskvec merge / mergekit | **{r['rss']:.3f}×** | ≤ 0.5× | {ok(g['rss'])} |",
        f"| taskvec merge RSS above interpreter baseline | {_mib(res['merge_above_baseline'])} MiB | ≤ 2 × {_mib(model['largest_tensor']['bytes'])} + 300 MB = {_mib(res['bound'])} MiB | {ok(g['bound'])} |",
        f"| extract RSS above baseline | {_mib(m['extract']['maxrss'] - base_rss)} MiB | ≤ {_mib(res['bound'])} MiB | {ok(g['extract_bound'])} |",
        f"| apply RSS above baseline | {_mib(m['apply']['maxrss'] - base_rss)} MiB | ≤ {_mib(res['bound'])} MiB | {ok(g['apply_bound'])} |",
        f"| max \\|taskvec merge − mergekit\\| over {res['check']['tensors']} tensors | {res['check']['merge_vs_mergekit']:.3g} | ≤ 1e-5 | {ok(g['agree'])} |",
        f"| max \\|taskvec apply − taskvec merge\\| | {res['check']['apply_vs_merge']:.3g} | ≤ 1e-5 | {ok(g['agree_apply'])} |",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small (~0.1 GB) model for a smoke check")
    ap.add_argument("--size-gb", type=float, default=None, help="model size in GB (10^9 bytes) float32 (default 1.074 = 1 GiB; 0.1 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per command, medians reported (default 3; 1 with --quick)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the synthetic models even if cached")
    ap.add_argument("--keep-outputs", action="store_true", help="keep merged model folders under benchmarks/out/runs")
    args = ap.parse_args(argv)
    size_gb = args.size_gb if args.size_gb is not None else (0.1 if args.quick else 1.074)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)

    OUT.mkdir(parents=True, exist_ok=True)
    import safetensors
    import torch
    import transformers

    import taskvec

    model = build_models(size_gb, rebuild=args.rebuild)
    dirs = model.pop("dirs")
    mk_versions = ensure_mergekit()

    runs = OUT / "runs"
    runs.mkdir(exist_ok=True)
    cache_dir = runs / "hash-cache"  # keep the content-hash cache out of ~/.cache
    env = {**os.environ, "TASKVEC_CACHE_DIR": str(cache_dir), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cold_env = {**env, "TASKVEC_NO_HASH_CACHE": "1"}
    tv = _taskvec_cmd()
    v1, v2 = runs / "v1.safetensors", runs / "v2.safetensors"
    mk_cfg = runs / "mergekit.yml"
    mk_cfg.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {dirs['base']}\n"
        "models:\n"
        f"  - model: {dirs['ft1']}\n    parameters:\n      weight: 1.0\n"
        f"  - model: {dirs['ft2']}\n    parameters:\n      weight: 1.0\n"
        "dtype: float32\n"
    )
    out_mk, out_tv, out_apply = runs / "merged-mergekit", runs / "merged-taskvec", runs / "applied-taskvec"
    mergekit_cmd = [str(BENCH_VENV / "bin" / "mergekit-yaml"), str(mk_cfg), str(out_mk), "--no-cuda", "--lazy-unpickle", "--no-copy-tokenizer", "--quiet"]
    jobs = {
        "baseline": ([sys.executable, "-c", BASELINE_SNIPPET], env, []),
        "mergekit": (mergekit_cmd, env, [out_mk]),
        "taskvec merge": ([*tv, "merge", str(dirs["base"]), f"{dirs['ft1']}:1", f"{dirs['ft2']}:1", "-o", str(out_tv), "-q"], env, [out_tv]),
        "extract": ([*tv, "extract", str(dirs["base"]), str(dirs["ft1"]), "-o", str(v1), "-q"], env, [v1]),
        "apply": ([*tv, "apply", str(dirs["base"]), str(v1), str(v2), "-o", str(out_apply), "-q"], env, [out_apply]),
        "apply (cold hash cache)": ([*tv, "apply", str(dirs["base"]), str(v1), str(v2), "-o", str(out_apply), "-q"], cold_env, [out_apply]),
    }
    labels = {
        "baseline": f"python -c '{BASELINE_SNIPPET}'",
        "mergekit": "mergekit-yaml mergekit.yml OUT --no-cuda --lazy-unpickle --no-copy-tokenizer --quiet",
        "taskvec merge": "taskvec merge base ft1:1 ft2:1 -o OUT -q",
        "extract": "taskvec extract base ft1 -o v1.safetensors -q",
        "apply": "taskvec apply base v1.safetensors v2.safetensors -o OUT -q",
        "apply (cold hash cache)": "TASKVEC_NO_HASH_CACHE=1 taskvec apply base v1.safetensors v2.safetensors -o OUT -q",
    }
    inputs = [d / "model.safetensors" for d in dirs.values()]
    # the second vector, for apply (not timed); this also caches the base content hash
    print("preparing v2 (untimed) ...", flush=True)
    run_child([*tv, "extract", str(dirs["base"]), str(dirs["ft2"]), "-o", str(v2), "-q"], env, [v2])

    samples: dict[str, list[dict]] = {k: [] for k in jobs}
    load_before = os.getloadavg()[0]
    for i in range(repeats):
        for key, (cmd, job_env, cleanup) in jobs.items():
            warm(inputs + ([v1, v2] if key.startswith("apply") and v1.exists() else []))
            s = run_child(cmd, job_env, cleanup)
            samples[key].append(s)
            print(f"  [{i + 1}/{repeats}] {key:<24} {s['wall_s']:7.2f} s  {s['maxrss'] / MIB:8,.0f} MiB", flush=True)

    median = {k: {f: statistics.median(x[f] for x in v) for f in ("wall_s", "cpu_s", "maxrss")} for k, v in samples.items()}
    load_after = os.getloadavg()[0]
    paired = [(t["wall_s"] / m["wall_s"], t["cpu_s"] / m["cpu_s"]) for t, m in zip(samples["taskvec merge"], samples["mergekit"])]
    print("checking outputs ...", flush=True)
    diff_mk, ntensors = max_abs_diff(out_tv, out_mk)
    diff_apply, _ = max_abs_diff(out_apply, out_tv)

    base_rss = median["baseline"]["maxrss"]
    bound = 2 * model["largest_tensor"]["bytes"] + SLACK
    merge_above = median["taskvec merge"]["maxrss"] - base_rss
    ratios = {
        "wall": median["taskvec merge"]["wall_s"] / median["mergekit"]["wall_s"],
        "rss": median["taskvec merge"]["maxrss"] / median["mergekit"]["maxrss"],
        "wall_paired_median": statistics.median(p[0] for p in paired),
        "cpu": median["taskvec merge"]["cpu_s"] / median["mergekit"]["cpu_s"],
        "cpu_paired_median": statistics.median(p[1] for p in paired),
    }
    goals = {
        "wall": ratios["wall"] <= 0.5,
        "rss": ratios["rss"] <= 0.5,
        "bound": merge_above <= bound,
        "extract_bound": median["extract"]["maxrss"] - base_rss <= bound,
        "apply_bound": median["apply"]["maxrss"] - base_rss <= bound,
        "agree": diff_mk <= 1e-5,
        "agree_apply": diff_apply <= 1e-5,
    }
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "taskvec": getattr(taskvec, "__version__", "?"),
        **{f"mergekit venv: {k}": v for k, v in mk_versions.items()},
    }
    res = {
        "quick": args.quick,
        "size_gb": size_gb,
        "repeats": repeats,
        "host": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}",
        "loadavg_1min": {"before": load_before, "after": load_after},
        "model": model,
        "labels": labels,
        "samples": samples,
        "median": median,
        "bound": bound,
        "merge_above_baseline": merge_above,
        "ratios": ratios,
        "goals": goals,
        "check": {"merge_vs_mergekit": diff_mk, "apply_vs_merge": diff_apply, "tensors": ntensors},
        "versions": versions,
    }
    table = render(res)
    print()
    print(table)
    print(f"wall ratio (taskvec merge / mergekit): {ratios['wall']:.3f}")
    print(f"RSS ratio  (taskvec merge / mergekit): {ratios['rss']:.3f}")
    print(f"CPU ratio  (taskvec merge / mergekit): {ratios['cpu']:.3f}  (informational)")
    stem = "engine-quick" if args.quick else "engine"
    (OUT / f"{stem}.md").write_text(table)
    (OUT / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"wrote {(OUT / f'{stem}.md').relative_to(ROOT)} and {stem}.json")
    if not args.keep_outputs:
        for p in (out_mk, out_tv, out_apply, v1, v2):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
