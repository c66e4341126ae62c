"""The one evaluation harness: an encoder loaded once, a frozen head and eval sets per task and split.

Every scorer goes through :class:`Suite` — the λ search (``taskvec search``,
the pipeline's search step), ``taskvec evaluate`` and the pipeline's evaluate
step, the promotion evaluator and the paper benchmark:

* :meth:`Suite.load` validates the tasks (classification only), loads each
  split with its row cap (``params.eval.max_rows.<split>``, or an explicit
  ``max_rows``), then the encoder **once**, then the heads — built from the
  loaded encoder (``heads="build"``: the base's zero-shot heads) or resolved
  per task by :func:`resolve_heads` (``heads="resolve"``: an explicit head
  file, else the model's own ``heads/<task>.safetensors``, else built from
  the base, which is then loaded at most once for all tasks);
* :meth:`Suite.accuracies` / :meth:`Suite.scores` score the encoder *as it is
  now* (e.g. while a :class:`WeightEditor` holds θ + λτ);
  :meth:`Suite.score_model` scores another model folder with the same heads
  and eval sets (a fresh load of that encoder, placed by the same policy);
* one device policy, :func:`device`: the model is placed on it and every
  tensor fed to a model (eval batches, label texts, training batches and
  labels) goes through its :meth:`DevicePolicy.to` — CUDA when available,
  for every caller. Tests substitute it with ``monkeypatch.setattr(suite, "device", ...)``;
* one λ-curve writer, :func:`write_curve` (``curve.csv`` + ``curve.png``).
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from taskvec.config import Params, TaskSpec
from taskvec.data import load_rows, load_split
from taskvec.errors import HomologyError, TaskvecError
from taskvec.evaluate import EvalSet, score
from taskvec.heads import EncoderClassifier, Head, build_head, load_encoder, load_head
from taskvec.search import SE_SUFFIX

# ---------------------------------------------------------------------------
# Device policy


CUBLAS_WORKSPACE = ":4096:8"  # cuBLAS' deterministic workspace setting (CUBLAS_WORKSPACE_CONFIG)


class DevicePolicy:
    """Where models and every tensor fed to them live: CUDA when available, else CPU.

    :meth:`determinism` is the deterministic mode every caller uses:
    ``torch.use_deterministic_algorithms(True)`` and, on CUDA, cuBLAS's
    workspace setting (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, set before cuBLAS
    is first used, unless the environment already sets it) and no cuDNN
    autotuning. Fine-tuning holds it for the Trainer's run; the process's
    CUDA policy (:func:`device`) turns it on for good, so evaluation, the λ
    search and gradient ascent are deterministic on the GPU too.
    """

    def __init__(self, device: str | torch.device | None = None):
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    def _enter_determinism(self) -> tuple[bool, bool, bool]:
        previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
        if self.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=False)
        return previous

    @contextlib.contextmanager
    def determinism(self) -> Iterator[None]:
        """Deterministic mode for the block; the previous mode is restored afterwards (the cuBLAS setting stays)."""
        enabled, warn_only, benchmark = self._enter_determinism()
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
            torch.backends.cudnn.benchmark = benchmark

    def enable_determinism(self) -> None:
        """Deterministic mode for the rest of the process (what :func:`device` does for a CUDA policy)."""
        self._enter_determinism()

    def place(self, module: nn.Module) -> nn.Module:
        """Move ``module`` (parameters and buffers) to the policy's device."""
        return module.to(self.device)

    def to(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move one input tensor (ids, masks, labels) to the policy's device."""
        return tensor.to(self.device)

    def batch(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every tensor of a tokenised batch through :meth:`to`."""
        return {key: self.to(value) for key, value in batch.items()}

    def __repr__(self) -> str:
        return f"DevicePolicy({str(self.device)!r})"


_POLICY: DevicePolicy | None = None


def device() -> DevicePolicy:
    """The process's device policy (created on first use); every :class:`Suite`, fine-tune and search takes it from here.

    A CUDA policy switches the process to deterministic mode when it is created.
    """
    global _POLICY
    if _POLICY is None:
        _POLICY = DevicePolicy()
        if _POLICY.device.type == "cuda":
            _POLICY.enable_determinism()
    return _POLICY


# ---------------------------------------------------------------------------
# In-place weight edits


class WeightEditor:
    """Set ``module``'s covered tensors to ``base + λ·τ`` in place; restore ``base`` exactly.

    ``tau`` is keyed by ``module.state_dict()`` names. A float32 copy of the
    base values of the covered tensors is kept; each :meth:`apply` writes
    ``(base + λ·τ)`` cast to the tensor's own dtype. Use as a context manager
    to restore the base on exit.
    """

    def __init__(self, module: nn.Module, tau: Mapping[str, torch.Tensor]):
        state = module.state_dict()
        unknown = [name for name in tau if name not in state]
        if unknown:
            raise HomologyError(f"vector tensor {unknown[0]!r} is not in the model ({len(unknown)} unknown in all)")
        self._targets: dict[str, torch.Tensor] = {}
        self._base: dict[str, torch.Tensor] = {}
        self._tau: dict[str, torch.Tensor] = {}
        for name, delta in tau.items():
            target = state[name]
            if tuple(delta.shape) != tuple(target.shape):
                raise HomologyError(f"vector tensor {name!r} has shape {tuple(delta.shape)}, the model's has {tuple(target.shape)}")
            if not target.is_floating_point():
                raise HomologyError(f"vector tensor {name!r} targets a non-floating tensor ({target.dtype})")
            self._targets[name] = target
            self._base[name] = target.detach().float().clone()
            self._tau[name] = delta.detach().to(device=target.device, dtype=torch.float32)
        self.lam = 0.0

    @torch.no_grad()
    def apply(self, lam: float) -> None:
        """Write ``base + lam·τ`` into the module's tensors (the product rounded, then the sum: the bits ``taskvec apply`` writes)."""
        for name, target in self._targets.items():
            if target.dtype == torch.float32:  # write straight into the parameter, no temporary
                torch.mul(self._tau[name], lam, out=target).add_(self._base[name])
            else:
                target.copy_(torch.mul(self._tau[name], lam).add_(self._base[name]))
        self.lam = float(lam)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved base values back (exact: float32 holds every float16/bfloat16/float32 value)."""
        for name, target in self._targets.items():
            target.copy_(self._base[name])
        self.lam = 0.0

    def __enter__(self) -> WeightEditor:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


# ---------------------------------------------------------------------------
# Heads


def _checked(head: Head, path: Path, spec: TaskSpec) -> Head:
    if head.labels != spec.labels:
        raise TaskvecError(f"head {path} has labels {head.labels}, task {spec.name} declares {spec.labels}")
    return head


def resolve_heads(
    model_dir: Path,
    specs: Sequence[TaskSpec],
    *,
    head_paths: Mapping[str, str | Path] | None = None,
    base: str | Path | None = None,
    max_length: int = 128,
    policy: DevicePolicy | None = None,
) -> dict[str, Head]:
    """Each task's head: ``head_paths[task]``, else ``model_dir/heads/<task>.safetensors``, else built from ``base``.

    The base encoder is loaded at most once, and only if some task needs it.
    """
    policy = policy or device()
    head_paths = head_paths or {}
    heads: dict[str, Head] = {}
    base_model = None
    for spec in specs:
        explicit = head_paths.get(spec.name)
        path = Path(explicit) if explicit is not None else model_dir / "heads" / f"{spec.name}.safetensors"
        if explicit is not None or path.is_file():
            heads[spec.name] = _checked(load_head(path), path, spec)
            continue
        if base is None:
            raise TaskvecError(f"no head for task {spec.name} in {model_dir} and no base model to build one")
        if base_model is None:
            encoder, tokenizer, _ = load_encoder(base)
            base_model = (policy.place(encoder), tokenizer)
        heads[spec.name] = build_head(*base_model, spec.name, spec.labels, spec.head_texts, max_length=max_length, place=policy.batch)
    return heads


# ---------------------------------------------------------------------------
# The harness


class Suite:
    """One encoder on the policy's device, each task's frozen head, eval sets per split and task."""

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer,
        heads: Mapping[str, Head],
        sets: Mapping[str, Mapping[str, EvalSet]],
        *,
        policy: DevicePolicy,
        path: Path | None = None,
        dtype: torch.dtype | None = None,
        keep_base: bool = False,
    ):
        self.encoder, self.tokenizer, self.policy, self.path, self.dtype = encoder, tokenizer, policy, path, dtype
        self.heads = dict(heads)
        self.models = {name: EncoderClassifier(encoder, head) for name, head in self.heads.items()}
        self.sets = {split: dict(by_task) for split, by_task in sets.items()}
        self.splits = list(self.sets)
        self._base_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()} if keep_base else None

    @classmethod
    def load(
        cls,
        model: str | Path,
        tasks: Sequence[str],
        params: Params,
        *,
        splits: Sequence[str] = ("validation",),
        max_rows: Mapping[str, int | None] | None = None,
        task_rows: Mapping[str, Mapping[str, int | None]] | None = None,
        task_splits: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        dtype: torch.dtype | None = None,
        heads: Literal["build", "resolve"] = "build",
        head_paths: Mapping[str, str | Path] | None = None,
        keep_base: bool = False,
    ) -> Suite:
        """Validate the tasks, load every (task, split) with its row cap, then ``model`` once, then the heads.

        ``max_rows[split]`` (when not None) overrides ``params.eval.max_rows.<split>``;
        ``task_rows[split][task]`` overrides both for one task (``None``: every row),
        e.g. more validation rows for the control tasks of a λ search;
        ``task_splits[key][task]`` loads those splits' rows (:func:`taskvec.data.load_rows`,
        capped by ``task_rows[key][task]``) as eval set ``key`` of that task; a
        ``key`` not in ``splits`` holds only the tasks named (e.g. ``"control"``:
        a control scored on validation + train rows, apart from the targets' validation);
        ``dtype=None`` keeps the checkpoint's dtype; ``heads``: see the module docstring.
        """
        policy = device()
        specs = {name: params.task(name) for name in dict.fromkeys(tasks)}
        for name, spec in specs.items():
            if spec.kind != "classification":
                raise TaskvecError(f"task {name} is an {spec.kind} task; only classification tasks can be evaluated")
        explicit = max_rows or {}
        data = {}
        for split in dict.fromkeys(splits):
            cap = explicit.get(split) if explicit.get(split) is not None else params.eval.max_rows.get(split)
            per_task = (task_rows or {}).get(split, {})
            data[split] = {
                name: load_split(spec, params.data_root(), split, max_rows=per_task[name] if name in per_task else cap, seed=params.eval.seed)
                for name, spec in specs.items()
                if name not in (task_splits or {}).get(split, {})
            }
        for key, by_task in (task_splits or {}).items():
            per_task = (task_rows or {}).get(key, {})
            for name, sources in by_task.items():
                if name not in specs:
                    raise TaskvecError(f"task {name} has rows in eval set {key!r} but is not one of the suite's tasks")
                data.setdefault(key, {})[name] = load_rows(
                    specs[name], params.data_root(), sources, max_rows=per_task[name] if name in per_task else params.eval.max_rows.get(key), seed=params.eval.seed
                )
        encoder, tokenizer, path = load_encoder(model, dtype=dtype)
        policy.place(encoder)
        length = params.eval.max_length
        if heads == "build":
            built = {
                name: build_head(encoder, tokenizer, name, spec.labels, spec.head_texts, max_length=length, place=policy.batch)
                for name, spec in specs.items()
            }
        elif heads == "resolve":
            built = resolve_heads(path, list(specs.values()), head_paths=head_paths, base=params.base, max_length=length, policy=policy)
        else:
            raise TaskvecError(f"unknown head mode {heads!r} (build | resolve)")
        sets = {
            split: {name: EvalSet.build(rows, tokenizer, batch_size=params.eval.batch_size, max_length=length) for name, rows in by_task.items()}
            for split, by_task in data.items()
        }
        return cls(encoder, tokenizer, built, sets, policy=policy, path=path, dtype=dtype, keep_base=keep_base)

    def _split(self, split: str | None) -> str:
        split = split or self.splits[0]
        if split not in self.sets:
            raise TaskvecError(f"split {split!r} was not loaded (loaded: {', '.join(self.splits)})")
        return split

    def _scores(self, models: Mapping[str, EncoderClassifier], split: str | None, tasks: Sequence[str] | None) -> dict[str, dict]:
        sets = self.sets[self._split(split)]
        names = list(models) if tasks is None else list(tasks)
        return {name: score(models[name], sets[name], place=self.policy.batch) for name in names}

    def scores(self, split: str | None = None, tasks: Sequence[str] | None = None) -> dict[str, dict]:
        """Accuracy, macro-F1 and n per task of the encoder *as it is now* (default: the first split loaded)."""
        return self._scores(self.models, split, tasks)

    def accuracies(self, split: str | None = None, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Accuracy per task of the encoder as it is now."""
        return {name: result["accuracy"] for name, result in self.scores(split, tasks).items()}

    def score_model(self, model: str | Path, split: str | None = None, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Accuracy per task of another model folder's encoder, with this suite's heads and eval sets."""
        encoder, _, _ = load_encoder(model, dtype=self.dtype)
        self.policy.place(encoder)
        names = list(self.heads) if tasks is None else list(tasks)
        models = {name: EncoderClassifier(encoder, self.heads[name]) for name in names}
        return {name: result["accuracy"] for name, result in self._scores(models, split, names).items()}

    def editor(self, tau: Mapping[str, torch.Tensor]) -> WeightEditor:
        """A :class:`WeightEditor` on this suite's encoder."""
        return WeightEditor(self.encoder, tau)

    def at(self, tau: Mapping[str, torch.Tensor], lam: float, split: str | None = None, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Accuracies of ``θ + lam·τ`` (the weights are restored afterwards)."""
        with self.editor(tau) as editor:
            editor.apply(lam)
            return self.accuracies(split, tasks)

    def reset(self) -> None:
        """Put back the weights as loaded (needs ``keep_base=True``)."""
        if self._base_state is None:
            raise TaskvecError("this suite keeps no copy of its base weights (load it with keep_base=True)")
        self.encoder.load_state_dict(self._base_state)

    def lineage(self, split: str | None = None) -> dict:
        """Data lineage per task of one split, or ``{split: {task: lineage}}`` of all."""
        if split is not None:
            return {name: evalset.lineage for name, evalset in self.sets[self._split(split)].items()}
        return {s: {name: evalset.lineage for name, evalset in by_task.items()} for s, by_task in self.sets.items()}


# ---------------------------------------------------------------------------
# The λ curve


def write_curve(
    folder: str | Path,
    result,
    *,
    tasks: Sequence[str] | None = None,
    score_column: str = "score",
    task_prefix: str = "",
) -> tuple[Path, Path]:
    """Write ``curve.csv`` and ``curve.png`` of a :class:`taskvec.search.SearchResult` into ``folder``.

    CSV columns: ``lambda``, ``score_column``, ``feasible`` (0/1), then one
    accuracy column per task (``task_prefix + task``; default: every task
    scored, sorted), one row per evaluated λ in increasing order. The PNG plots
    the per-task accuracies, the objective and the infeasible points against λ.
    Callers write into a temporary folder (``atomic_dir``) themselves.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    rows = sorted(result.evaluations, key=lambda e: e["lambda"])
    if tasks is None:  # every accuracy scored (a control's drop standard error is not an accuracy: search.json keeps it)
        tasks = sorted({task for row in rows for task in row["metrics"] if not task.endswith(SE_SUFFIX)})
    tasks = list(tasks)
    csv_path, png_path = folder / "curve.csv", folder / "curve.png"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lambda", score_column, "feasible", *(task_prefix + t for t in tasks)])
        for row in rows:
            writer.writerow([row["lambda"], row["score"], int(row["feasible"]), *(row["metrics"].get(t, "") for t in tasks)])
    fig, ax = plt.subplots(figsize=(6, 4))
    lams = [row["lambda"] for row in rows]
    for task in tasks:
        ax.plot(lams, [row["metrics"].get(task, np.nan) for row in rows], marker="o", label=f"{task} accuracy")
    ax.plot(lams, [row["score"] for row in rows], "k--", marker="s", label=f"{result.objective} score")
    bad = [row for row in rows if not row["feasible"]]
    if bad:
        ax.scatter([row["lambda"] for row in bad], [row["score"] for row in bad], marker="x", s=80, c="red", zorder=3, label="infeasible")
    ax.axvline(result.best_lambda, color="grey", lw=1, label=f"best λ = {result.best_lambda:.3g}")
    ax.set_xlabel("λ")
    ax.set_ylabel("accuracy / score")
    ax.set_title(f"λ search ({result.objective}, {result.strategy}, {len(rows)} evaluations)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return csv_path, png_path
