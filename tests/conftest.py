"""Shared test set-up: offline, isolated caches, and tiny model factories.

Area-specific fixtures live in ``tests/conftest_*.py`` modules that the test
files import explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MLflow keeps one SQLAlchemy pool per store URI for the life of the process; tests open a fresh
# PostgreSQL database per test, so pooled idle connections would pile up past max_connections
os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")


@pytest.fixture(autouse=True)
def _restore_tracking_env():
    """``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI``; don't let it leak into later tests."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _isolated_hash_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own content-hash cache, so no test sees another's."""
    monkeypatch.setenv("TASKVEC_CACHE_DIR", str(tmp_path_factory.mktemp("taskvec-cache")))


def make_tiny_bert(path: Path, seed: int = 0, *, vocab_size: int = 100, dtype=None) -> Path:
    """A random 2-layer BertModel (hidden 32) saved as safetensors at ``path``."""
    import torch
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = BertModel(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return path


def perturb(src: Path, dst: Path, seed: int, scale: float = 0.01) -> Path:
    """Copy of a saved model with seeded Gaussian noise on every floating tensor."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))
    model.save_pretrained(dst)
    return dst


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(base, ft1, ft2): a tiny random BERT and two perturbed copies."""
    root = tmp_path_factory.mktemp("tiny")
    base = make_tiny_bert(root / "base")
    return base, perturb(base, root / "ft1", 1), perturb(base, root / "ft2", 2)
