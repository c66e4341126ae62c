"""Frozen zero-shot classification heads, the paper's recipe for text encoders.

Task vectors cover the shared encoder only. Each task keeps its own *frozen*
head built, like CLIP's zero-shot heads, from the (base) encoder's embeddings
of the label names or descriptions:

* a text is embedded by mean-pooling the encoder's last hidden states over the
  attention mask, then L2-normalising (the sentence-transformers recipe that
  all-MiniLM-L6-v2 was trained with);
* the head's rows are the normalised embeddings of the label texts;
* ``logits = SCALE * normalise(embedding) @ head.T`` with a fixed
  ``SCALE = 20`` — the inverse temperature all-MiniLM-L6-v2 was trained with
  (sentence-transformers' MultipleNegativesRankingLoss), so softmax
  probabilities are neither flat nor saturated on cosine similarities.

So the base model already has a measurable zero-shot accuracy and fine-tuning
moves only the encoder. Heads are stored as safetensors: one ``weight`` matrix
(labels × hidden) with the task name, label names, label texts, scale and the
hash of the encoder that built it in the header metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

from taskvec.errors import FormatError, HomologyError, TaskvecError
from taskvec.io import StreamingWriter, TensorSpec, resolve_model

SCALE = 20.0
HEAD_FORMAT = "taskvec-head/1"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average token states over the non-padding positions."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def sentence_embedding(encoder: nn.Module, **batch: torch.Tensor) -> torch.Tensor:
    """Mean-pooled, L2-normalised float32 embeddings of a tokenised batch."""
    hidden = encoder(**batch).last_hidden_state
    return nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]).float(), dim=-1)


def load_encoder(
    name_or_path: str | Path, *, dtype: torch.dtype | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase, Path]:
    """Load a model folder or hub id as a bare encoder (``AutoModel``) plus its tokenizer.

    ``dtype=None`` keeps the checkpoint's dtype; training asks for float32.
    """
    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = AutoModel.from_pretrained(path, dtype=dtype or "auto")
    except (OSError, ValueError, KeyError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaskvecError(f"cannot load encoder from {path}: {detail}") from None
    return encoder, tokenizer, path


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


Place = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


@torch.inference_mode()
def encode(
    encoder: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 128, place: Place | None = None
) -> torch.Tensor:
    """Embed ``texts`` (rows L2-normalised, float32, on CPU) with ``encoder`` in eval mode.

    ``place`` moves each tokenised batch to the encoder's device (default: ``.to(device_of(encoder))``).
    """
    was_training = encoder.training
    encoder.eval()
    device = device_of(encoder)
    place = place or (lambda batch: batch.to(device))
    chunks = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            batch = place(batch)
            chunks.append(sentence_embedding(encoder, **batch).cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


def state_hash(module: nn.Module) -> str:
    """sha256 over a module's state_dict (sorted names, dtypes, shapes and raw bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{data.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Head:
    """A task's frozen head: ``weight`` rows are unit vectors, one per label (class-index order)."""

    task: str
    labels: list[str]
    texts: list[str]
    weight: torch.Tensor
    encoder_hash: str
    scale: float = SCALE


def build_head(
    encoder: nn.Module,
    tokenizer,
    task: str,
    labels: Sequence[str],
    texts: Sequence[str] | None = None,
    *,
    max_length: int = 128,
    place: Place | None = None,
) -> Head:
    """Embed the label texts (default: the label names) with ``encoder`` (``place``: see :func:`encode`)."""
    texts = list(labels) if texts is None else list(texts)
    weight = encode(encoder, tokenizer, texts, max_length=max_length, place=place)
    return Head(task, list(labels), texts, weight, state_hash(encoder))


def save_head(head: Head, path: str | Path) -> Path:
    """Write ``head`` as safetensors atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": HEAD_FORMAT,
        "task": head.task,
        "labels": json.dumps(head.labels),
        "texts": json.dumps(head.texts),
        "encoder_hash": head.encoder_hash,
        "scale": repr(head.scale),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    weight = head.weight.detach().cpu().float().contiguous()
    # StreamingWriter: header keys in a fixed order (safetensors' save_file orders metadata at random), same bytes every time
    with StreamingWriter(tmp, [TensorSpec("weight", torch.float32, tuple(weight.shape))], metadata=metadata) as writer:
        writer.write("weight", weight)
    os.replace(tmp, path)
    return path


def load_head(path: str | Path) -> Head:
    """Read a head written by :func:`save_head`; refuses other files with a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"head file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != HEAD_FORMAT:
                raise FormatError(f"{path} is not a taskvec head (format {metadata.get('format')!r})")
            weight = handle.get_tensor("weight")
    except FormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise FormatError(f"cannot read head {path}: {exc}") from None
    return Head(
        task=metadata["task"],
        labels=json.loads(metadata["labels"]),
        texts=json.loads(metadata["texts"]),
        weight=weight,
        encoder_hash=metadata["encoder_hash"],
        scale=float(metadata["scale"]),
    )


class EncoderClassifier(nn.Module):
    """Encoder + frozen head: ``logits = scale * embed(x) @ head.T``.

    The head is a non-persistent buffer, so it never trains and the module's
    state_dict holds exactly the encoder's tensors under ``encoder.*``.
    ``forward`` takes the tokenizer's outputs (and optional ``labels`` for a
    cross-entropy loss) and returns a ``SequenceClassifierOutput``, so the
    module plugs into ``transformers.Trainer``.
    """

    def __init__(self, encoder: nn.Module, head: Head):
        super().__init__()
        hidden = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if hidden is not None and head.weight.shape[-1] != hidden:
            raise HomologyError(
                f"head {head.task} has width {head.weight.shape[-1]} but the encoder's hidden size is {hidden}"
            )
        self.encoder = encoder
        self.labels = list(head.labels)
        self.scale = head.scale
        weight = nn.functional.normalize(head.weight.float(), dim=-1)
        self.register_buffer("head", weight.to(device_of(encoder)), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        logits = self.scale * sentence_embedding(self.encoder, **batch) @ self.head.T
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
