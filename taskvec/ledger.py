"""The edit ledger of an applied model folder (``taskvec.json``) and the folder's other files.

An applied model folder carries ``taskvec.json``, its *edit ledger*: the base
model and its content hash, then the ordered list of edits (vector sha256, λ,
method), and the content hash of the weights produced. A vector taken from a
base may be applied to a model edited from that same base (the ledger links
them), which is how an edit is rolled back: apply the same vector with −λ.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.io import PICKLE_INDEX, PICKLE_WEIGHTS, SAFE_INDEX, is_taskvec_folder, user_path

LEDGER_FILE = "taskvec.json"


def read_ledger(model_dir: Path) -> dict | None:
    path = Path(model_dir) / LEDGER_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise TaskvecError(f"{path}: corrupt edit ledger (not JSON)") from None


def write_ledger(folder: Path, ledger: dict) -> None:
    (Path(folder) / LEDGER_FILE).write_text(json.dumps(ledger, indent=2, sort_keys=True) + "\n")


def descent(own: str, model_dir: Path) -> tuple[str, dict | None]:
    """(hash of the base a model with content hash ``own`` descends from, its valid ledger or None).

    A model written by :func:`taskvec.engine.apply` descends from the base
    named in its ledger, provided the ledger's recorded output hash matches the weights.
    """
    ledger = read_ledger(model_dir) if model_dir.is_dir() else None
    if ledger and ledger.get("output_hash") == own:
        return ledger["base_hash"], ledger
    return own, None


def root_hash(src, model_dir: Path) -> tuple[str, str, dict | None]:
    """(own content hash, hash of the base it descends from, valid ledger or None)."""
    own = src.content_hash()
    return (own, *descent(own, model_dir))


_WEIGHT_FILE = re.compile(r"(.*\.safetensors|.*\.bin|.*\.pt|.*\.pth|.*\.ckpt|.*\.h5|.*\.msgpack|.*\.onnx|.*\.gguf|model\.safetensors\.index\.json|pytorch_model\.bin\.index\.json)$")
_SKIP = {".git", ".cache", LEDGER_FILE, SAFE_INDEX, PICKLE_INDEX, PICKLE_WEIGHTS, "onnx", "openvino"}


def copy_model_files(src: Path, dst: Path) -> None:
    """Copy config, tokenizer and other non-weight files (and sub-folders) of a model folder."""
    if not src.is_dir():
        return
    for item in src.iterdir():
        if item.name in _SKIP or _WEIGHT_FILE.fullmatch(item.name) or user_path(item) != str(item):
            continue  # weights, ledgers, and temp files of taskvec writers
        if item.is_dir():
            if is_taskvec_folder(item):
                continue  # an earlier taskvec output saved inside the model folder: not part of the model
            shutil.copytree(item, dst / item.name, ignore=shutil.ignore_patterns(*_SKIP))
        else:
            shutil.copy2(item, dst / item.name)
