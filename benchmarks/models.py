"""Synthetic Llama-shaped models for the benchmarks (shared by bench_engine and bench_recipes).

A base model (``transformers.LlamaConfig``; tensor names and shapes from a
``LlamaForCausalLM`` on the meta device) and fine-tuned copies (base + seeded
N(0, 1e-3²) noise on every tensor), written side by side tensor by tensor, so
building holds a handful of tensors, never a model.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
import zlib
from pathlib import Path

CODES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
NOISE_STD = 1e-3


def llama_config(size_gb: float, dtype: str = "float32"):
    """A LlamaConfig whose weights in ``dtype`` are at least ``size_gb`` GB (10^9 bytes).

    hidden 512 below 0.5 GB (vocabulary 8,000 below 0.2 GB, for smoke tests), 1024 below 2 GB, 2048 above (largest tensor: the
    32,000-token embedding, 62.5 / 125 / 250 MiB in float32).
    """
    from transformers import LlamaConfig

    hidden, inter = (512, 1408) if size_gb < 0.5 else (1024, 2816) if size_gb < 2 else (2048, 5632)
    vocab = 8000 if size_gb < 0.2 else 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden  # embed_tokens + lm_head (untied) + final norm
    layers = max(1, math.ceil((size_gb * 1e9 / CODES[dtype][1] - fixed) / per_layer))
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype=dtype,
        architectures=["LlamaForCausalLM"],  # what save_pretrained records; mergekit needs it
    )


def llama_specs(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor ``save_pretrained`` would write, sorted by name."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())


class SafetensorsOut:
    """Minimal streaming safetensors writer (independent of taskvec's own writer)."""

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...]]], dtype: str = "float32"):
        code, size = CODES[dtype]
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape in specs:
            n = size * math.prod(shape)
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, t) -> None:
        self.f.write(memoryview(t.contiguous().reshape(-1).view(__import__("torch").uint8).numpy()))

    def close(self) -> None:
        self.f.close()


def _gen(seed: int, name: str):
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def build_models(root: Path, size_gb: float, dtype: str = "float32", finetunes: tuple[int, ...] = (1, 2), rebuild: bool = False) -> dict:
    """Build (or reuse) ``base`` and ``ft<seed>`` for each seed under ``root``; returns their folders and a description."""
    import torch

    cfg = llama_config(size_gb, dtype)
    specs = llama_specs(cfg)
    size = CODES[dtype][1]
    nbytes = sum(size * math.prod(s) for _, s in specs)
    largest = max(specs, key=lambda s: math.prod(s[1]))
    stamp = root / "build.json"
    meta = {
        "dtype": dtype,
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings", "architectures")},
        "tensors": len(specs),
        "params": nbytes // size,
        "bytes_per_model": nbytes,
        "largest_tensor": {"name": largest[0], "shape": list(largest[1]), "bytes": size * math.prod(largest[1])},
        "noise_std": NOISE_STD,
        "seeds": {"base": 0, **{f"ft{s}": s for s in finetunes}},
    }
    dirs = {k: root / k for k in meta["seeds"]}
    if not rebuild and stamp.is_file() and json.loads(stamp.read_text()) == meta and all((d / "model.safetensors").is_file() for d in dirs.values()):
        print(f"reusing synthetic models in {root}", flush=True)
        return {"dirs": dirs, **meta}
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    print(f"building a synthetic Llama model ({nbytes / 1e9:.3f} GB {dtype}) and {len(finetunes)} fine-tuned copies in {root} ...", flush=True)
    tdtype = getattr(torch, dtype)
    writers = {}
    for key, d in dirs.items():
        d.mkdir(parents=True)
        cfg.save_pretrained(d)
        writers[key] = SafetensorsOut(d / "model.safetensors", specs, dtype)
    for name, shape in specs:
        base = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=_gen(0, name)).mul_(0.02)
        writers["base"].write(base.to(tdtype))
        for seed in finetunes:
            writers[f"ft{seed}"].write(torch.randn(shape, generator=_gen(seed, name)).mul_(NOISE_STD).add_(base).to(tdtype))
        del base
    for w in writers.values():
        w.close()
    stamp.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
    return {"dirs": dirs, **meta}


def compare(a: Path, b: Path) -> dict:
    """max |a − b|, count of tensors whose bits differ, and of differing entries."""
    import torch
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    fa, fb = tensors(a), tensors(b)
    if set(fa) != set(fb):
        raise SystemExit(f"tensor names differ: {sorted(set(fa) ^ set(fb))[:5]}")
    worst, bad_tensors, bad_entries, total = 0.0, 0, 0, 0
    for name in sorted(fa):
        with safe_open(fa[name], framework="pt") as ha, safe_open(fb[name], framework="pt") as hb:
            ta, tb = ha.get_tensor(name), hb.get_tensor(name)
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            raise SystemExit(f"{name}: {ta.dtype}{list(ta.shape)} vs {tb.dtype}{list(tb.shape)}")
        diff = ta.view(torch.int32) != tb.view(torch.int32) if ta.dtype == torch.float32 else ta != tb
        n = int(diff.sum())
        bad_entries += n
        bad_tensors += n > 0
        total += ta.numel()
        worst = max(worst, float((ta.double() - tb.double()).abs().max()))
    return {"max_abs_diff": worst, "tensors": len(fa), "tensors_differing": bad_tensors, "entries_differing": bad_entries, "entries": total}
