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
  ``train.mlm_decoder: copy`` unties the head's decoder from the word
  embeddings (a copy, discarded with the head), so the output layer's updates
  stay out of the vector; ``train.mlm_head_steps`` first fits the fresh head
  alone (encoder frozen; logged as steps ≤ 0) at ``train.mlm_head_lr``.

Training is seeded (``transformers.set_seed``; data order, masking and head
init follow ``TrainSpec.seed``) and runs on the harness's device policy
(:func:`taskvec.suite.device`: CUDA when available, else CPU; the Trainer is
told which) inside its deterministic mode
(``torch.use_deterministic_algorithms(True)``, plus cuBLAS's workspace
setting on CUDA), so a rerun on the same machine gives the same weights. The training rows are the
first ``steps * batch_size`` rows of a seeded shuffle of the train split (each
row seen at most once unless the split is smaller), batched by similar length
(Trainer's ``group_by_length`` sampler) to cut padding on CPU.

A fine-tune that diverges (a non-finite loss or weight, e.g. ``train.lr:
1.0e+6``) is refused with one line before anything is saved: the output
folder is not written.

The output folder is written atomically (temp folder beside it, then renamed)
and also holds ``finetune.json``: task, base, budget, data lineage, loss curve,
wall time and library versions.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
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
from taskvec.data import Split, load_split, resolve_source
from taskvec.errors import TaskvecError
from taskvec.heads import EncoderClassifier, build_head, load_encoder, save_head, state_hash
from taskvec.io import atomic_dir, check_output, resolve_model
from taskvec import suite as _suite
from taskvec.suite import DevicePolicy

MANIFEST = "finetune.json"


@dataclass
class FinetuneResult:
    """What a fine-tune produced; ``manifest`` is what ``finetune.json`` holds."""

    out_dir: Path
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)


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


def _arguments(train: TrainSpec, workdir: Path, progress: bool, policy: DevicePolicy) -> TrainingArguments:
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
        dataloader_pin_memory=policy.device.type == "cuda",
        use_cpu=policy.device.type == "cpu",
    )


def _run_trainer(model, rows, tokenizer, collator, train: TrainSpec, workdir: Path, progress: bool) -> list[tuple[int, float]]:
    policy = _suite.device()  # looked up per call: tests substitute the policy
    args = _arguments(train, workdir / "trainer", progress, policy)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, processing_class=tokenizer)
    if not progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    with policy.determinism():
        trainer.train()
    shutil.rmtree(workdir / "trainer", ignore_errors=True)
    return [(int(log["step"]), float(log["loss"])) for log in trainer.state.log_history if "loss" in log]


def _check_finite(model: torch.nn.Module, losses: list[tuple[int, float]], task: str, train: TrainSpec) -> None:
    """Refuse a diverged fine-tune (non-finite loss or weight) before its output is saved."""
    loss = next(((step, value) for step, value in losses if not math.isfinite(value)), None)
    tensor = next((name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if loss is None and tensor is None:
        return
    what = f"loss {loss[1]} at step {loss[0]}" if loss is not None else f"non-finite weights in {tensor}"
    raise TaskvecError(f"task {task}: the fine-tune diverged ({what}); nothing written: lower train.lr (now {train.lr:g})")


def finetune_task(
    base: str | Path,
    spec: TaskSpec,
    train: TrainSpec,
    out_dir: str | Path,
    *,
    data_dir: str | Path,
    progress: bool = True,
    force: bool = False,
    data_label: str | None = None,
) -> FinetuneResult:
    """Fine-tune ``base``'s encoder on ``spec`` (classification or mlm) and write ``out_dir``.

    The data is loaded and validated before the model is touched, so bad data
    fails in well under a second. ``finetune.json`` holds no absolute path and
    no wall time (same bytes wherever the checkout lives): the data origin is
    spelled from ``data_label`` (the params' ``data_dir``) when it lies under
    ``data_dir``, the base by its name and content hash.
    """
    if train.method == "lora" and spec.kind != "classification":
        raise TaskvecError(f"train.method lora supports classification tasks; {spec.name} is {spec.kind} (use method: full)")
    split = load_split(spec, data_dir, "train", seed=train.seed)
    base_path = resolve_model(base)
    source = resolve_source(spec, data_dir)
    inputs = [base_path] + ([Path(source.location)] if source.kind == "mirror" else [])
    dest = check_output(out_dir, inputs, kind="folder", force=force)  # never an input or foreign data
    transformers.set_seed(train.seed)
    started = time.perf_counter()
    with atomic_dir(dest) as tmp:
        if spec.kind == "classification":
            losses, base_hash = _finetune_classifier(base_path, spec, split, train, tmp, progress)
        else:
            losses, base_hash = _finetune_mlm(base_path, split, train, tmp, progress)
        seconds = time.perf_counter() - started
        manifest = {
            "task": spec.name,
            "kind": spec.kind,
            "base": str(base),
            "base_state_sha256": base_hash,
            "train": train.model_dump(exclude=None if train.method == "lora" else {"method", "lora_r", "lora_alpha", "lora_targets"}),
            "data": _portable_origin(split.lineage(), data_dir, data_label) | {"rows_trained": min(len(split.dataset), train.steps * train.batch_size)},
            "losses": losses,
            "device": _suite.device().device.type,
            "torch_threads": torch.get_num_threads(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "datasets": datasets.__version__,
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return FinetuneResult(Path(out_dir), seconds, losses, manifest)


def _portable_origin(lineage: dict, data_dir: str | Path, label: str | None) -> dict:
    """``lineage`` with an ``origin`` under ``data_dir`` written as ``label/<relative path>``."""
    if label is None:
        return lineage
    origin, root = Path(str(lineage.get("origin", ""))), Path(data_dir).resolve()
    if origin.is_absolute() and root in origin.resolve().parents:
        return {**lineage, "origin": (Path(label) / origin.resolve().relative_to(root)).as_posix()}
    return lineage


def _finetune_classifier(base_path: Path, spec: TaskSpec, split: Split, train: TrainSpec, tmp: Path, progress: bool):
    encoder, tokenizer, _ = load_encoder(base_path, dtype=torch.float32)
    base_hash = state_hash(encoder)
    head = build_head(encoder, tokenizer, spec.name, spec.labels, spec.head_texts, max_length=train.max_length)
    trained = _with_lora(encoder, train) if train.method == "lora" else encoder
    model = EncoderClassifier(trained, head)
    rows = _tokenize(training_rows(split, train), tokenizer, train.max_length)
    losses = _run_trainer(model, rows, tokenizer, DataCollatorWithPadding(tokenizer), train, tmp, progress)
    _check_finite(model, losses, spec.name, train)
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
    untie = train.mlm_decoder == "copy"
    mlm = AutoModelForMaskedLM.from_pretrained(base_path, dtype=torch.float32, **({"tie_word_embeddings": False} if untie else {}))
    if untie:  # the decoder starts as the word embeddings but is its own weight, discarded with the head
        with torch.no_grad():
            mlm.get_output_embeddings().weight.copy_(mlm.get_input_embeddings().weight)
    base_state = encoder.state_dict()

    def moved() -> bool:  # does the MLM model's encoder differ from the base encoder?
        return any(name not in base_state or not torch.equal(t, base_state[name]) for name, t in mlm.base_model.state_dict().items())

    if moved():
        raise TaskvecError(f"the masked-LM model of {base_path} does not start from the base encoder's weights")
    rows = _tokenize(training_rows(split, train), tokenizer, train.max_length)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=train.mlm_probability, seed=train.seed)
    losses = []
    if train.mlm_head_steps:  # fit the fresh head alone first: the encoder (and the tied decoder) stays frozen
        head = TrainSpec.model_validate(train.model_dump() | {"steps": train.mlm_head_steps, "lr": train.mlm_head_lr, "weight_decay": 0.0})
        frozen = [p for p in mlm.base_model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        head_rows = _tokenize(training_rows(split, head), tokenizer, train.max_length)
        losses = [(step - train.mlm_head_steps, loss) for step, loss in _run_trainer(mlm, head_rows, tokenizer, collator, head, tmp, progress)]
        for p in frozen:
            p.requires_grad_(True)
        if moved():
            raise TaskvecError("the MLM head warm-up moved encoder weights")  # a tied weight outside base_model would
    losses += _run_trainer(mlm, rows, tokenizer, collator, train, tmp, progress)
    encoder.load_state_dict(mlm.base_model.state_dict(), strict=False)  # names checked above
    _check_finite(encoder, losses, split.task, train)
    encoder.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    return losses, base_hash


def finetune(task: str, params: Params, out_dir: str | Path, *, base: str | None = None, steps: int | None = None, progress: bool = True, force: bool = False) -> FinetuneResult:
    """Fine-tune the task called ``task`` in ``params`` (``base``/``steps`` override the file)."""
    spec = params.task(task)
    train = params.train if steps is None else TrainSpec.model_validate(params.train.model_dump() | {"steps": steps})
    return finetune_task(base or params.base, spec, train, out_dir, data_dir=params.data_root(), progress=progress, force=force, data_label=params.data_dir)
