"""Domain vectors for the analogy: τ_target_lm − τ_source_lm, and how it is built.

The paper's analogy τ_target ≈ τ_source + (τ_target_lm − τ_source_lm) needs
vectors that capture a *domain* (Yelp vs Amazon text) from unlabelled text.
all-MiniLM-L6-v2 ships without an MLM head, so the masked-LM fine-tunes
train a fresh head whose decoder is tied to the word embeddings: 94 % of an
LM vector's norm (6.0 of 6.4) lands in ``embeddings.*`` — fitting the new
head, not the domain — and the vectors are ~3.7× the classifier vectors.
:class:`~benchmarks.paper.spec.AnalogySpec` chooses:

* ``domain_objective``: ``mlm`` (the fine-tunes of the ``*_lm`` tasks) or
  ``simcse`` (unsupervised SimCSE, :mod:`taskvec.contrastive`, on the same
  texts with the same budget: no head to fit; cached under
  ``<out>/cache`` like the fine-tunes);
* ``lm_tensors``: ``all`` or ``layers`` (the difference without
  ``embeddings.*``);
* ``lm_norm``: ``none`` or ``source`` (the difference rescaled to the global
  L2 norm of τ_source, so neither term dominates the sum).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from benchmarks.paper.spec import AnalogySpec, ExperimentParams
from benchmarks.paper.vectors import _code_and_data, _key, global_norm, load_tau, train_spec_for


def ensure_simcse_vector(params: ExperimentParams, task: str, cache: Path, log: Callable[[str], None]) -> Path:
    """SimCSE-train the base encoder on ``task``'s train texts (unless cached) and extract its vector."""
    from taskvec import contrastive
    from taskvec.data import load_split
    from taskvec.engine import extract
    from taskvec.heads import load_encoder
    from taskvec.io import atomic_dir, file_sha256, resolve_model
    from taskvec.suite import device

    spec = params.task(task)
    train = train_spec_for(params, task)
    key = _key("simcse", params.base, str(resolve_model(params.base)), spec.model_dump(), train.model_dump(), str(params.data_root()),
               _code_and_data(spec, params), file_sha256(contrastive.__file__))
    ft_dir = cache / "finetune" / f"{task}-simcse-{key}"
    vec = cache / "vectors" / f"{task}-simcse-{key}.safetensors"
    if vec.is_file():
        log(f"[cache] SimCSE vector {task} ({vec.name})")
        return vec
    if not (ft_dir / "config.json").is_file():
        log(f"[simcse] {task} ({train.steps} steps × {train.batch_size}, lr {train.lr:g}) ...")
        encoder, tokenizer, _ = load_encoder(params.base, dtype=torch.float32)
        policy = device()
        policy.place(encoder)
        texts = list(load_split(spec, params.data_root(), "train", seed=train.seed).dataset["text"])
        losses = contrastive.simcse(encoder, tokenizer, texts, train, place=policy.batch)
        log(f"[simcse] {task} loss {losses[0][1]:.3f} → {losses[-1][1]:.3f}")
        with atomic_dir(ft_dir) as tmp:
            encoder.cpu().save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    vec.parent.mkdir(parents=True, exist_ok=True)
    extract(resolve_model(params.base), ft_dir, vec)
    return vec


def domain_difference(
    spec: AnalogySpec, taus: Mapping[str, Mapping[str, torch.Tensor]], params: ExperimentParams, cache: Path, log: Callable[[str], None]
) -> tuple[dict[str, torch.Tensor], dict]:
    """τ_target_lm − τ_source_lm as ``spec`` builds it, and a record of how (objective, tensors, norms, scale)."""
    if spec.domain_objective == "simcse":
        target_lm = load_tau(ensure_simcse_vector(params, spec.target_lm, cache, log))
        source_lm = load_tau(ensure_simcse_vector(params, spec.source_lm, cache, log))
    else:
        target_lm, source_lm = taus[spec.target_lm], taus[spec.source_lm]
    source = taus[spec.source]
    diff = {}
    for name, t in source.items():
        keep = spec.lm_tensors == "all" or not name.startswith("embeddings.")
        diff[name] = (target_lm[name].float() - source_lm[name].float()) if keep else torch.zeros_like(t, dtype=torch.float32)
    raw = global_norm(diff)
    scale = global_norm(source) / raw if spec.lm_norm == "source" and raw > 0 else 1.0
    if scale != 1.0:
        diff = {k: v * scale for k, v in diff.items()}
    record = {
        "domain_objective": spec.domain_objective,
        "lm_tensors": spec.lm_tensors,
        "lm_norm": spec.lm_norm,
        "norm": {"target_lm": global_norm(target_lm), "source_lm": global_norm(source_lm), "difference": raw, "source": global_norm(source)},
        "scale": scale,
    }
    return diff, record
