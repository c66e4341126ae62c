"""Tools as their users know them: `dvc plots show` offline and a legible `taskvec inspect --png`.

(`dvc exp run` without the venv on PATH: tests/test_dvc_interpreter.py; the MLflow UI on the
project's runs: tests/test_cluster.py.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest_pipeline import REPO

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["'](?:https?:)?//""", re.I)


def test_external_resource_check_catches_a_cdn_script():
    """The check below would fail on DVC's Vega renderer, which loads its scripts from a CDN."""
    from dvc_render.vega import VegaRenderer

    assert EXTERNAL.search(VegaRenderer.SCRIPTS)


def test_dvc_plots_show_renders_offline(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = tmp_path / "repo"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    curve = root / "outputs" / "search" / "curve.png"
    curve.parent.mkdir(parents=True)
    fig, ax = plt.subplots()
    ax.plot([0, 0.5, 1], [0.5, 0.8, 0.6])
    fig.savefig(curve)
    plt.close(fig)
    env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=root, env=env, check=True)
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", "plots"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    html = (root / "plots" / "index.html").read_text()
    assert not EXTERNAL.search(html), EXTERNAL.search(html).group(0)
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 1 and "curve" in srcs[0], srcs
    copied = root / "plots" / srcs[0]
    assert copied.read_bytes() == curve.read_bytes()


def _report(n: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    cos = torch.empty(n, n).uniform_(-1, 1, generator=gen)
    cos = ((cos + cos.T) / 2).fill_diagonal_(1.0)
    conflict = torch.empty(n, n).uniform_(0, 1, generator=gen)
    conflict = ((conflict + conflict.T) / 2).fill_diagonal_(0.0)
    return {"vectors": [{"path": f"/v/task{i}.safetensors"} for i in range(n)], "cosine": cos.tolist(), "sign_conflict": conflict.tolist()}


def test_inspect_heatmap_labels_contrast_with_their_cells(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from taskvec.inspection import contrast_ratio, heatmap_figure, save_heatmap

    report = _report(4)
    fig = heatmap_figure(report)
    try:
        checked = 0
        for ax in fig.axes:
            images = ax.get_images()
            if not images:
                continue  # a colorbar
            im = images[0]
            data = im.get_array()
            for text in ax.texts:
                j, i = (round(c) for c in text.get_position())
                cell = im.cmap(im.norm(data[i, j]))
                assert contrast_ratio(to_rgba(text.get_color()), cell) >= 4.5, (ax.get_title(), i, j, text.get_text(), text.get_color())
                checked += 1
        assert checked == 2 * 4 * 4
        # the cosine diagonal (1.00) sits on the darkest red, where the old black label was unreadable
        cosine = fig.axes[0].get_images()[0]
        assert contrast_ratio((0, 0, 0, 1), cosine.cmap(cosine.norm(1.0))) < 4.5
    finally:
        plt.close(fig)

    png = tmp_path / "heatmap.png"
    save_heatmap(report, png)
    from matplotlib.image import imread

    pixels = imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pixels.shape[1] == int((4 + 1.2 * 4) * 120) and pixels.shape[0] == int((2 + 0.6 * 4) * 120)
    assert pixels[..., :3].std() > 0.1  # not a blank canvas


@pytest.mark.parametrize("rgb,expected", [((0.4, 0.0, 0.12), "white"), ((0.97, 0.97, 0.97), "black"), ((1.0, 1.0, 1.0), "black"), ((0.02, 0.19, 0.38), "white")])
def test_label_color_picks_the_readable_one(rgb, expected):
    from taskvec.inspection import label_color

    assert label_color(rgb) == expected
