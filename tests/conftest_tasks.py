"""Fixtures for the data / heads / training / evaluation / search tests.

Everything is tiny and built in the test: a word-level BERT tokenizer over a
small vocabulary, a random 2-layer BERT (hidden 32) saved with that tokenizer,
and sentiment CSV mirrors written into ``tmp_path``. Test modules import the
fixtures they use from here explicitly.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "boring", "sad"]
FILLER = ["the", "movie", "film", "was", "really", "plot", "acting", "very"]
WORDS = POSITIVE + NEGATIVE + FILLER
LABELS = ["negative", "positive"]


def make_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={token: i for i, token in enumerate(SPECIALS + WORDS)})


def make_model(path: Path, seed: int = 0) -> Path:
    """A random tiny BertModel plus the tiny tokenizer, saved at ``path``."""
    from tests.conftest import make_tiny_bert

    tokenizer = make_tokenizer()
    make_tiny_bert(path, seed, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(path)
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` rows of ``the movie was <word> ...`` labelled by the sentiment word."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % 2]
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        rows.append((" ".join(rng.sample(FILLER, 3) + [word]), label))
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_mirror(folder: Path, sizes=(64, 16, 16), seed: int = 0) -> Path:
    for split, n, offset in zip(("train", "validation", "test"), sizes, (0, 1000, 2000), strict=True):
        write_csv(folder / f"{split}.csv", sentiment_rows(n, seed + offset))
    return folder


def task_params(data_dir: Path, base: Path, **overrides):
    """A validated ``Params`` with a ``senti`` classification task and a ``senti_lm`` mlm task."""
    from taskvec.config import parse_params

    data = {
        "base": str(base),
        "data_dir": str(data_dir),
        "tasks": {
            "senti": {"source": "senti", "labels": LABELS, "descriptions": ["bad", "good"]},
            "senti_lm": {"source": "senti_lm", "kind": "mlm"},
        },
        "train": {"steps": 12, "batch_size": 8, "max_length": 16, "lr": 1e-3, "warmup_ratio": 0.0},
        "eval": {"batch_size": 8, "max_length": 16},
    }
    data.update(overrides)
    return parse_params(data)


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    """A tiny saved model; torch runs on one thread meanwhile (fastest for such models, and
    immune to OpenMP oversubscription when other processes share the 2 cores)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_model(tmp_path / "base")
    torch.set_num_threads(previous)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    root = tmp_path / "data"
    write_mirror(root / "senti")
    write_csv(root / "senti_lm" / "train.csv", [(text, "") for text, _ in sentiment_rows(48, seed=7)])
    return root


@pytest.fixture
def params(data_dir, tiny_model):
    return task_params(data_dir, tiny_model)


def negation_search(base: Path, data_dir: Path, tmp_path: Path, capsys, *args: str) -> dict:
    """`taskvec search` negating a perturbed copy of ``base``'s vector on ``senti`` with control ``ctrl``
    (a mirror the caller wrote under ``data_dir``), 8 validation rows per target; returns search.json."""
    import json

    import yaml

    from pipeline.cli import main as cli_main
    from taskvec import engine
    from tests.conftest import perturb

    cls = {"labels": LABELS, "descriptions": ["bad", "good"]}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({
        "base": str(base), "data_dir": str(data_dir),
        "tasks": {"senti": {"source": "senti", **cls}, "ctrl": {"source": "ctrl", **cls}},
        "eval": {"batch_size": 8, "max_length": 16, "max_rows": {"validation": 8}},
    }))
    engine.extract(base, perturb(base, tmp_path / "ft", seed=3, scale=0.5), tmp_path / "v.safetensors")
    out = tmp_path / "forget"
    with pytest.raises(SystemExit) as exc:
        cli_main(["search", str(base), "--vector", str(tmp_path / "v.safetensors"), "--objective", "negation", "--task", "senti", "--control", "ctrl",
                  "--strategy", "grid", "-o", str(out), "-p", str(params_file), "-q", *args])
    assert exc.value.code in (0, None), capsys.readouterr().err
    return json.loads((out / "search.json").read_text())


def assert_bound_rule(saved: dict, control: str, limit: float) -> None:
    """Every evaluation's feasibility in a search.json is the control rule recomputed: drop + z·se ≤ limit points."""
    from statistics import NormalDist

    base = saved["evaluations"][0]["metrics"]
    z = NormalDist().inv_cdf(saved["constraint"]["confidence"])
    for e in saved["evaluations"]:
        m = e["metrics"]
        assert e["feasible"] == (100 * (base[control] - m[control]) + z * 100 * m[f"{control}/drop_se"] <= limit + 1e-9), e
