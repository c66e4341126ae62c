"""Fine-tunes and task vectors (cached under ``<out>/cache``), random and merged vectors."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from benchmarks.paper.spec import ExperimentParams, MethodSpec
from taskvec.config import TrainSpec
from taskvec.io import resolve_model


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _code_and_data(spec, params: ExperimentParams) -> dict[str, str]:
    """sha256 of the training code and of the task's data files: a change to either invalidates the cache."""
    from taskvec import data, heads, train
    from taskvec.io import file_sha256

    out = {Path(m.__file__).name: file_sha256(m.__file__) for m in (data, heads, train)}
    source = data.resolve_source(spec, params.data_root())
    if source.kind == "mirror":
        out |= {f.name: file_sha256(f) for f in sorted(Path(source.location).glob("*.csv"))}
    else:
        out["source"] = str(source.location)
    return out


def train_spec_for(params: ExperimentParams, task: str) -> TrainSpec:
    steps = params.bench.steps.get(task)
    return params.train if steps is None else TrainSpec.model_validate(params.train.model_dump() | {"steps": steps})


def ensure_vector(params: ExperimentParams, task: str, cache: Path, log: Callable[[str], None]) -> Path:
    """Fine-tune ``task`` (unless cached) and extract its encoder task vector (unless cached)."""
    from taskvec.engine import extract
    from taskvec.train import MANIFEST, finetune_task

    spec = params.task(task)
    train = train_spec_for(params, task)
    key = _key(params.base, str(resolve_model(params.base)), spec.model_dump(), train.model_dump(), str(params.data_root()), _code_and_data(spec, params))
    ft_dir = cache / "finetune" / f"{task}-{key}"
    vec = cache / "vectors" / f"{task}-{key}.safetensors"
    if vec.is_file():
        log(f"[cache] vector {task} ({vec.name})")
        return vec
    if not (ft_dir / MANIFEST).is_file():
        log(f"[finetune] {task} ({spec.kind}, {train.steps} steps × {train.batch_size}, lr {train.lr:g}) ...")
        result = finetune_task(params.base, spec, train, ft_dir, data_dir=params.data_root(), progress=False)
        losses = result.losses
        first_last = f"loss {losses[0][1]:.3f} → {losses[-1][1]:.3f}" if losses else ""
        log(f"[finetune] {task} done in {result.seconds:.0f}s {first_last}")
    else:
        log(f"[cache] fine-tune {task}")
    vec.parent.mkdir(parents=True, exist_ok=True)
    extract(resolve_model(params.base), ft_dir, vec)
    return vec


def load_tau(path: Path) -> dict[str, torch.Tensor]:
    from taskvec.vector import TaskVector

    return TaskVector.load(path).tensors


def random_like(tau: Mapping[str, torch.Tensor], seed: int, norm: str = "per_tensor") -> dict[str, torch.Tensor]:
    """Seeded Gaussian vector with the same per-tensor (or global) L2 norm as ``tau``."""
    gen = torch.Generator().manual_seed(seed)
    out = {name: torch.randn(t.shape, generator=gen, dtype=torch.float32) for name, t in sorted(tau.items())}
    if norm == "per_tensor":
        for name, r in out.items():
            target = float(tau[name].float().norm())
            r.mul_(target / max(float(r.norm()), 1e-12))
    else:
        target = math.sqrt(sum(float(t.float().pow(2).sum()) for t in tau.values()))
        have = math.sqrt(sum(float(r.pow(2).sum()) for r in out.values()))
        for r in out.values():
            r.mul_(target / max(have, 1e-12))
    return out


def merge_vectors(taus: Sequence[Mapping[str, torch.Tensor]], method: MethodSpec, seed: int) -> dict[str, torch.Tensor]:
    """Merge with unit weights through the engine's per-tensor algebra (λ is searched afterwards)."""
    from taskvec.engine import MergeOptions

    density = method.density if method.method in ("ties", "magnitude") else 1.0
    drop = method.drop if method.method in ("dare", "dare_ties") else 0.0
    options = MergeOptions(method=method.method, density=density, drop=drop, seed=seed)
    names = sorted(taus[0])
    return {name: options.combine(name, [t[name] for t in taus], [1.0] * len(taus)) for name in names}


def global_norm(tau: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in tau.values()))
