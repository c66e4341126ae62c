"""Fixtures for the pipeline tests: a tiny project (tiny BERT + tokenizer, tiny CSV tasks, params.yaml).

Import explicitly from the test modules::

    from tests.conftest_pipeline import tiny_project, pipeline_env  # noqa: F401
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

WORDS = {
    "senti": {"negative": ["bad", "awful", "boring", "worst"], "positive": ["good", "great", "lovely", "best"]},
    "topic": {"sports": ["ball", "goal", "team", "match"], "money": ["bank", "market", "stock", "price"], "science": ["atom", "cell", "space", "robot"]},
    "spam": {"ham": ["hello", "friend", "dinner", "later"], "spam": ["free", "win", "prize", "call"]},
}
FILLER = ["the", "a", "is", "it", "this", "was", "so", "and", "of", "to"]


def _write_task(folder: Path, classes: dict[str, list[str]], rows: dict[str, int], seed: int) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in rows.items():
        lines = ["text,label"]
        for i in range(n):
            label = list(classes)[i % len(classes)]
            words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))] + [rng.choice(classes[label])]
            rng.shuffle(words)
            lines.append(f"{' '.join(words)},{label}")
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")


def make_tiny_encoder(path: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT (hidden 32) with a word-level WordPiece tokenizer over the tasks' words."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + sorted({w for t in WORDS.values() for ws in t.values() for w in ws})
    vocab += sorted({lab.lower() for t in WORDS.values() for lab in t}) + ["a", "personal", "message", "news", "review"]
    vocab = list(dict.fromkeys(vocab))
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_project(root: Path, *, steps: int = 4) -> Path:
    """A self-contained project folder: model/, data/, params.yaml (all paths absolute)."""
    root.mkdir(parents=True, exist_ok=True)
    model = make_tiny_encoder(root / "tiny-base")
    data = root / "data"
    rows = {"train": 48, "validation": 24, "test": 24}
    for i, (task, classes) in enumerate(WORDS.items()):
        _write_task(data / task, classes, rows, seed=i)
    params = {
        "base": str(model),
        "data_dir": str(data),
        "tasks": {t: {"source": str(data / t), "labels": list(c)} for t, c in WORDS.items()},
        "finetune": {"tasks": ["senti", "topic"]},
        "train": {"steps": steps, "batch_size": 8, "max_length": 16, "lr": 1e-3, "seed": 0},
        "extract": {"include": [], "exclude": []},
        "edit": {"learn": ["senti", "topic"], "control": ["spam"], "method": "sum"},
        "search": {"strategy": "golden", "grid_points": 5, "max_evals": 4, "lambda_min": 0.0, "lambda_max": 1.0, "max_control_drop": 100.0},
        "eval": {"batch_size": 16, "max_length": 16, "max_rows": {"validation": 24, "test": 24}},
        "register": {"alias": "challenger", "log_vectors": True},
        "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "artifact_root": "mlartifacts", "experiment": "taskvec-test", "registered_model": "tiny-edit"},
        "dvc": {"remote": "", "push": True, "commit": True},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture
def pipeline_env(tmp_path, monkeypatch):
    """Isolated Prefect home, offline HF, no MLflow env leaking in; restores the cwd."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "TASKVEC_FLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_project(pipeline_env) -> Path:
    return write_project(pipeline_env / "project")


def dvc_project(root: Path, remote: Path, *, steps: int = 4) -> Path:
    """``write_project`` plus the pipeline's code, dvc.yaml, .dvc/config (local remote) in a fresh git repo."""
    write_project(root, steps=steps)
    for d in ("pipeline", "taskvec", "bin", "recipes"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    (root / ".gitignore").write_text("/outputs/\n/mlflow.db\n/mlartifacts/\n/tiny-base/\n/data/\n")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(remote)], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=root, check=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=root, check=True)
    return root


def dvc_env() -> dict[str, str]:
    """Environment for dvc subprocesses: this interpreter first on PATH (dvc.yaml runs `python -m ...`)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("PYTHONPATH", None)
    return env
