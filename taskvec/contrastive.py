"""Unsupervised SimCSE (Gao et al., EMNLP 2021): a domain objective natural to a sentence encoder.

Each text is encoded twice with dropout on; the two views of a text are a
positive pair and the other texts of the batch are negatives (InfoNCE over
cosine similarities of the mean-pooled, normalised sentence embeddings — the
embedding all-MiniLM-L6-v2 was trained to produce — at temperature
``temperature``). Unlike masked-language modelling it needs no output head, so
the whole update lands in the encoder and nothing is spent adapting a fresh
vocabulary projection (MiniLM ships without an MLM head).

:func:`simcse` trains an encoder in place on unlabelled texts with the
budget of a :class:`~taskvec.config.TrainSpec` (steps, batch size, lr,
weight decay, warm-up, max length, seed): AdamW, linear warm-up then linear
decay, the first ``steps × batch_size`` texts of a seeded shuffle, seeded
dropout — the same texts and budget the masked-LM fine-tune would use.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from taskvec.config import TrainSpec
from taskvec.errors import TaskvecError
from taskvec.heads import sentence_embedding

TEMPERATURE = 0.05  # SimCSE's


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Cross-entropy of row i of ``a`` against every row of ``b``, the target being row i (unit-norm rows)."""
    logits = a @ b.T / temperature
    return nn.functional.cross_entropy(logits, torch.arange(len(a), device=a.device))


def simcse(
    encoder: nn.Module,
    tokenizer,
    texts: Sequence[str],
    train: TrainSpec,
    *,
    temperature: float = TEMPERATURE,
    place: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None,
) -> list[tuple[int, float]]:
    """Train ``encoder`` in place by unsupervised SimCSE; returns ``(step, loss)`` every ``steps // 10`` steps."""
    texts = [t for t in texts if t and t.strip()]
    if len(texts) < 2:
        raise TaskvecError("SimCSE needs at least 2 non-empty texts")
    device = next(encoder.parameters()).device
    place = place or (lambda b: {k: v.to(device) for k, v in b.items()})
    order = list(range(len(texts)))
    random.Random(train.seed).shuffle(order)
    rows = [texts[i] for i in order[: train.steps * train.batch_size]]
    decay = [p for n, p in encoder.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in encoder.named_parameters() if p.ndim <= 1]
    optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=train.lr)
    warm = int(train.warmup_ratio * train.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (train.steps - s) / max(1, train.steps - warm))
    )
    torch.manual_seed(train.seed)
    was_training = encoder.training
    encoder.train()
    losses = []
    every = max(1, train.steps // 10)
    try:
        for step in range(train.steps):
            lo = (step * train.batch_size) % len(rows)
            chunk = rows[lo : lo + train.batch_size]
            if len(chunk) < 2:
                chunk = rows[: train.batch_size]
            batch = place(tokenizer(chunk, padding=True, truncation=True, max_length=train.max_length, return_tensors="pt"))
            a, b = sentence_embedding(encoder, **batch), sentence_embedding(encoder, **batch)
            loss = info_nce(a, b, temperature)
            if not torch.isfinite(loss):
                raise TaskvecError(f"SimCSE diverged at step {step + 1} (loss {float(loss)}); lower train.lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            optimiser.zero_grad(set_to_none=True)
            if step == 0 or (step + 1) % every == 0:
                losses.append((step + 1, float(loss.detach())))
    finally:
        encoder.train(was_training)
    return losses
