"""The streaming engine: exact results, round trips, sharding, format and refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taskvec import engine
from taskvec.cli import main as cli_main
from taskvec.engine import MergeOptions
from taskvec.io import TensorSource, file_sha256
from taskvec.vector import TaskVector, VectorFile
from tests.conftest import make_tiny_bert, perturb


def _content_hash(model_dir: Path) -> str:
    with TensorSource(model_dir) as src:
        return src.content_hash(use_cache=False)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop output of the set-up (e.g. save_pretrained progress)
    with pytest.raises(SystemExit) as exc:
        cli_main([str(a) for a in args] + ["-q"] if args[0] in {"extract", "combine", "apply", "merge", "compress"} else [str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture(scope="module")
def vecs(tiny_models, tmp_path_factory):
    base, ft1, ft2 = tiny_models
    d = tmp_path_factory.mktemp("vecs")
    v1 = engine.extract(base, ft1, d / "v1.safetensors")
    v2 = engine.extract(base, ft2, d / "v2.safetensors")
    return v1.path, v2.path


# ---------------------------------------------------------------------------
# extract and the format


def test_extract_equals_ft_minus_base_exactly(tiny_models, vecs):
    base, ft1, _ = tiny_models
    wb, wf = weights(base), weights(ft1)
    with VectorFile(vecs[0]) as vf:
        assert vf.names == sorted(n for n, x in wb.items() if x.is_floating_point())
        for name, tau in vf:
            assert torch.equal(tau, wf[name].float() - wb[name].float()), name


def test_vector_header_records_provenance(tiny_models, vecs):
    base, ft1, _ = tiny_models
    with VectorFile(vecs[0]) as vf:
        assert vf.metadata["taskvec.format"] == "1"
        assert vf.base_model == str(base)
        assert vf.base_hash == TensorSource(base).content_hash(use_cache=False)
        assert vf.param_count == sum(x.numel() for x in weights(base).values() if x.is_floating_point())
        assert vf.dtype == "float32"
        assert vf.recipe == {"op": "extract", "finetuned_hash": _content_hash(ft1), "include": [], "exclude": []}
        assert vf.sha256 == file_sha256(vecs[0])


def test_extract_is_deterministic(tiny_models, vecs, tmp_path):
    base, ft1, _ = tiny_models
    again = engine.extract(base, ft1, tmp_path / "again.safetensors")
    assert again.sha256 == file_sha256(vecs[0])


def test_include_exclude(tiny_models, tmp_path):
    base, ft1, _ = tiny_models
    r = engine.extract(base, ft1, tmp_path / "enc.safetensors", include=["encoder.*"], exclude=["*.LayerNorm.*"])
    with VectorFile(r.path) as vf:
        assert vf.names and all(n.startswith("encoder.") and "LayerNorm" not in n for n in vf.names)
        assert vf.recipe["include"] == ["encoder.*"]


def test_content_hash_is_layout_independent(tiny_models, tmp_path):
    base = tiny_models[0]
    from transformers import AutoModel

    AutoModel.from_pretrained(base).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert TensorSource(tmp_path / "sharded").content_hash() == TensorSource(base).content_hash()


# ---------------------------------------------------------------------------
# combine


def test_combine_sum_and_negation_exact(vecs, tmp_path, capsys):
    v1, v2 = vecs
    code, out, err = run_cli(capsys, "combine", f"{v1}:0.5", f"{v2}:-1", "-o", tmp_path / "c.safetensors")
    assert code == 0, err
    t1, t2, c = TaskVector.load(v1), TaskVector.load(v2), TaskVector.load(tmp_path / "c.safetensors")
    for name in t1.tensors:
        assert torch.equal(c.tensors[name], 0.5 * t1.tensors[name] - t2.tensors[name])
    with VectorFile(tmp_path / "c.safetensors") as vf:
        assert vf.recipe["inputs"] == [{"sha256": file_sha256(v1), "lambda": 0.5}, {"sha256": file_sha256(v2), "lambda": -1.0}]


def test_combine_analogy(vecs, tmp_path):
    v1, v2 = vecs
    # "A is to B as C is to D": C:1 B:1 A:-1 with C = v1 + v2 built first
    c_path = engine.combine([(v1, 1.0), (v2, 1.0)], tmp_path / "C.safetensors").path
    d = engine.combine([(c_path, 1.0), (v2, 1.0), (v1, -1.0)], tmp_path / "D.safetensors").path
    t1, t2, td = TaskVector.load(v1), TaskVector.load(v2), TaskVector.load(d)
    for name in t1.tensors:
        expected = (t1.tensors[name] + t2.tensors[name]) + (t2.tensors[name] - t1.tensors[name])
        assert torch.allclose(td.tensors[name], expected, atol=1e-7, rtol=0)


def test_combine_ties_matches_algebra(vecs, tmp_path):
    from taskvec import algebra

    v1, v2 = vecs
    out = engine.combine([(v1, 1.0), (v2, 1.0)], tmp_path / "t.safetensors", options=MergeOptions("ties", density=0.3)).path
    t1, t2, tt = TaskVector.load(v1), TaskVector.load(v2), TaskVector.load(out)
    for name in t1.tensors:
        assert torch.equal(tt.tensors[name], algebra.ties([t1.tensors[name], t2.tensors[name]], [1, 1], 0.3))


def test_dare_is_reproducible_across_runs(vecs, tmp_path):
    v1, v2 = vecs
    opts = MergeOptions("dare_ties", drop=0.5, seed=11)
    a = engine.combine([(v1, 1.0), (v2, 1.0)], tmp_path / "a.safetensors", options=opts)
    b = engine.combine([(v1, 1.0), (v2, 1.0)], tmp_path / "b.safetensors", options=opts)
    c = engine.combine([(v1, 1.0), (v2, 1.0)], tmp_path / "c.safetensors", options=MergeOptions("dare_ties", drop=0.5, seed=12))
    assert a.sha256 == b.sha256 != c.sha256


# ---------------------------------------------------------------------------
# apply and merge


def test_apply_lambda1_reproduces_finetuned(tiny_models, vecs, tmp_path, capsys):
    base, ft1, _ = tiny_models
    code, _, err = run_cli(capsys, "apply", base, vecs[0], "-o", tmp_path / "out")
    assert code == 0, err
    wo, wf = weights(tmp_path / "out"), weights(ft1)
    assert wo.keys() == wf.keys()
    for name in wf:
        assert torch.allclose(wo[name], wf[name], atol=1e-6, rtol=1e-6), name
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tmp_path / "out")
    assert model.config.hidden_size == 32
    assert (tmp_path / "out" / "config.json").exists()
    ledger = json.loads((tmp_path / "out" / "taskvec.json").read_text())
    assert ledger["base_hash"] == TensorSource(base).content_hash()
    assert ledger["edits"] == [{"vector_sha256": file_sha256(vecs[0]), "vector": "v1.safetensors", "lambda": 1.0, "method": "sum"}]
    assert ledger["output_hash"] == TensorSource(tmp_path / "out").content_hash(use_cache=False)


def test_apply_then_negation_returns_base(tiny_models, vecs, tmp_path):
    base = tiny_models[0]
    engine.apply(base, [(vecs[0], 0.7), (vecs[1], 0.3)], tmp_path / "edited")
    # the vector was taken from `base`, but the ledger links `edited` to it
    ledger = engine.apply(tmp_path / "edited", [(vecs[0], -0.7), (vecs[1], -0.3)], tmp_path / "back")
    assert len(ledger["edits"]) == 4 and ledger["base_hash"] == TensorSource(base).content_hash()
    wb, wr = weights(base), weights(tmp_path / "back")
    for name in wb:
        assert torch.allclose(wr[name], wb[name], atol=1e-6), name


def test_apply_exact_formula(tiny_models, vecs, tmp_path):
    base = tiny_models[0]
    engine.apply(base, [(vecs[0], 0.25), (vecs[1], -2.0)], tmp_path / "m")
    wb, wm = weights(base), weights(tmp_path / "m")
    t1, t2 = TaskVector.load(vecs[0]), TaskVector.load(vecs[1])
    for name, tau in t1.tensors.items():
        expected = wb[name].float().add(tau, alpha=0.25).add(t2.tensors[name], alpha=-2.0)
        assert torch.equal(wm[name], expected), name
    # tensors outside the vector (integer buffers, if any) are copied bit for bit
    for name in set(wb) - set(t1.tensors):
        assert torch.equal(wm[name], wb[name])


def test_merge_equals_extract_then_apply(tiny_models, vecs, tmp_path):
    base, ft1, ft2 = tiny_models
    engine.merge(base, [(ft1, 0.5), (ft2, 0.5)], tmp_path / "merged")
    engine.apply(base, [(vecs[0], 0.5), (vecs[1], 0.5)], tmp_path / "applied")
    wm, wa = weights(tmp_path / "merged"), weights(tmp_path / "applied")
    for name in wm:
        assert torch.allclose(wm[name], wa[name], atol=1e-7), name


def test_sharded_input_and_output(tiny_models, vecs, tmp_path):
    from transformers import AutoModel

    base, ft1, _ = tiny_models
    AutoModel.from_pretrained(base).save_pretrained(tmp_path / "base_sh", max_shard_size="30KB")
    AutoModel.from_pretrained(ft1).save_pretrained(tmp_path / "ft_sh", max_shard_size="30KB")
    r = engine.extract(tmp_path / "base_sh", tmp_path / "ft_sh", tmp_path / "v.safetensors")
    a, b = TaskVector.load(r.path), TaskVector.load(vecs[0])
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in b.tensors)
    engine.apply(tmp_path / "base_sh", [(r.path, 1.0)], tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "out" / s).exists() for s in shards)
    model = AutoModel.from_pretrained(tmp_path / "out")
    ref = AutoModel.from_pretrained(ft1)
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_apply_keeps_base_dtype(tmp_path):
    base = make_tiny_bert(tmp_path / "b16", dtype=torch.float16)
    ft = perturb(base, tmp_path / "f16", 3)
    v = engine.extract(base, ft, tmp_path / "v.safetensors").path
    engine.apply(base, [(v, 1.0)], tmp_path / "o")
    wo, wf = weights(tmp_path / "o"), weights(ft)
    assert all(x.dtype == torch.float16 for x in wo.values() if x.is_floating_point())
    assert all(torch.equal(wo[n], wf[n]) for n in wf)


# ---------------------------------------------------------------------------
# compress


def test_compress_topk_sparse_round_trip(vecs, tmp_path):
    from taskvec import algebra

    r = engine.compress(vecs[0], tmp_path / "s.safetensors", density=0.1)
    assert r["storage"] == "sparse" and r["output_bytes"] < r["input_bytes"]
    assert 0.09 <= r["kept_fraction"] <= 0.1  # max(1, floor(0.1 * numel)) per tensor
    full, sparse = TaskVector.load(vecs[0]), TaskVector.load(tmp_path / "s.safetensors")
    err2 = norm2 = 0.0
    for name, tau in full.tensors.items():
        assert torch.equal(sparse.tensors[name], algebra.magnitude_prune(tau, 0.1))
        err2 += float((tau - sparse.tensors[name]).double().pow(2).sum())
        norm2 += float(tau.double().pow(2).sum())
    assert r["relative_l2_error"] == pytest.approx(math.sqrt(err2 / norm2))
    with VectorFile(tmp_path / "s.safetensors") as vf:
        assert vf.base_hash == VectorFile(vecs[0]).base_hash  # still applies to the same base


def test_compress_half_precision_reports_error(vecs, tmp_path, capsys):
    code, out, err = run_cli(capsys, "compress", vecs[0], "--dtype", "bfloat16", "-o", tmp_path / "h.safetensors")
    assert code == 0, err
    assert "rel-L2 error" in out
    r = engine.compress(vecs[0], tmp_path / "h2.safetensors", dtype=torch.float16)
    assert 0 < r["relative_l2_error"] < 1e-3 and r["output_bytes"] < 0.6 * r["input_bytes"]


# ---------------------------------------------------------------------------
# inspect


def test_inspect_cosine_and_sign_conflict(vecs, tmp_path, capsys):
    neg = engine.combine([(vecs[0], -1.0)], tmp_path / "neg.safetensors").path
    from taskvec.inspection import inspect_vectors

    r = inspect_vectors([vecs[0], neg, vecs[1]])
    assert r["cosine"][0][0] == pytest.approx(1.0)
    assert r["cosine"][0][1] == pytest.approx(-1.0)
    assert r["sign_conflict"][0][1] == pytest.approx(1.0)
    assert r["sign_conflict"][0][0] == 0.0
    assert abs(r["cosine"][0][2]) < 0.2  # independent noise is nearly orthogonal
    assert "layer 0" in r["vectors"][0]["layer_norms"]
    code, out, _ = run_cli(capsys, "inspect", vecs[0], neg, "--png", tmp_path / "h.png")
    assert code == 0 and "sign conflict" in out
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# refusals: one line, exit 2, nothing written


def _assert_refused(capsys, tmp_path, out_name, args, expected):
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (out, err)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith((out_name, f".{out_name}"))]
    assert leftovers == [], leftovers


def test_refuses_pickle_unless_allowed(tiny_models, tmp_path, capsys):
    (tmp_path / "pk").mkdir()
    torch.save(weights(tiny_models[1]), tmp_path / "pk" / "pytorch_model.bin")
    _assert_refused(capsys, tmp_path, "v.safetensors", ["extract", tiny_models[0], tmp_path / "pk", "-o", tmp_path / "v.safetensors"], "pickle checkpoint refused")
    code, _, err = run_cli(capsys, "extract", tiny_models[0], tmp_path / "pk", "--allow-pickle", "-o", tmp_path / "v.safetensors")
    assert code == 0, err
    assert TaskVector.load(tmp_path / "v.safetensors").tensors


def test_failed_apply_leaves_existing_output_untouched(tiny_models, vecs, tmp_path, capsys):
    base = tiny_models[0]
    engine.apply(base, [(vecs[0], 1.0)], tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    code, _, _ = run_cli(capsys, "apply", tiny_models[2], vecs[0], "-o", tmp_path / "out")
    assert code == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_outputs_get_ordinary_permissions(vecs, tiny_models, tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    engine.apply(tiny_models[0], [(vecs[0], 1.0)], tmp_path / "out")
    r = engine.combine([(vecs[0], 1.0)], tmp_path / "c.safetensors")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(r.path.stat().st_mode) == 0o666 & ~umask
