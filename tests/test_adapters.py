"""PEFT LoRA adapters as task vectors: τ = scaling·B·A equals peft's merge_and_unload."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from taskvec import engine
from taskvec.adapters import base_name, delta, lora_deltas
from taskvec.vector import VectorFile
from tests.conftest import make_tiny_bert
from tests.conftest_tasks import data_dir, tiny_model  # noqa: F401 - fixtures
from tests.test_engine import run_cli, weights

peft = pytest.importorskip("peft")


def make_adapter(base: Path, dst: Path, merged: Path, *, seed: int = 0, **config) -> Path:
    """A LoRA adapter on the tiny BERT with random non-zero A and B; also saves peft's merge_and_unload model."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(base)
    lcfg = peft.LoraConfig(init_lora_weights=False, **config)
    pm = peft.get_peft_model(model, lcfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    pm.save_pretrained(dst)
    pm.merge_and_unload().save_pretrained(merged)
    return dst


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("lora") / "base")


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        {"r": 4, "lora_alpha": 16, "target_modules": ["query", "key", "dense"], "use_rslora": True,
         "rank_pattern": {"layer.1.attention.self.key": 2}, "alpha_pattern": {"intermediate.dense": 3}},
        {"r": 2, "lora_alpha": 4, "target_modules": ["word_embeddings", "value"]},
    ],
    ids=["plain", "rslora-patterns", "embedding"],
)
def test_extract_then_apply_equals_peft_merge_and_unload(base, tmp_path, capsys, config):
    adapter = make_adapter(base, tmp_path / "adapter", tmp_path / "merged", **config)
    code, _, err = run_cli(capsys, "extract", base, adapter, "-o", tmp_path / "tau.safetensors")
    assert code == 0, err
    code, _, err = run_cli(capsys, "apply", base, tmp_path / "tau.safetensors", "-o", tmp_path / "applied")
    assert code == 0, err
    ours, theirs, orig = weights(tmp_path / "applied"), weights(tmp_path / "merged"), weights(base)
    assert ours.keys() == theirs.keys()
    changed = [k for k in theirs if not torch.equal(theirs[k], orig[k])]
    assert len(changed) >= 3  # the adapter really moved the targeted weights
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    scale = max(float(theirs[k].abs().max()) for k in changed)
    assert worst <= 4 * torch.finfo(torch.float32).eps * scale, worst
    print(f"max |taskvec apply − peft merge_and_unload| = {worst:.3g}")
    # untargeted tensors: τ = 0, the base's exact bits
    with VectorFile(tmp_path / "tau.safetensors") as v:
        zero = [n for n in v.names if n not in changed]
        assert zero and all(not v.read(n).any() for n in zero)
        assert set(v.names) == {n for n in orig if orig[n].is_floating_point()}  # homologous with a full extract


def test_rank_and_alpha_patterns_set_the_scaling(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "a", tmp_path / "m", r=4, lora_alpha=16, target_modules=["query", "key"], use_rslora=True,
                           rank_pattern={"layer.1.attention.self.key": 2}, alpha_pattern={"layer.0.attention.self.query": 3})
    _, factors = lora_deltas(adapter)
    assert factors["encoder.layer.1.attention.self.key"][2] == 16 / math.sqrt(2)
    assert factors["encoder.layer.0.attention.self.query"][2] == 3 / math.sqrt(4)
    assert factors["encoder.layer.1.attention.self.query"][2] == 16 / math.sqrt(4)


def test_delta_by_hand_and_fan_in_fan_out():
    a = torch.tensor([[1.0, 0.0, 2.0]])  # r = 1, in = 3
    b = torch.tensor([[1.0], [-1.0]])  # out = 2
    assert torch.equal(delta(a, b, 0.5, False), torch.tensor([[0.5, 0.0, 1.0], [-0.5, 0.0, -1.0]]))
    assert torch.equal(delta(a, b, 0.5, True), torch.tensor([[0.5, -0.5], [0.0, 0.0], [1.0, -1.0]]))


def test_module_names_map_onto_a_headless_base():
    names = {"encoder.layer.0.attention.self.query.weight", "pooler.dense.weight"}
    assert base_name("bert.encoder.layer.0.attention.self.query", names) == "encoder.layer.0.attention.self.query.weight"
    assert base_name("encoder.layer.0.attention.self.query", names) == "encoder.layer.0.attention.self.query.weight"
    assert base_name("classifier", names) is None


def test_adapter_vector_combines_with_a_full_vector(base, tmp_path, capsys):
    from tests.conftest import perturb

    adapter = make_adapter(base, tmp_path / "a", tmp_path / "m", r=2, lora_alpha=2, target_modules=["query"])
    ft = perturb(base, tmp_path / "ft", 3)
    engine.extract(base, adapter, tmp_path / "va.safetensors")
    engine.extract(base, ft, tmp_path / "vf.safetensors")
    code, _, err = run_cli(capsys, "combine", tmp_path / "va.safetensors", tmp_path / "vf.safetensors:0.5", "-o", tmp_path / "c.safetensors")
    assert code == 0, err
    with VectorFile(tmp_path / "va.safetensors") as va, VectorFile(tmp_path / "vf.safetensors") as vf, VectorFile(tmp_path / "c.safetensors") as vc:
        n = "encoder.layer.0.attention.self.query.weight"
        assert torch.equal(vc.read(n), va.read(n) + vf.read(n) * 0.5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_dora": True}, "DoRA (use_dora) is not supported"),
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
        ({"modules_to_save": ["classifier"]}, "modules_to_save ['classifier'] is not supported"),
        ({"bias": "all"}, "bias='all' is not supported"),
        ({"r": 8}, "but rank 8 in the config"),
    ],
)
def test_unsupported_adapters_are_refused_with_one_line(base, tmp_path, capsys, change, message):
    adapter = make_adapter(base, tmp_path / "a", tmp_path / "m", r=2, lora_alpha=4, target_modules=["query"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    code, out, err = run_cli(capsys, "extract", base, adapter, "-o", tmp_path / "tau.safetensors")
    assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "tau.safetensors").exists()


def test_adapter_for_another_model_is_refused(base, tmp_path, capsys):
    adapter = make_adapter(base, tmp_path / "a", tmp_path / "m", r=2, lora_alpha=4, target_modules=["query"])
    other = make_tiny_bert(tmp_path / "other", vocab_size=50)  # same names, different embeddings: fine for query…
    big = tmp_path / "big"
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)).save_pretrained(big)
    code, _, err = run_cli(capsys, "extract", big, adapter, "-o", tmp_path / "tau.safetensors")
    assert code == 2 and "gives a [32, 32] update but 'encoder.layer.0.attention.self.query.weight' is [64, 64]" in err
    assert run_cli(capsys, "extract", other, adapter, "-o", tmp_path / "ok.safetensors")[0] == 0


def test_low_rank_storage_round_trip(base, tmp_path, capsys):
    adapter = make_adapter(base, tmp_path / "a", tmp_path / "m", r=2, lora_alpha=4, target_modules=["query", "value", "word_embeddings"], use_rslora=True)
    dense, low = tmp_path / "dense.safetensors", tmp_path / "low.safetensors"
    assert run_cli(capsys, "extract", base, adapter, "-o", dense)[0] == 0
    code, out, err = run_cli(capsys, "extract", base, adapter, "--low-rank", "-o", low)
    assert code == 0, err
    # adapter-sized: the file is about as large as the adapter, far smaller than the dense vector
    assert low.stat().st_size < 1.5 * (adapter / "adapter_model.safetensors").stat().st_size + 16_384
    assert low.stat().st_size < dense.stat().st_size / 4
    with VectorFile(dense) as d, VectorFile(low) as lr:
        assert lr.storage["kind"] == "lowrank" and lr.describe()["storage"] == "lowrank"
        assert lr.names == d.names and lr.shapes() == d.shapes() and lr.base_hash == d.base_hash and lr.param_count == d.param_count
        assert all(torch.equal(lr.read(n), d.read(n)) for n in d.names)  # densified with the same arithmetic
        assert any(d.read(n).any() for n in d.names)
    # apply densifies on the fly: same weights as the dense vector's
    assert run_cli(capsys, "apply", base, low, "-o", tmp_path / "app-low")[0] == 0
    assert run_cli(capsys, "apply", base, dense, "-o", tmp_path / "app-dense")[0] == 0
    wl, wd = weights(tmp_path / "app-low"), weights(tmp_path / "app-dense")
    assert all(torch.equal(wl[k], wd[k]) for k in wd)
    # and combines with dense vectors (homologous)
    assert run_cli(capsys, "combine", low, f"{dense}:-1", "-o", tmp_path / "zero.safetensors")[0] == 0
    with VectorFile(tmp_path / "zero.safetensors") as z:
        assert all(not z.read(n).any() for n in z.names)


def test_low_rank_needs_an_adapter(tiny_models, tmp_path, capsys):
    base, ft1, _ = tiny_models
    code, _, err = run_cli(capsys, "extract", base, ft1, "--low-rank", "-o", tmp_path / "v.safetensors")
    assert code == 2 and "--low-rank needs a PEFT LoRA adapter folder" in err
    assert not (tmp_path / "v.safetensors").exists()


# ---------------------------------------------------------------------------
# train.method: lora


def test_lora_finetune_saves_merged_encoder_and_adapter(data_dir, tiny_model, tmp_path, capsys):
    from taskvec.train import finetune
    from tests.conftest_tasks import task_params

    params = task_params(data_dir, tiny_model, train={"steps": 12, "batch_size": 8, "max_length": 16, "lr": 1e-2, "warmup_ratio": 0.0,
                                                      "method": "lora", "lora_r": 4, "lora_alpha": 8, "lora_targets": ["query", "value"]})
    out = tmp_path / "ft"
    result = finetune("senti", params, out, progress=False)
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    assert result.manifest["train"]["method"] == "lora" and result.losses
    base, tuned = weights(tiny_model), weights(out)
    assert set(base) == set(tuned)
    moved = sorted(n for n in base if not torch.equal(base[n], tuned[n]))
    assert moved and all(".query." in n or ".value." in n for n in moved)  # only the LoRA targets change
    # the rest of the pipeline: extract from the merged folder ≈ the adapter's own τ (low-rank, adapter-sized)
    assert run_cli(capsys, "extract", tiny_model, out, "-o", tmp_path / "full.safetensors")[0] == 0
    code, _, err = run_cli(capsys, "extract", tiny_model, out / "adapter", "--low-rank", "-o", tmp_path / "low.safetensors")
    assert code == 0, err
    with VectorFile(tmp_path / "full.safetensors") as vf, VectorFile(tmp_path / "low.safetensors") as vl:
        assert vf.names == vl.names and vf.base_hash == vl.base_hash
        for n in moved:
            a, b = vf.read(n), vl.read(n)
            assert float((a - b).abs().max()) <= 4 * torch.finfo(torch.float32).eps * float(base[n].abs().max() + b.abs().max())


def test_lora_is_refused_for_mlm_tasks(data_dir, tiny_model, tmp_path):
    from taskvec.errors import TaskvecError
    from taskvec.train import finetune
    from tests.conftest_tasks import task_params

    params = task_params(data_dir, tiny_model, train={"steps": 2, "method": "lora"})
    with pytest.raises(TaskvecError, match="train.method lora supports classification tasks; senti_lm is mlm"):
        finetune("senti_lm", params, tmp_path / "ft", progress=False)
    assert not (tmp_path / "ft").exists()
