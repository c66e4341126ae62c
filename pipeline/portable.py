"""Path-free records: what the pipeline writes into its outputs names files relative to the project.

Everything content-addressed (vector headers, ledgers, ``finetune.json``,
``compose.json``, ``best.json``, ``provenance.json``, the model card, DVC outs)
and what MLflow logs must be the same bytes wherever the checkout lives, so
paths are written relative to the project root (the folder of params.yaml),
data files as the params spell their folder (``../shared/data/sst2/train.csv``
for ``data_dir: ../shared/data``), and wall-clock times go to MLflow metrics
only.
"""

from __future__ import annotations

import os
from pathlib import Path


def rel(p, path: str | os.PathLike) -> str:
    """``path`` as a project-relative POSIX path: under ``data_dir`` → spelled from ``data_dir``; under the root → relative to it.

    Anything else (a hub id, an ``hf://`` origin, a folder outside the
    project the params name by absolute path) is returned unchanged.
    """
    text = str(path)
    if "://" in text or not Path(text).is_absolute():
        return Path(text).as_posix() if "://" not in text else text
    target = Path(text).resolve()
    data_root = p.data_root()
    if target == data_root or data_root in target.parents:
        return (Path(p.data_dir) / target.relative_to(data_root)).as_posix()
    root = p.root.resolve()
    if target == root or root in target.parents:
        return target.relative_to(root).as_posix()
    return text


def lineage(p, data: dict) -> dict:
    """A data-lineage dict (one split, or ``{task: lineage}``) with every ``origin`` made project-relative."""
    origin = data.get("origin")
    if isinstance(origin, str):
        return {**data, "origin": rel(p, origin)}
    if isinstance(origin, list):  # rows of several splits (taskvec.data.load_rows)
        return {**data, "origin": [rel(p, o) for o in origin]}
    return {k: lineage(p, v) if isinstance(v, dict) else v for k, v in data.items()}


def uri(p, value: str) -> str:
    """A ``sqlite:///`` or ``file:`` URI to a path under the project, written relative to it (others unchanged)."""
    for scheme in ("sqlite:///", "file://", "file:"):
        if value.startswith(scheme):
            path = value[len(scheme):]
            if Path(path).is_absolute():
                local = rel(p, path)
                return scheme + local if not Path(local).is_absolute() else value
            return value
    return value
