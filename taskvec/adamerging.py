"""Layer-wise AdaMerging (Yang et al., ICLR 2024): merging coefficients learned without labels.

The merged encoder is θ = θ_base + Σ_t λ_{g(n),t}·τ_t for every covered
tensor ``n``, where ``g(n)`` is the tensor's *group*: its transformer block
(``…layer.<i>.…``) or ``other`` (embeddings, pooler) with
``granularity="layer"``, or one group ``all`` with ``granularity="task"``
(task-wise AdaMerging). The coefficients λ (groups × tasks) start at
``spec.init`` and are trained by Adam to minimise the mean Shannon entropy of
each task's predictions on its **unlabelled** validation texts (labels are
never read), summed over tasks; the base weights, the task vectors and the
frozen heads stay fixed. The forward pass is
``torch.func.functional_call`` of each task's :class:`~taskvec.heads.EncoderClassifier`
with the merged tensors, so gradients reach λ only.

:func:`merged_tensors` is the one definition of the merged weights, used for
training and for writing the result into a model (:func:`edit_delta`
through :class:`~taskvec.suite.WeightEditor` at λ = 1): ``base + delta`` with
``delta = Σ_t λ_{g,t}·τ_t`` summed in task order — the weights the suite
scores are exactly those. :func:`adamerge_suite` runs it on the evaluation
harness (:class:`taskvec.suite.Suite`: encoder loaded once, heads per task,
its device policy).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from taskvec.config import AdaMergingSpec
from taskvec.errors import HomologyError, TaskvecError

_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def group_of(name: str, granularity: str = "layer") -> str:
    """The coefficient group of tensor ``name``: ``layer.<i>``, ``other`` or (task-wise) ``all``."""
    if granularity == "task":
        return "all"
    if granularity != "layer":
        raise TaskvecError(f"unknown AdaMerging granularity {granularity!r} (layer | task)")
    match = _LAYER.search(name)
    return f"layer.{int(match.group(1))}" if match else "other"


def groups_of(names: Sequence[str], granularity: str = "layer") -> list[str]:
    """The groups of ``names``, ordered: ``other`` first, then layers by index."""
    found = {group_of(n, granularity) for n in names}
    return sorted(found, key=lambda g: (-1, g) if not g.startswith("layer.") else (int(g.split(".")[1]), g))


def delta_tensors(
    taus: Sequence[Mapping[str, torch.Tensor]], coefficients: torch.Tensor, groups: Sequence[str], granularity: str = "layer"
) -> dict[str, torch.Tensor]:
    """``Σ_t λ_{g(n),t}·τ_t[n]`` per tensor, summed in task order (differentiable in ``coefficients``)."""
    if not taus:
        raise TaskvecError("AdaMerging needs at least one task vector")
    if tuple(coefficients.shape) != (len(groups), len(taus)):
        raise TaskvecError(f"coefficients have shape {tuple(coefficients.shape)}, expected ({len(groups)}, {len(taus)})")
    names = list(taus[0])
    if any(set(t) != set(names) for t in taus[1:]):
        raise HomologyError("task vectors cover different tensors")
    index = {g: i for i, g in enumerate(groups)}
    out = {}
    for name in names:
        row = coefficients[index[group_of(name, granularity)]]
        total = row[0] * taus[0][name]
        for t in range(1, len(taus)):
            total = total + row[t] * taus[t][name]
        out[name] = total
    return out


def merged_tensors(
    base: Mapping[str, torch.Tensor], taus: Sequence[Mapping[str, torch.Tensor]], coefficients: torch.Tensor, groups: Sequence[str], granularity: str = "layer"
) -> dict[str, torch.Tensor]:
    """θ_base + Σ_t λ_{g,t}·τ_t for every covered tensor (``base + delta``)."""
    return {name: base[name] + d for name, d in delta_tensors(taus, coefficients, groups, granularity).items()}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax of each row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@dataclass
class AdaMergingResult:
    tasks: list[str]  # the tasks whose unlabelled texts gave the entropy
    vectors: list[str]  # the coefficient columns, one per task vector
    groups: list[str]
    coefficients: torch.Tensor  # groups × tasks, detached, float32, CPU
    history: list[float]  # summed entropy of each step's training batches, before its update
    initial_entropy: float  # summed entropy on fixed batches (each task's first chunk) at the start ...
    final_entropy: float  # ... and after training
    seconds: float
    spec: dict = field(default_factory=dict)

    def table(self) -> dict[str, dict[str, float]]:
        """``{vector: {group: λ}}``."""
        return {v: {g: float(self.coefficients[i, j]) for i, g in enumerate(self.groups)} for j, v in enumerate(self.vectors)}

    def to_dict(self) -> dict:
        return {
            "strategy": "adamerging",
            "coefficients": self.table(),
            "groups": self.groups,
            "entropy_tasks": self.tasks,
            "entropy_history": [round(h, 6) for h in self.history],
            "initial_entropy": self.initial_entropy,
            "final_entropy": self.final_entropy,
            "seconds": round(self.seconds, 3),
            "adamerging": self.spec,
        }


Batch = Mapping[str, torch.Tensor]


def _chunks(batches: Sequence[Batch], size: int) -> list[dict[str, torch.Tensor]]:
    """Split padded batches into row chunks of at most ``size`` rows (labels are dropped)."""
    out = []
    for batch in batches:
        rows = len(batch["input_ids"])
        for lo in range(0, rows, size):
            out.append({k: v[lo : lo + size] for k, v in batch.items() if k != "labels"})
    return out


def adamerge(
    models: Mapping[str, nn.Module],
    encoder: nn.Module,
    taus: Sequence[Mapping[str, torch.Tensor]],
    batches: Mapping[str, Sequence[Batch]],
    spec: AdaMergingSpec,
    *,
    place: Callable[[Batch], Mapping[str, torch.Tensor]] | None = None,
    labels: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> AdaMergingResult:
    """Train the coefficients by entropy minimisation; ``encoder`` is left exactly as it was.

    The coefficient columns are the vectors (``labels``, default: the tasks when
    there are as many vectors as tasks, else ``0, 1, …``).

    ``models[task]`` wraps ``encoder`` (its parameters named ``encoder.<name>``,
    as :class:`~taskvec.heads.EncoderClassifier`); ``taus[t]`` is vector ``t``
    keyed by ``encoder.state_dict()`` names; ``batches[task]`` are tokenised,
    unlabelled batches of that task (any ``labels`` key is dropped).
    """
    tasks = list(models)
    vectors = list(labels) if labels is not None else (tasks if len(tasks) == len(taus) else [str(i) for i in range(len(taus))])
    if len(vectors) != len(taus):
        raise TaskvecError(f"AdaMerging got {len(vectors)} labels for {len(taus)} vectors")
    if not tasks or any(t not in batches or not batches[t] for t in tasks):
        raise TaskvecError("AdaMerging needs unlabelled batches for every task")
    state = dict(encoder.named_parameters())
    unknown = [n for n in taus[0] if n not in state] if taus else []
    if unknown:
        raise HomologyError(f"vector tensor {unknown[0]!r} is not a parameter of the encoder")
    device = next(encoder.parameters()).device
    place = place or (lambda b: {k: v.to(device) for k, v in b.items()})
    taus = [{n: t[n].detach().to(device=device, dtype=torch.float32) for n in taus[0]} for t in taus]
    base = {n: state[n].detach().float().clone() for n in taus[0]}
    groups = groups_of(list(base), spec.granularity)
    coefficients = torch.full((len(groups), len(taus)), float(spec.init), device=device, requires_grad=True)
    optimiser = torch.optim.Adam([coefficients], lr=spec.lr)
    generator = torch.Generator().manual_seed(spec.seed)
    pools = {t: _chunks(batches[t], spec.batch_size) for t in tasks}
    orders = {t: [] for t in tasks}
    history: list[float] = []
    flags = {n: p.requires_grad for n, p in encoder.named_parameters()}
    modes = {t: m.training for t, m in models.items()}
    started = time.perf_counter()

    def next_batch(task: str) -> dict[str, torch.Tensor]:
        if not orders[task]:
            orders[task] = torch.randperm(len(pools[task]), generator=generator).tolist()
        return place(pools[task][orders[task].pop()])

    def loss_on(batch_for: Callable[[str], Mapping[str, torch.Tensor]]) -> torch.Tensor:
        merged = merged_tensors(base, taus, coefficients, groups, spec.granularity)
        total = torch.zeros((), device=device)
        for task, model in models.items():
            params = {f"encoder.{n}": v for n, v in merged.items()}
            total = total + entropy(functional_call(model, params, args=(), kwargs=dict(batch_for(task))).logits)
        return total

    try:
        for p in encoder.parameters():
            p.requires_grad_(False)
        for m in models.values():
            m.eval()
        fixed = {t: place(pools[t][0]) for t in tasks}
        with torch.no_grad():
            initial = float(loss_on(lambda t: fixed[t]))
        for step in range(spec.steps):
            loss = loss_on(next_batch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            history.append(float(loss.detach()))
            if log and (step % 10 == 0 or step == spec.steps - 1):
                log(f"[adamerging] step {step + 1}/{spec.steps}: entropy {history[-1]:.4f}")
        with torch.no_grad():
            final = float(loss_on(lambda t: fixed[t]))
    finally:
        for n, p in encoder.named_parameters():
            p.requires_grad_(flags[n])
        for t, m in models.items():
            m.train(modes[t])
    return AdaMergingResult(tasks, vectors, groups, coefficients.detach().float().cpu(), history, initial, final, time.perf_counter() - started, spec.model_dump())


def coefficient_tensor(table: Mapping[str, Mapping[str, float]], tasks: Sequence[str], groups: Sequence[str]) -> torch.Tensor:
    """A ``{task: {group: λ}}`` table (as in ``best.json``) as the groups × tasks tensor."""
    try:
        return torch.tensor([[float(table[t][g]) for t in tasks] for g in groups], dtype=torch.float32)
    except KeyError as exc:
        raise TaskvecError(f"coefficient table lacks {exc.args[0]!r}") from None


def edit_delta(taus: Sequence[Mapping[str, torch.Tensor]], coefficients: torch.Tensor, groups: Sequence[str], granularity: str = "layer") -> dict[str, torch.Tensor]:
    """The float32 delta Σ λ_{g,t}·τ_t to hand to :class:`~taskvec.suite.WeightEditor` and apply with λ = 1.

    ``WeightEditor.apply(1.0)`` writes ``base + 1·delta`` = :func:`merged_tensors` bit for bit.
    """
    with torch.no_grad():
        return {n: d.detach().float() for n, d in delta_tensors([{k: v.float() for k, v in t.items()} for t in taus], coefficients.float(), groups, granularity).items()}


def adamerge_suite(
    suite,
    taus: Sequence[Mapping[str, torch.Tensor]],
    tasks: Sequence[str],
    spec: AdaMergingSpec,
    *,
    split: str = "validation",
    labels: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> AdaMergingResult:
    """AdaMerging on a :class:`taskvec.suite.Suite`: its encoder, each task's frozen head, its ``split``'s texts (no labels).

    ``tasks`` give the entropy; ``taus`` (labelled by ``labels``) are merged. Without
    ``labels`` vector ``i`` is named after task ``i`` and the counts must match.
    """
    if labels is None and len(taus) != len(tasks):
        raise TaskvecError(f"AdaMerging pairs vectors with tasks: got {len(taus)} vectors for {len(tasks)} tasks (or pass labels)")
    if split not in suite.sets:
        raise TaskvecError(f"split {split!r} was not loaded (loaded: {', '.join(suite.splits)})")
    sets = suite.sets[split]
    batches = {t: sets[t].batches for t in tasks}
    models = {t: suite.models[t] for t in tasks}
    return adamerge(models, suite.encoder, taus, batches, spec, place=suite.policy.batch, labels=labels, log=log)
