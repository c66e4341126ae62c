"""Inspect task vectors: norms per layer, sparsity, and the interference matrix.

The cosine-similarity and sign-conflict matrices between vectors show the
interference TIES-Merging exists to fix: two vectors that push many shared
parameters in opposite directions cancel when simply added. Sign conflict of
(i, j) is the fraction of entries non-zero in both whose signs differ.
All statistics are streamed tensor by tensor.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from taskvec.io import atomic_path
from taskvec.vector import VectorFile, check_vectors_homologous

_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")


def layer_of(name: str) -> str:
    """``encoder.layer.3.attention…`` → ``layer 3``; otherwise the first name component."""
    m = _LAYER.search(name)
    if m:
        return f"layer {int(m.group(1)):d}"
    parts = name.split(".")
    return parts[1] if parts[0] in ("model", "bert", "transformer", "encoder", "roberta") and len(parts) > 2 else parts[0]


def inspect_vectors(paths: Sequence[str | os.PathLike]) -> dict:
    """Per-vector statistics and the pairwise cosine / sign-conflict matrices."""
    vfs = [VectorFile(p) for p in paths]
    try:
        if len(vfs) > 1:
            check_vectors_homologous(vfs)
        n = len(vfs)
        dots = torch.zeros(n, n, dtype=torch.float64)
        both = torch.zeros(n, n, dtype=torch.float64)
        conflict = torch.zeros(n, n, dtype=torch.float64)
        layer_sq = [defaultdict(float) for _ in vfs]
        zeros = [0] * n
        for name in vfs[0].names:
            taus = [v.read(name).reshape(-1) for v in vfs]
            signs = [torch.sign(t) for t in taus]
            for i in range(n):
                sq = float(taus[i].double().pow(2).sum())
                layer_sq[i][layer_of(name)] += sq
                zeros[i] += int((taus[i] == 0).sum())
                for j in range(i, n):
                    d = sq if i == j else float(taus[i].double() @ taus[j].double())
                    nz = (signs[i] != 0) & (signs[j] != 0)
                    c = float((nz & (signs[i] != signs[j])).sum())
                    b = float(nz.sum())
                    dots[i, j] += d
                    both[i, j] += b
                    conflict[i, j] += c
                    if i != j:
                        dots[j, i] += d
                        both[j, i] += b
                        conflict[j, i] += c
        norms = dots.diagonal().sqrt()
        cos = dots / torch.outer(norms, norms).clamp_min(1e-300)
        sign_conflict = torch.where(both > 0, conflict / both.clamp_min(1), torch.zeros(()))
        return {
            "vectors": [
                {
                    "path": str(v.path),
                    "sha256": v.sha256,
                    "base_model": v.base_model,
                    "params": v.param_count,
                    "l2_norm": float(norms[i]),
                    "sparsity": zeros[i] / max(v.param_count, 1),
                    "layer_norms": {k: math.sqrt(s) for k, s in layer_sq[i].items()},
                }
                for i, v in enumerate(vfs)
            ],
            "cosine": cos.tolist(),
            "sign_conflict": sign_conflict.tolist(),
        }
    finally:
        for v in vfs:
            v.close()


def format_report(report: dict) -> str:
    """Plain-text tables of :func:`inspect_vectors`' output."""
    vecs = report["vectors"]
    labels = [Path(v["path"]).stem for v in vecs]
    lines = []
    for v, label in zip(vecs, labels):
        lines.append(f"{label}  sha256 {v['sha256'][:12]}  params {v['params']:,}  ‖τ‖ {v['l2_norm']:.4g}  sparsity {v['sparsity']:.2%}")
        width = max(len(k) for k in v["layer_norms"])
        for layer, norm in v["layer_norms"].items():
            lines.append(f"  {layer:<{width}}  {norm:.4g}")
    if len(vecs) > 1:
        w = max(len(x) for x in labels)
        for title, key, fmt in (("cosine similarity", "cosine", "{:+.3f}"), ("sign conflict", "sign_conflict", "{:.3f}")):
            lines.append("")
            lines.append(title)
            lines.append(" " * w + "  " + "  ".join(f"{x[:8]:>8}" for x in labels))
            for label, row in zip(labels, report[key]):
                lines.append(f"{label:<{w}}  " + "  ".join(f"{fmt.format(x):>8}" for x in row))
    return "\n".join(lines)


def _luminance(rgb: Sequence[float]) -> float:
    """WCAG relative luminance of an sRGB colour (components in [0, 1])."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """WCAG contrast ratio of two sRGB colours (1 = none, 21 = black on white; ≥ 4.5 reads as body text)."""
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def label_color(cell: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with the cell (the diagonal's 1.00 sits on dark red)."""
    return "black" if contrast_ratio(cell, (0, 0, 0)) >= contrast_ratio(cell, (1, 1, 1)) else "white"


def heatmap_figure(report: dict):
    """The matplotlib figure of :func:`save_heatmap`: each cell labelled in the colour that reads on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [Path(v["path"]).stem for v in report["vectors"]]
    n = len(labels)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * n, 2 + 0.6 * n), constrained_layout=True)
    for ax, key, title, cmap, vmin in ((axes[0], "cosine", "cosine similarity", "RdBu_r", -1), (axes[1], "sign_conflict", "sign conflict", "Reds", 0)):
        data = report[key]
        im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=1)
        ax.set_title(title)
        ax.set_xticks(range(n), labels, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
        for i in range(n):
            for j in range(n):
                cell = im.cmap(im.norm(data[i][j]))
                ax.text(j, i, f"{data[i][j]:.2f}", ha="center", va="center", fontsize=9, color=label_color(cell))
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def save_heatmap(report: dict, png: str | os.PathLike) -> None:
    """Cosine similarity and sign conflict side by side, as a PNG."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(report)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
