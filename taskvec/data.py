"""Task data: resolve a task's source, load its splits through ``datasets``, validate them.

Resolution of ``TaskSpec.source`` (first match wins):

1. ``source`` is an existing folder → that local mirror;
2. ``<data_dir>/<task name>`` or ``<data_dir>/<basename of source>`` exists →
   that mirror (so a hub id such as ``stanfordnlp/sst2`` still runs offline
   when ``../shared/data/sst2`` is there);
3. otherwise ``source`` is a Hugging Face hub dataset id.

A mirror folder holds ``{train,validation,test}.csv`` with a header row; the
label column holds class *names*. Every loaded split is normalised to the
columns ``text`` (str) and, for classification tasks, ``label`` (int class
index into ``TaskSpec.labels``), and carries a content digest for lineage:
sha256 of the CSV bytes for mirrors, sha256 of the dataset fingerprint (plus
the hub id and split) for hub datasets.

Row caps are deterministic: the split is shuffled with ``datasets``'
``Dataset.shuffle(seed=seed)`` and its first N rows are kept. Uncapped
splits keep their file order.

Mirror CSVs are UTF-8: a leading byte-order mark is stripped (so the first
column is ``text``, not ``\ufefftext``); any other encoding is refused with one
line naming the file and the byte offset of the first byte that is not UTF-8
(re-save the file as UTF-8; latin-1 is not guessed).

Problems are refused with a one-line :class:`~taskvec.errors.TaskvecError`
before any training starts: missing folder or file, file not UTF-8, missing
text or label column, unknown (or empty) label value (naming the value and the
1-based data row), and empty split. :func:`validate_tasks` checks every split
of every task an edit plan uses, so a bad label in a control task's test split
is refused before the first fine-tune, not after the search.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from taskvec.config import TaskSpec
from taskvec.errors import TaskvecError


@dataclass(frozen=True)
class Split:
    """One loaded split: normalised rows plus lineage."""

    task: str
    name: str
    dataset: datasets.Dataset
    digest: str
    origin: str
    rows_total: int
    origins: tuple[str, ...] = ()  # the splits' origins, when these rows come from several (load_rows)

    def lineage(self) -> dict[str, object]:
        """JSON-able description of where these rows came from (``origin``: a list for rows of several splits)."""
        return {
            "task": self.task,
            "split": self.name,
            "origin": list(self.origins) if self.origins else self.origin,
            "sha256": self.digest,
            "rows_total": self.rows_total,
            "rows_used": len(self.dataset),
        }


@dataclass(frozen=True)
class Source:
    """A resolved task source: a mirror folder or a hub dataset id."""

    kind: str  # "mirror" | "hub"
    location: str


def resolve_source(spec: TaskSpec, data_dir: str | Path) -> Source:
    """Apply the resolution order documented in the module docstring."""
    direct = Path(spec.source).expanduser()
    if direct.is_dir():
        return Source("mirror", str(direct.resolve()))
    root = Path(data_dir).expanduser()
    for candidate in (root / spec.name, root / Path(spec.source).name):
        if candidate.is_dir():
            return Source("mirror", str(candidate.resolve()))
    if spec.source.startswith((".", "/", "~")) or spec.source.count("/") > 1:
        raise TaskvecError(f"task {spec.name}: data folder not found: {spec.source}")
    return Source("hub", spec.source)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_utf8(spec: TaskSpec, path: Path) -> None:
    """Refuse a file that is not UTF-8, naming the byte offset of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    fed = 0
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            pending = decoder.getstate()[0]
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                data = pending + block
                offset = fed - len(pending) + exc.start
                raise TaskvecError(
                    f"task {spec.name}: {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at byte offset {offset}); re-save it as UTF-8"
                ) from None
            fed += len(block)
        pending = decoder.getstate()[0]
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise TaskvecError(
                f"task {spec.name}: {path} is not UTF-8 text (truncated character at byte offset {fed - len(pending)}); re-save it as UTF-8"
            ) from None


def _read_mirror(spec: TaskSpec, folder: Path, split: str) -> tuple[datasets.Dataset, str, str]:
    path = folder / f"{split}.csv"
    if not path.is_file():
        raise TaskvecError(f"task {spec.name}: missing file {path}")
    _check_utf8(spec, path)
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a byte-order mark is not part of the first column's name
        header = next(csv.reader(handle), None) or []
    _check_columns(spec, header, str(path))
    # Every column is read as a string so that label names such as "1" stay names.
    features = datasets.Features({column: datasets.Value("string") for column in header})
    try:
        with _quiet():
            dataset = datasets.load_dataset("csv", data_files={split: str(path)}, split=split, features=features, encoding="utf-8-sig")
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; report one line
        if _is_empty_csv(path):
            raise TaskvecError(f"task {spec.name}: split {split} is empty ({path})") from None
        raise TaskvecError(f"task {spec.name}: cannot read {path}: {exc}") from None
    return dataset, _sha256_file(path), str(path)


def _is_empty_csv(path: Path) -> bool:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        return next(reader, None) is None


@contextlib.contextmanager
def _quiet():
    """No ``datasets`` progress bars on stderr: errors stay one line, logs stay readable."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read_hub(spec: TaskSpec, hub_id: str, split: str) -> tuple[datasets.Dataset, str, str]:
    try:
        with _quiet():
            dataset = datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, unknown split...
        raise TaskvecError(f"task {spec.name}: cannot load hub dataset {hub_id} split {split}: {exc}") from None
    _check_columns(spec, dataset.column_names, f"{hub_id}[{split}]")
    digest = hashlib.sha256(f"{hub_id}\0{split}\0{dataset._fingerprint}".encode()).hexdigest()
    return dataset, digest, f"hf://datasets/{hub_id}[{split}]"


def _check_columns(spec: TaskSpec, columns: list[str], where: str) -> None:
    needed = [spec.text_column] + ([spec.label_column] if spec.kind == "classification" else [])
    for column in needed:
        if column not in columns:
            raise TaskvecError(
                f"task {spec.name}: {where} has no column {column!r} (columns: {', '.join(columns) or 'none'})"
            )


def _normalise(spec: TaskSpec, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
    """Keep ``text`` (+ ``label`` as class index); refuse unknown labels naming value and row."""
    texts = dataset.data.column(spec.text_column).to_pylist()
    columns: dict[str, list] = {"text": ["" if text is None else str(text) for text in texts]}
    features = {"text": datasets.Value("string")}
    if spec.kind == "classification":
        raw = dataset.data.column(spec.label_column).to_pylist()
        feature = dataset.features[spec.label_column]
        if isinstance(feature, datasets.ClassLabel):
            raw = [None if value is None else feature.int2str(value) for value in raw]
        index = {name: i for i, name in enumerate(spec.labels)}
        labels = []
        for row, value in enumerate(raw, start=1):
            key = None if value is None else str(value)
            if key not in index:
                shown = "an empty label" if key in (None, "") else f"unknown label {key!r}"
                raise TaskvecError(
                    f"task {spec.name}: {where} data row {row} has {shown}"
                    f" (declared labels: {', '.join(spec.labels)})"
                )
            labels.append(index[key])
        columns["label"] = labels
        features["label"] = datasets.ClassLabel(names=list(spec.labels))
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def load_split(
    spec: TaskSpec,
    data_dir: str | Path,
    split: str,
    *,
    max_rows: int | None = None,
    seed: int = 0,
) -> Split:
    """Load, validate and (optionally) cap one split of ``spec``.

    ``max_rows`` defaults to ``spec.max_rows.<split>``; when both are set the
    smaller one wins.
    """
    source = resolve_source(spec, data_dir)
    if source.kind == "mirror":
        raw, digest, origin = _read_mirror(spec, Path(source.location), split)
    else:
        raw, digest, origin = _read_hub(spec, source.location, split)
    if len(raw) == 0:
        raise TaskvecError(f"task {spec.name}: split {split} is empty ({origin})")
    dataset = _normalise(spec, raw, origin)
    caps = [cap for cap in (max_rows, spec.max_rows.get(split)) if cap is not None]
    if caps and min(caps) < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(min(caps)))
    return Split(spec.name, split, dataset, digest, origin, len(raw))


def load_rows(
    spec: TaskSpec,
    data_dir: str | Path,
    splits: Sequence[str],
    *,
    max_rows: int | None = None,
    seed: int = 0,
) -> Split:
    """The rows of several splits of ``spec`` as one :class:`Split` (e.g. a control task scored on validation + train).

    One split is :func:`load_split`. Several are each loaded whole (up to
    their ``spec.max_rows``), concatenated in the order given, then capped to
    ``max_rows`` by the same seeded shuffle. The result is named
    ``"validation+train"``; its digest is the sha256 of the splits' digests,
    so lineage still pins every byte.
    """
    names = list(dict.fromkeys(splits))
    if not names:
        raise TaskvecError(f"task {spec.name}: no split given to load rows from")
    if len(names) == 1:
        return load_split(spec, data_dir, names[0], max_rows=max_rows, seed=seed)
    parts = [load_split(spec, data_dir, name, seed=seed) for name in names]
    dataset = datasets.concatenate_datasets([part.dataset for part in parts])
    if max_rows is not None and max_rows < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_rows))
    digest = hashlib.sha256("\0".join(part.digest for part in parts).encode()).hexdigest()
    origins = tuple(part.origin for part in parts)
    return Split(spec.name, "+".join(names), dataset, digest, " + ".join(origins), sum(part.rows_total for part in parts), origins)


def load_task(
    spec: TaskSpec,
    data_dir: str | Path,
    splits: tuple[str, ...] | None = None,
    *,
    max_rows: dict[str, int | None] | None = None,
    seed: int = 0,
) -> dict[str, Split]:
    """Load several splits (default: ``train`` for mlm tasks, all three otherwise)."""
    if splits is None:
        splits = ("train",) if spec.kind == "mlm" else ("train", "validation", "test")
    caps = max_rows or {}
    return {name: load_split(spec, data_dir, name, max_rows=caps.get(name), seed=seed) for name in splits}


def validate_tasks(params, names: Iterable[str]) -> dict[str, dict[str, int]]:
    """Load and check every split every named task uses, before any training starts.

    ``params`` is a :class:`taskvec.config.Params` (or a subclass); ``names``
    the tasks of an edit plan (fine-tuned, target and control tasks alike).
    Classification tasks need ``train``, ``validation`` and ``test``; mlm tasks
    ``train``. Each split goes through :func:`load_split` — file present,
    UTF-8, columns, every label declared, not empty — so the first problem is
    refused with one line. Returns ``{task: {split: rows}}``.
    """
    rows: dict[str, dict[str, int]] = {}
    for name in dict.fromkeys(names):
        spec = params.task(name)
        splits = ("train",) if spec.kind == "mlm" else ("train", "validation", "test")
        rows[name] = {split: load_split(spec, params.data_root(), split).rows_total for split in splits}
    return rows
