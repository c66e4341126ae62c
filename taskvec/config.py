"""Typed parameters for tasks, fine-tuning, evaluation and the λ search.

``params.yaml`` is validated into :class:`Params` with pydantic v2. Every model
refuses unknown keys and wrong types (``extra="forbid"``), so a typo in the file
fails loudly instead of silently falling back to a default. :func:`load_params`
turns any problem into a one-line :class:`~taskvec.errors.TaskvecError` that
names the offending key, e.g. ``params.yaml: train.steps: Input should be a
valid integer``.

Extending: pipeline sections (edit/merge/register, ...) are added as new fields
on :class:`Params` (or a subclass passed to ``load_params(path, model=...)``),
each typed by its own ``_Strict`` model. A command validates the file it is
given with the schema that knows all its sections (the pipeline's
``PipelineParams`` for the full ``taskvec`` command).

:func:`load_params` is the one YAML reader of params files. It parses and
validates a file once per process for each distinct content (a small memo
keyed on the resolved path, the schema and the sha256 of the bytes, so an edit
is never missed) and hands each caller its own deep copy.

Merge-method options (``method``, ``density``, ``drop``, ``seed``) in any
schema come from :class:`MergeSpec` (built on :data:`MergeMethod`,
:func:`merge_option` and :func:`check_merge_options`), which delegates to the
registry in :mod:`taskvec.methods`: the same checks and one-line messages as
the engine.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt, PrivateAttr, ValidationError, model_validator

from taskvec import methods as _methods
from taskvec.errors import TaskvecError

DEFAULT_BASE = "sentence-transformers/all-MiniLM-L6-v2"
SPLITS = ("train", "validation", "test")


class _Strict(BaseModel):
    """Base for every parameter model: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _as_value_error(check):
    """A registry check as a pydantic validator: its TaskvecError becomes a ValueError (same message)."""

    def run(value: Any) -> Any:
        try:
            return check(value)
        except TaskvecError as exc:
            raise ValueError(str(exc)) from None

    return run


# a merge method name, checked by the registry (unknown names get the engine's message)
MergeMethod = Annotated[Literal[_methods.METHOD_NAMES], BeforeValidator(_as_value_error(_methods.check_method))]


def merge_option(name: str) -> Any:
    """The pydantic type of merge option ``name``: its declared type, range-checked by the registry."""
    opt = _methods.OPTIONS[name]
    return Annotated[opt.type, AfterValidator(_as_value_error(opt.check))]


def check_merge_options(method: str, **options: Any) -> None:
    """:func:`taskvec.methods.validate` for a model validator (an option the method does not take is refused)."""
    _as_value_error(lambda m: _methods.validate(m, options))(method)


class MergeSpec(_Strict):
    """A merge method and its options, as a schema section declares them (``method``, ``density``, ``drop``; a
    subclass may add ``seed: merge_option("seed")``), checked by the registry like the engine's options."""

    method: MergeMethod = "sum"
    density: merge_option("density") = _methods.OPTIONS["density"].default
    drop: merge_option("drop") = _methods.OPTIONS["drop"].default

    def check_merge(self) -> None:
        """Refuse an option the method does not take (a ValueError with the registry's message)."""
        check_merge_options(self.method, **{name: getattr(self, name) for name in _methods.OPTIONS if name in type(self).model_fields})

    @model_validator(mode="after")
    def _check(self) -> MergeSpec:
        self.check_merge()
        return self


class RowCaps(_Strict):
    """Optional per-split row caps (``None`` = use every row)."""

    train: PositiveInt | None = None
    validation: PositiveInt | None = None
    test: PositiveInt | None = None

    def get(self, split: str) -> int | None:
        return getattr(self, split, None)


class TaskSpec(_Strict):
    """One task: where its data lives and what its labels are.

    ``source`` is a local mirror folder (``../shared/data/sst2``) or a Hugging
    Face hub dataset id (``stanfordnlp/sst2``); see :mod:`taskvec.data` for how
    it is resolved. ``labels`` are the class names in class-index order.
    ``descriptions`` (one per label) replace the label names as the text that
    the zero-shot head embeds. ``kind: mlm`` tasks are unlabelled text used for
    masked-language-model fine-tuning and declare no labels.
    """

    name: str = Field(min_length=1)
    source: str = Field(min_length=1)
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] = Field(default_factory=list)
    descriptions: list[str] | None = None
    kind: Literal["classification", "mlm"] = "classification"
    max_rows: RowCaps = Field(default_factory=RowCaps)

    @model_validator(mode="after")
    def _check_labels(self) -> TaskSpec:
        if self.kind == "classification":
            if len(self.labels) < 2:
                raise ValueError("a classification task needs at least 2 labels")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"labels must be unique, got {self.labels}")
        elif self.labels:
            raise ValueError("an mlm task declares no labels")
        if self.descriptions is not None and len(self.descriptions) != len(self.labels):
            raise ValueError(
                f"descriptions has {len(self.descriptions)} entries for {len(self.labels)} labels"
            )
        return self

    @property
    def head_texts(self) -> list[str]:
        """The texts embedded to build this task's zero-shot head."""
        return list(self.descriptions) if self.descriptions is not None else list(self.labels)


class TrainSpec(_Strict):
    """Fine-tuning budget. Defaults fit one MiniLM task in a few minutes on 2 CPU cores."""

    steps: PositiveInt = 300
    batch_size: PositiveInt = 16
    max_length: PositiveInt = 64
    lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    mlm_probability: float = Field(default=0.15, gt=0, lt=1)
    # mlm tasks on an encoder that ships no MLM head (all-MiniLM-L6-v2): first fit the fresh head alone,
    # encoder frozen, for this many steps at mlm_head_lr, so the encoder's steps (and its task vector)
    # adapt it to the text instead of to a random head; 0 = train everything from the first step
    mlm_head_steps: int = Field(default=0, ge=0)
    mlm_head_lr: float = Field(default=1e-3, gt=0)
    # tied: the MLM decoder is the word-embedding matrix (BERT's layout), so its output-side updates land in
    # the encoder's embeddings and its task vector; copy: it starts as a copy and is discarded with the head
    mlm_decoder: Literal["tied", "copy"] = "tied"
    seed: int = 0
    # lora: train a peft LoRA adapter on the encoder (classification tasks; needs taskvec[lora]);
    # the merged encoder is saved as usual and the adapter beside it in adapter/
    method: Literal["full", "lora"] = "full"
    lora_r: PositiveInt = 8
    lora_alpha: float = Field(default=16.0, gt=0)
    lora_targets: list[str] = Field(default_factory=lambda: ["query", "value"])


class EvalSpec(_Strict):
    """Evaluation batch shape and per-split row caps (caps keep the λ search cheap)."""

    batch_size: PositiveInt = 128
    max_length: PositiveInt = 64
    max_rows: RowCaps = Field(default_factory=lambda: RowCaps(validation=1000, test=None))
    seed: int = 0


class AdaMergingSpec(_Strict):
    """Layer-wise AdaMerging (Yang et al., ICLR 2024): coefficients trained on unlabelled validation text.

    ``init``: every coefficient's start (the paper's 0.3); ``steps`` Adam steps
    of ``lr`` on batches of ``batch_size`` texts per task; ``granularity``:
    one coefficient per task and ``layer`` (each transformer block, plus one
    for the embeddings and the rest) or per ``task`` only.
    """

    init: float = 0.3
    steps: PositiveInt = 40
    lr: float = Field(default=0.01, gt=0)
    batch_size: PositiveInt = 16
    granularity: Literal["layer", "task"] = "layer"
    seed: int = 0


class SearchSpec(_Strict):
    """λ search over ``grid_points`` evenly spaced λ in [lambda_min, lambda_max].

    ``grid`` evaluates every point (the paper's 21 on [0, 1]); ``golden``
    searches the same lattice in at most ``max_evals`` evaluations.

    Control tasks (negation's, an edit plan's ``control``) may lose at most
    ``max_control_drop`` accuracy points against the base: the one-sided
    ``control_confidence`` upper bound of the drop (paired standard error over
    the same rows) must stay within it (:class:`taskvec.search.ControlConstraint`).
    Controls are scored on up to ``control_rows`` rows of the search split
    (``null``: all), more than ``eval.max_rows`` gives the targets, so the
    bound is tight enough to allow an edit. ``control_splits`` (e.g.
    ``[validation, train]``) takes the controls' rows from those splits
    instead: a control whose train split no vector of the edit learned from
    is held-out data there too, and 10,000 rows bound a drop ~2.2× tighter
    than 2,000. It is refused when a control task's own vector is in the edit
    (:func:`control_splits_conflict`).

    ``per_task`` searches one λ per vector in at most ``max_evals`` evaluations
    (:mod:`taskvec.coefficients`); ``adamerging`` learns per-layer, per-task
    coefficients by entropy minimisation (:mod:`taskvec.adamerging`, options
    in ``adamerging``). Both judge every candidate's controls as golden and
    grid do (the upper bound of the paired drop).
    """

    strategy: Literal["golden", "grid", "per_task", "adamerging"] = "golden"
    grid_points: int = Field(default=21, ge=2)
    max_evals: PositiveInt = 8
    lambda_min: float = 0.0
    lambda_max: float = 1.0
    split: Literal["validation", "test"] = "validation"
    max_control_drop: float = Field(default=1.0, ge=0)
    control_confidence: float = Field(default=0.95, ge=0.5, lt=1)
    control_rows: PositiveInt | None = 2000
    control_splits: list[Literal["validation", "train"]] | None = None
    adamerging: AdaMergingSpec = Field(default_factory=lambda: AdaMergingSpec())

    @model_validator(mode="after")
    def _check_range(self) -> SearchSpec:
        if not self.lambda_min < self.lambda_max:
            raise ValueError(f"lambda_min ({self.lambda_min}) must be below lambda_max ({self.lambda_max})")
        if self.control_splits is not None and (not self.control_splits or len(set(self.control_splits)) != len(self.control_splits)):
            raise ValueError(f"control_splits must name validation and/or train, each once (got {self.control_splits}); null: the search split")
        return self


def control_splits_conflict(spec: SearchSpec, controls: Iterable[str], trained: Iterable[str]) -> str | None:
    """Why scoring these controls on ``spec.control_splits`` is refused, or ``None``:
    a control's train rows are not held out when a vector of the edit was fine-tuned on them (``trained``)."""
    if "train" not in (spec.control_splits or ()):
        return None
    learned = set(trained)
    for control in controls:
        if control in learned:
            return (
                f"search.control_splits includes train, but the edit uses the vector of control task {control!r}, "
                "fine-tuned on those rows: they are not held out (drop train from search.control_splits)"
            )
    return None


class Params(_Strict):
    """Root of ``params.yaml``. Task names default to their key under ``tasks``."""

    base: str = DEFAULT_BASE
    data_dir: str = "../shared/data"
    tasks: dict[str, TaskSpec] = Field(default_factory=dict)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)

    _root: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="before")
    @classmethod
    def _name_tasks(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
            tasks = {}
            for key, spec in data["tasks"].items():
                if isinstance(spec, dict):
                    spec = {"name": key, **spec}
                    if spec["name"] != key:
                        raise ValueError(f"tasks.{key}.name is {spec['name']!r}; it must equal its key")
                tasks[key] = spec
            data = {**data, "tasks": tasks}
        return data

    def data_root(self) -> Path:
        """``data_dir`` as an absolute path (relative paths are relative to the params file)."""
        return (self._root / self.data_dir).resolve()

    def task(self, name: str) -> TaskSpec:
        """The task called ``name``; a one-line error lists the known ones otherwise."""
        try:
            return self.tasks[name]
        except KeyError:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise TaskvecError(f"unknown task {name!r} (params declare: {known})") from None


P = TypeVar("P", bound=Params)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def parse_params(data: object, *, source: str = "params", root: Path | None = None, model: type[P] = Params) -> P:
    """Validate an already-parsed mapping; errors name ``source`` and the offending key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TaskvecError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        params = model.model_validate(data)
    except ValidationError as exc:
        raise TaskvecError(f"{source}: {_first_error(exc)}") from None
    if root is not None:
        params._root = root
    return params


_MEMO: OrderedDict[tuple, Params] = OrderedDict()
_MEMO_SIZE = 32
_MEMO_LOCK = threading.Lock()


def _parse_yaml(path: Path, text: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TaskvecError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TaskvecError(f"params file not found: {path}") from None
    except OSError as exc:
        raise TaskvecError(f"cannot read params file {path}: {exc.strerror}") from None


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskvecError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def load_params(
    path: str | Path = "params.yaml", *, model: type[P] = Params, overrides: list[str] | tuple[str, ...] | None = None, with_mapping: bool = False
) -> P | tuple[P, dict]:
    """Read and validate a YAML params file; relative ``data_dir`` is resolved against its folder.

    The one reader of params files. A file is parsed and validated once per
    process for each distinct content and schema (memo keyed on resolved path,
    ``model`` and the sha256 of its bytes); every call returns its own deep copy,
    so a caller may modify what it gets. ``overrides`` (``-S key.path=value``,
    see :mod:`taskvec.overrides`) are applied to the file's mapping before
    validation, once the file itself is valid (its own errors come first).
    ``with_mapping``: return ``(params, mapping)``, the mapping being what was
    validated (the file's, with the overrides applied), from the same single
    parse of the file's bytes.
    """
    path = Path(path)
    raw = _read_bytes(path)
    key = (str(path.resolve()), model, hashlib.sha256(raw).digest())
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
        if hit is not None:
            _MEMO.move_to_end(key)
    data = None
    if hit is None:
        data = _parse_yaml(path, _decode(path, raw))
        hit = parse_params(data, source=str(path), root=path.resolve().parent, model=model)
        with _MEMO_LOCK:
            _MEMO[key] = hit
            while len(_MEMO) > _MEMO_SIZE:
                _MEMO.popitem(last=False)
    if not (overrides or with_mapping):
        return hit.model_copy(deep=True)
    if data is None:  # validated before (memo): the mapping comes from these same bytes
        data = _parse_yaml(path, _decode(path, raw))
    data = data or {}  # the file is valid, so this is a mapping
    if overrides:
        from taskvec.overrides import apply_overrides

        data = apply_overrides(data, list(overrides))
        params = parse_params(data, source=f"{path} with -S", root=path.resolve().parent, model=model)
    else:
        params = hit.model_copy(deep=True)
    return (params, data) if with_mapping else params
