"""Task loading: resolution, normalisation, lineage digests, deterministic caps and refusals."""

from __future__ import annotations

import hashlib

import pytest

from taskvec.config import TaskSpec
from taskvec.data import load_split, load_task, resolve_source
from taskvec.errors import TaskvecError
from tests.conftest_tasks import LABELS, data_dir, sentiment_rows, write_csv  # noqa: F401 - data_dir is a fixture


def spec(source="senti", **kw):
    return TaskSpec(name=kw.pop("name", "senti"), source=source, labels=kw.pop("labels", LABELS), **kw)


def test_mirror_splits_are_normalised_with_file_digests(data_dir):
    splits = load_task(spec(), data_dir)
    assert set(splits) == {"train", "validation", "test"}
    train = splits["train"]
    rows = sentiment_rows(64)
    assert train.dataset.column_names == ["text", "label"]
    assert train.dataset["text"] == [text for text, _ in rows]
    assert train.dataset["label"] == [LABELS.index(label) for _, label in rows]
    path = data_dir / "senti" / "train.csv"
    assert train.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert train.lineage() == {
        "task": "senti", "split": "train", "origin": str(path), "sha256": train.digest, "rows_total": 64, "rows_used": 64,
    }


def test_resolution_prefers_folder_then_mirror_by_name_or_basename(data_dir, tmp_path):
    folder = data_dir / "senti"
    assert resolve_source(spec(str(folder), name="other"), tmp_path).location == str(folder.resolve())
    assert resolve_source(spec("someorg/whatever"), data_dir).location == str(folder.resolve())
    assert resolve_source(spec("someorg/senti", name="x"), data_dir).location == str(folder.resolve())
    hub = resolve_source(spec("someorg/elsewhere", name="x"), data_dir)
    assert (hub.kind, hub.location) == ("hub", "someorg/elsewhere")


def test_caps_are_a_deterministic_seeded_subset(data_dir):
    first = load_split(spec(), data_dir, "train", max_rows=10, seed=3).dataset["text"]
    again = load_split(spec(), data_dir, "train", max_rows=10, seed=3).dataset["text"]
    other = load_split(spec(), data_dir, "train", max_rows=10, seed=4).dataset["text"]
    everything = [text for text, _ in sentiment_rows(64)]
    assert first == again and len(first) == 10 and first != other
    assert set(first) <= set(everything) and first != everything[:10]
    capped = load_split(spec(max_rows={"train": 5}), data_dir, "train", max_rows=10)
    assert len(capped.dataset) == 5 and capped.rows_total == 64


def test_label_names_that_look_numeric_stay_names(tmp_path):
    write_csv(tmp_path / "nums" / "train.csv", [("a", "1"), ("b", "0"), ("c", "1")])
    split = load_split(spec(name="nums", labels=["1", "0"]), tmp_path, "train")
    assert split.dataset["label"] == [0, 1, 0]


def test_mlm_task_loads_text_only(data_dir):
    split = load_task(TaskSpec(name="senti_lm", source="senti_lm", kind="mlm"), data_dir)["train"]
    assert split.dataset.column_names == ["text"] and len(split.dataset) == 48


def test_custom_columns(tmp_path):
    write_csv(tmp_path / "c" / "train.csv", [("x", "positive", "1")], header=("sentence", "sentiment", "idx"))
    split = load_split(spec(name="c", text_column="sentence", label_column="sentiment"), tmp_path, "train")
    assert split.dataset[0] == {"text": "x", "label": 1}


@pytest.mark.parametrize(
    ("setup", "split", "expected"),
    [
        (lambda root: None, "train", "task senti: data folder not found: ./missing"),
        (lambda root: (root / "missing").mkdir(), "validation", "missing file"),
        (lambda root: write_csv(root / "missing" / "train.csv", [("x", "good")], header=("sentence", "label")), "train", "has no column 'text' (columns: sentence, label)"),
        (lambda root: write_csv(root / "missing" / "train.csv", [("x",)], header=("text",)), "train", "has no column 'label'"),
        (lambda root: write_csv(root / "missing" / "train.csv", [("a", "negative"), ("b", "neutral")]), "train", "data row 2 has unknown label 'neutral' (declared labels: negative, positive)"),
        (lambda root: write_csv(root / "missing" / "train.csv", [("a", "negative"), ("b", "")]), "train", "data row 2 has an empty label"),
        (lambda root: write_csv(root / "missing" / "train.csv", []), "train", "split train is empty"),
    ],
)
def test_refusals_are_one_line_and_name_the_cause(tmp_path, monkeypatch, setup, split, expected):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    with pytest.raises(TaskvecError) as err:
        load_split(spec("./missing"), tmp_path / "nowhere", split)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_unreachable_hub_dataset_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaskvecError, match="cannot load hub dataset someorg/absent split train"):
        load_split(spec("someorg/absent", name="absent"), tmp_path, "train")


def test_byte_order_mark_is_stripped(tmp_path):
    path = write_csv(tmp_path / "bom" / "train.csv", [("good film", "positive"), ("bad film", "negative")])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    split = load_split(spec(name="bom"), tmp_path, "train")
    assert split.dataset.column_names == ["text", "label"]
    assert split.dataset["text"] == ["good film", "bad film"] and split.dataset["label"] == [1, 0]
    assert split.digest == hashlib.sha256(path.read_bytes()).hexdigest()  # lineage: the file's bytes, BOM included


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("text,label\nun caf\xe9 fin,positive\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at byte offset 17)"),
        ("text,label\ngood,positive\nok \u00e9".encode() [:-1], "is not UTF-8 text (truncated character at byte offset 28)"),
    ],
)
def test_non_utf8_csv_is_one_line_naming_file_and_offset(tmp_path, payload, expected):
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "train.csv").write_bytes(payload)
    with pytest.raises(TaskvecError) as err:
        load_split(spec(name="enc"), tmp_path, "train")
    msg = str(err.value)
    assert expected in msg and str(tmp_path / "enc" / "train.csv") in msg and "\n" not in msg


def test_non_utf8_byte_after_the_first_block_gets_its_file_offset(tmp_path):
    from taskvec.data import _check_utf8

    body = b"text,label\n" + b"x" * ((1 << 20) - 12) + "\u00e9".encode() + b"ab\xffcd"  # a 2-byte char split across blocks
    (tmp_path / "big.csv").write_bytes(body)
    offset = body.index(b"\xff")
    assert offset > 1 << 20
    with pytest.raises(TaskvecError, match=f"byte 0xff at byte offset {offset}"):
        _check_utf8(spec(), tmp_path / "big.csv")


def test_validate_tasks_checks_every_split_of_every_task(data_dir, tmp_path):
    from taskvec.config import parse_params
    from taskvec.data import validate_tasks

    params = parse_params({"base": "b", "data_dir": str(data_dir), "tasks": {"senti": {"source": "senti", "labels": LABELS}, "senti_lm": {"source": "senti_lm", "kind": "mlm"}}}, source="t", root=tmp_path)
    assert validate_tasks(params, ["senti", "senti_lm", "senti"]) == {"senti": {"train": 64, "validation": 16, "test": 16}, "senti_lm": {"train": 48}}
    write_csv(data_dir / "senti" / "test.csv", [("a", "negative"), ("b", "positive"), ("c", "neutral")])
    with pytest.raises(TaskvecError, match=r"senti/test.csv data row 3 has unknown label 'neutral'"):
        validate_tasks(params, ["senti_lm", "senti"])
