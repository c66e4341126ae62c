"""Fine-tune the shared encoder of a base model on one task, with ``transformers.Trainer``.

Two recipes, both of which save only the *encoder*, in the base model's own
format (``AutoModel`` tensor names, ``save_pretrained(safe_serialization=True)``),
so ``taskvec extract BASE FINETUNED`` diffs the two folders directly:

* **classification** — the paper's recipe: the task's zero-shot head
  (:mod:`taskvec.heads`, built from the *base* encoder) stays frozen and only
  the encoder trains, with cross-entropy on ``SCALE * cos(embedding, label)``.
  The head is written beside the encoder as ``heads/<task>.safetensors``.
* **mlm** — masked-language modelling on unlabelled text
  (``AutoModelForMaskedLM`` + ``DataCollatorForLanguageModeling``). Encoders
  such as all-MiniLM-L6-v2 ship no MLM head, so transformers initialises one
  (seeded); it is discarded after training. Tensors the MLM model lacks (e.g.
  BERT's pooler) keep the base values, so their task-vector entries are zero.

Training is seeded (``transformers.set_seed``; data order, masking and head
init follow ``TrainSpec.seed``) and, on CPU, runs with
``torch.use_deterministic_algorithms(True)``, so a rerun on the same machine
gives the same weights. A GPU is used when present. The training rows are the
first ``steps * batch_size`` rows of a seeded shuffle of the train split (each
row seen at most once unless the split is smaller), batched by similar length
(Trainer's ``group_by_length`` sampler) to cut padding on CPU.

The output folder is written atomically (temp folder beside it, then renamed)
and also holds ``finetune.json``: task, base, budget, data lineage, loss curve,
wall time and library versions.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from transformers import (
    AutoModelForMaskedLM,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

from taskvec.config import Params, TaskSpec, TrainSpec
from taskvec.data import Split, load_split
from taskvec.errors import TaskvecError
from taskvec.heads import EncoderClassifier, build_head, load_encoder, save_head, state_hash
from taskvec.io import atomic_dir, resolve_model

MANIFEST = "finetune.json"


@dataclass
class FinetuneResult:
    """What a fine-tune produced; ``manifest`` is what ``finetune.json`` holds."""

    out_dir: Path
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Turn on ``torch.use_deterministic_algorithms`` for the block, then restore the previous mode."""
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled or previous, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def training_rows(split: Split, train: TrainSpec) -> datasets.Dataset:
    """The first ``steps * batch_size`` rows of a seeded shuffle (all rows if fewer)."""
    rows = split.dataset.shuffle(seed=train.seed)
    return rows.select(range(min(len(rows), train.steps * train.batch_size)))


def _tokenize(rows: datasets.Dataset, tokenizer, max_length: int) -> datasets.Dataset:
    keep = ["label"] if "label" in rows.column_names else []
    return rows.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=[c for c in rows.column_names if c not in keep],
    )


def _arguments(train: TrainSpec, workdir: Path, progress: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(workdir),
        max_steps=train.steps,
        per_device_train_batch_size=train.batch_size,
        learning_rate=train.lr,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_ratio,  # a value < 1 is a fraction of max_steps
        lr_scheduler_type="linear",
        seed=train.seed,
        data_seed=train.seed,
        train_sampling_strategy="group_by_length",
        logging_strategy="steps",
        logging_steps=max(1, train.steps // 10),
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def _run_trainer(model, rows, tokenizer, collator, train: TrainSpec, workdir: Path, progress: bool) -> list[tuple[int, float]]:
    args = _arguments(train, workdir / "trainer", progress)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, processing_class=tokenizer)
    if not progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    with deterministic(args.device.type == "cpu"):
        trainer.train()
    shutil.rmtree(workdir / "trainer", ignore_errors=True)
    return [(int(log["step"]), float(log["loss"])) for log in trainer.state.log_history if "loss" in log]


def finetune_task(
    base: str | Path,
    spec: TaskSpec,
    train: TrainSpec,
    out_dir: str | Path,
    *,
    data_dir: str | Path,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``base``'s encoder on ``spec`` (classification or mlm) and write ``out_dir``.

    The data is loaded and validated before the model is touched, so bad data
    fails in well under a second.
    """
    if train.method == "lora" and spec.kind != "classification":
        raise TaskvecError(f"train.method lora supports classification tasks; {spec.name} is {spec.kind} (use method: full)")
    split = load_split(spec, data_dir, "train", seed=train.seed)
    base_path = resolve_model(base)
    transformers.set_seed(train.seed)
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        if spec.kind == "classification":
            losses, base_hash = _finetune_classifier(base_path, spec, split, train, tmp, progress)
        else:
            losses, base_hash = _finetune_mlm(base_path, split, train, tmp, progress)
        seconds = time.perf_counter() - started
        manifest = {
            "task": spec.name,
            "kind": spec.kind,
            "base": str(base),
            "base_path": str(base_path),
            "base_state_sha256": base_hash,
            "train": train.model_dump(exclude=None if train.method == "lora" else {"method", "lora_r", "lora_alpha", "lora_targets"}),
            "data": split.lineage() | {"rows_trained": min(len(split.dataset), train.steps * train.batch_size)},
            "losses": losses,
            "seconds": round(seconds, 2),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "datasets": datasets.__version__,
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return FinetuneResult(Path(out_dir), seconds, losses, manifest)


def _finetune_classifier(base_path: Path, spec: TaskSpec, split: Split, train: TrainSpec, tmp: Path, progress: bool):
    encoder, tokenizer, _ = load_encoder(base_path, dtype=torch.float32)
    base_hash = state_hash(encoder)
    head = build_head(encoder, tokenizer, spec.name, spec.labels, spec.head_texts, max_length=train.max_length)
    trained = _with_lora(encoder, train) if train.method == "lora" else encoder
    model = EncoderClassifier(trained, head)
    rows = _tokenize(training_rows(split, train), tokenizer, train.max_length)
    losses = _run_trainer(model, rows, tokenizer, DataCollatorWithPadding(tokenizer), train, tmp, progress)
    if trained is not encoder:  # LoRA: keep the adapter, save the merged encoder (what extract diffs)
        trained.save_pretrained(tmp / "adapter")
        encoder = trained.merge_and_unload()
    encoder.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    save_head(head, tmp / "heads" / f"{spec.name}.safetensors")
    return losses, base_hash


def _with_lora(encoder, train: TrainSpec):
    """The encoder wrapped in a peft LoRA model: only the adapters (r, alpha, target modules) train."""
    try:
        import peft
    except ImportError:
        raise TaskvecError("train.method lora needs peft: pip install 'taskvec[lora]'") from None
    config = peft.LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, target_modules=list(train.lora_targets), lora_dropout=0.0, bias="none")
    try:
        return peft.get_peft_model(encoder, config)
    except ValueError as exc:  # e.g. no module matches the targets
        raise TaskvecError(f"train.lora_targets {train.lora_targets}: {str(exc).splitlines()[0]}") from None


def _finetune_mlm(base_path: Path, split: Split, train: TrainSpec, tmp: Path, progress: bool):
    encoder, tokenizer, _ = load_encoder(base_path, dtype=torch.float32)
    base_hash = state_hash(encoder)
    if tokenizer.mask_token is None:
        raise TaskvecError(f"cannot fine-tune {base_path} as a masked language model: its tokenizer has no mask token")
    mlm = AutoModelForMaskedLM.from_pretrained(base_path, dtype=torch.float32)
    start, base_state = mlm.base_model.state_dict(), encoder.state_dict()
    if any(name not in base_state or not torch.equal(t, base_state[name]) for name, t in start.items()):
        raise TaskvecError(f"the masked-LM model of {base_path} does not start from the base encoder's weights")
    rows = _tokenize(training_rows(split, train), tokenizer, train.max_length)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=train.mlm_probability, seed=train.seed)
    losses = _run_trainer(mlm, rows, tokenizer, collator, train, tmp, progress)
    encoder.load_state_dict(mlm.base_model.state_dict(), strict=False)  # names checked above
    encoder.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    return losses, base_hash


def finetune(task: str, params: Params, out_dir: str | Path, *, base: str | None = None, steps: int | None = None, progress: bool = True) -> FinetuneResult:
    """Fine-tune the task called ``task`` in ``params`` (``base``/``steps`` override the file)."""
    spec = params.task(task)
    train = params.train if steps is None else TrainSpec.model_validate(params.train.model_dump() | {"steps": steps})
    return finetune_task(base or params.base, spec, train, out_dir, data_dir=params.data_root(), progress=progress)
