"""The evaluation harness (taskvec.suite): one device policy for every caller, one encoder load, identical scores.

A recording device policy is substituted for ``taskvec.suite.device``. While
it is installed, every tokenised batch fed to an encoder (``sentence_embedding``,
used by heads, evaluation and training alike) and every ``labels`` tensor fed
to an ``EncoderClassifier`` must be a tensor that the policy's ``to()``
returned, and the encoder must be one the policy placed — else the test fails.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import weakref

import pytest
import torch

from taskvec import heads as heads_mod
from taskvec import suite as suite_mod
from taskvec.config import SearchSpec, parse_params
from taskvec.data import load_split
from taskvec.errors import TaskvecError
from taskvec.evaluate import EvalSet, evaluate_model, predict, score
from taskvec.heads import EncoderClassifier, build_head, load_encoder
from taskvec.search import addition_objective, control_constraint, search_lambda
from taskvec.search_run import SuiteMetrics, run_search
from taskvec.suite import DevicePolicy, Suite, write_curve
from tests.conftest import perturb
from tests.conftest_pipeline import pipeline_env, tiny_project  # noqa: F401 - fixtures
from tests.conftest_tasks import LABELS, data_dir, make_tokenizer, params, tiny_model, write_mirror  # noqa: F401 - fixtures


class RecordingPolicy(DevicePolicy):
    """CPU, but ``to()`` returns a fresh tensor and remembers it; ``place()`` remembers the module."""

    def __init__(self):
        super().__init__("cpu")
        self.moved: dict[int, weakref.ref] = {}
        self.placed: list[torch.nn.Module] = []
        self.fed = {"batches": 0, "labels": 0}

    def to(self, tensor):
        out = tensor.to(self.device, copy=True)
        self.moved[id(out)] = weakref.ref(out)
        return out

    def place(self, module):
        self.placed.append(module)
        return super().place(module)

    def came_through(self, tensor) -> bool:
        ref = self.moved.get(id(tensor))
        return ref is not None and ref() is tensor


@pytest.fixture
def install(monkeypatch):
    """Call to substitute a recording policy and check every tensor fed to a model from then on."""

    def _install() -> RecordingPolicy:
        fake = RecordingPolicy()
        monkeypatch.setattr(suite_mod, "device", lambda: fake)
        embed = heads_mod.sentence_embedding
        forward = EncoderClassifier.forward

        def checked_embed(encoder, **batch):
            for key, value in batch.items():
                assert fake.came_through(value), f"{key} was fed to the encoder without the device policy"
            assert any(encoder is m for m in fake.placed), "an encoder the device policy never placed was run"
            fake.fed["batches"] += 1
            return embed(encoder, **batch)

        def checked_forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
            if labels is not None:
                assert fake.came_through(labels), "labels were fed to the model without the device policy"
                fake.fed["labels"] += 1
            return forward(self, input_ids, attention_mask, token_type_ids, labels)

        monkeypatch.setattr(heads_mod, "sentence_embedding", checked_embed)
        monkeypatch.setattr(EncoderClassifier, "forward", checked_forward)
        return fake

    return _install


@pytest.fixture
def loads(monkeypatch):
    """Count the harness's encoder loads."""
    calls = []
    real = suite_mod.load_encoder

    def counting(name, **kw):
        calls.append(str(name))
        return real(name, **kw)

    monkeypatch.setattr(suite_mod, "load_encoder", counting)
    return calls


def test_default_policy_is_cuda_when_available_and_one_object():
    assert DevicePolicy().device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert suite_mod.device() is suite_mod.device()
    batch = DevicePolicy("cpu").batch({"input_ids": torch.ones(2, 3, dtype=torch.long)})
    assert batch["input_ids"].device.type == "cpu"


def test_the_check_catches_a_batch_that_skipped_the_policy(tiny_model, params, install):
    fake = install()
    suite = Suite.load(tiny_model, ["senti"], params)
    assert fake.fed["batches"] > 0 and fake.placed == [suite.encoder]  # heads were built through it
    with pytest.raises(AssertionError, match="without the device policy"):
        predict(suite.models["senti"], suite.sets["validation"]["senti"])  # moved by .to(device), not the policy
    before = fake.fed["batches"]
    suite.accuracies()
    assert fake.fed["batches"] > before


def test_scores_equal_the_direct_computation(tiny_model, params, tmp_path):
    """The harness scores exactly what loading, building the head and predicting by hand gives."""
    other = perturb(tiny_model, tmp_path / "other", 3, scale=0.3)
    make_tokenizer().save_pretrained(other)
    gen = torch.Generator().manual_seed(5)
    encoder, tokenizer, _ = load_encoder(tiny_model)
    tau = {n: torch.randn(t.shape, generator=gen) * 0.2 for n, t in encoder.state_dict().items() if n.startswith("encoder.layer.1")}
    spec = params.task("senti")
    head = build_head(encoder, tokenizer, "senti", spec.labels, spec.head_texts, max_length=16)
    direct = {}
    for split in ("validation", "test"):
        data = load_split(spec, params.data_root(), split, max_rows=params.eval.max_rows.get(split), seed=params.eval.seed)
        evalset = EvalSet.build(data, tokenizer, batch_size=8, max_length=16)
        direct[split] = score(EncoderClassifier(encoder, head), evalset)
        other_encoder, _, _ = load_encoder(other)
        direct[f"other-{split}"] = score(EncoderClassifier(other_encoder, head), evalset)["accuracy"]
    with torch.no_grad():
        for name, delta in tau.items():
            encoder.state_dict()[name].add_(delta, alpha=0.7)
    direct["edited"] = score(EncoderClassifier(encoder, head), evalset)["accuracy"]  # test split

    suite = Suite.load(tiny_model, ["senti"], params, splits=("validation", "test"))
    assert suite.scores("validation")["senti"] == direct["validation"]
    assert suite.scores("test")["senti"] == direct["test"]
    assert suite.score_model(other, "test") == {"senti": direct["other-test"]}
    assert suite.score_model(other) == {"senti": direct["other-validation"]}  # default: the first split
    assert suite.at(tau, 0.7, "test") == {"senti": direct["edited"]}
    assert suite.scores("test")["senti"] == direct["test"]  # the editor restored the base
    with pytest.raises(TaskvecError, match="split 'train' was not loaded"):
        suite.accuracies("train")
    with pytest.raises(TaskvecError, match="keep_base"):
        suite.reset()


def test_row_caps_from_params_or_explicit(tiny_model, params):
    capped = params.model_copy(update={"eval": params.eval.model_copy(update={"max_rows": params.eval.max_rows.model_copy(update={"validation": 5})})})
    suite = Suite.load(tiny_model, ["senti"], capped, splits=("validation", "test"), max_rows={"test": 7})
    assert suite.scores("validation")["senti"]["n"] == 5
    assert suite.scores("test")["senti"]["n"] == 7
    assert suite.lineage("test")["senti"]["rows_used"] == 7


def test_search_and_evaluate_go_through_the_policy(tiny_model, params, install, loads):
    fake = install()
    encoder, _, _ = load_encoder(tiny_model)
    gen = torch.Generator().manual_seed(1)
    tau = {name: torch.randn(t.shape, generator=gen) * 0.05 for name, t in encoder.state_dict().items()}
    result = run_search(tiny_model, [(tau, 1.0)], "addition", ["senti"], params, progress=False)
    assert len(loads) == 1 and len(fake.placed) == 1
    assert fake.fed["batches"] >= len(result.evaluations) and result.details["device"] == "cpu"
    before = fake.fed["batches"]
    out = evaluate_model(tiny_model, "senti", params, split="test")
    assert out["n"] == 16 and fake.fed["batches"] > before


def _run_pipeline_to_compose(project):
    from pipeline.steps import compose, extract, finetune

    params_file = project / "params.yaml"
    for task in ("senti", "topic"):
        finetune.main(params_file, task)
        extract.main(params_file, task)
    compose.main(params_file)
    return params_file


def test_pipeline_steps_and_promotion_evaluator_use_the_harness(tiny_project, install, loads):
    from pipeline import params as P
    from pipeline.ops.promotion import default_evaluator
    from pipeline.steps import evaluate, search

    params_file = _run_pipeline_to_compose(tiny_project)
    loads.clear()
    fake = install()
    found = search.main(params_file)
    # the base once, then each fine-tuned model once for its reference accuracy
    assert len(loads) == 3 and len(fake.placed) == 3 and fake.fed["batches"] > 0
    rows = list(csv.DictReader((tiny_project / "outputs" / "search" / "curve.csv").open()))
    assert list(rows[0]) == ["lambda", "objective", "feasible", "acc/senti", "acc/topic", "acc/spam"]
    assert len(rows) == found["evaluations"] and float(rows[0]["lambda"]) == min(float(r["lambda"]) for r in rows)

    loads.clear()
    before = fake.fed["batches"]
    evaluate.main(params_file)
    assert len(loads) == 4 and len(fake.placed) == 7  # base, the edited model, two fine-tunes
    assert fake.fed["batches"] > before

    # Promotion: three tasks (targets senti, topic; control spam), one encoder load.
    p = P.load(params_file)
    loads.clear()
    before = fake.fed["batches"]
    scores = default_evaluator(P.model_dir(p), params_file)
    assert loads == [str(P.model_dir(p))] and fake.fed["batches"] > before
    expected = {}
    for task in ("senti", "topic", "spam"):
        head = P.finetuned_dir(p, task) / "heads" / f"{task}.safetensors"
        expected[task] = evaluate_model(P.model_dir(p), task, p, head_path=head if head.is_file() else None)["accuracy"]
    assert scores == expected
    # A folder without heads: the spam head is built from the base, loaded once more (not once per task).
    loads.clear()
    default_evaluator(p.base, params_file)
    assert loads == [str(p.base), str(p.base)]


@pytest.fixture
def bench_params(tmp_path, tiny_model):
    from benchmarks.paper.spec import ExperimentParams

    root = tmp_path / "bench-data"
    for i, name in enumerate(("senti", "ctrl")):
        write_mirror(root / name, sizes=(48, 16, 16), seed=10 * i)
    cls = {"labels": LABELS, "descriptions": ["bad", "good"]}
    data = {
        "base": str(tiny_model),
        "data_dir": str(root),
        "tasks": {n: {"source": n, **cls} for n in ("senti", "ctrl")},
        "train": {"steps": 3, "batch_size": 8, "max_length": 16, "lr": 1e-3, "warmup_ratio": 0.0},
        "eval": {"batch_size": 16, "max_length": 16},
        "search": {"grid_points": 5, "max_evals": 4, "lambda_max": 2.0},
        "bench": {"negation": {"targets": ["senti"], "control": "ctrl", "gradient_ascent": {"lrs": [1e-3], "steps": 3, "checkpoints": [2, 3], "batch_size": 8}}},
    }
    return parse_params(data, model=ExperimentParams)


def test_benchmark_evaluation_and_gradient_ascent_use_the_policy(bench_params, install, tmp_path):
    from benchmarks.paper.negation import gradient_ascent
    from benchmarks.paper.suite import open_suite, search

    fake = install()
    suite = open_suite(bench_params, ["senti", "ctrl"])
    assert fake.placed == [suite.encoder]
    base = {k: v.clone() for k, v in suite.encoder.state_dict().items()}
    measure = SuiteMetrics(suite, "validation", ["senti"], ["ctrl"])
    spec = bench_params.bench.negation.gradient_ascent
    ga = gradient_ascent(suite, bench_params, "senti", "ctrl", spec, measure, control_constraint(["ctrl"], measure.base, 100.0), 0, log=lambda m: None)
    assert fake.fed["labels"] == spec.steps * len(spec.lrs)  # every training batch's labels came through to()
    assert [p["step"] for p in ga["probes"]] == [0, 2, 3]
    assert all(torch.equal(v, base[k]) for k, v in suite.encoder.state_dict().items())  # reset to the base
    # lr 0 leaves the weights as they are: no probe beats the base, which is kept and reported without an lr
    kept = gradient_ascent(suite, bench_params, "senti", "ctrl", spec.model_copy(update={"lrs": [0.0]}), measure, control_constraint(["ctrl"], measure.base, 100.0), 0, log=lambda m: None)
    assert kept["steps"] == 0 and kept["lr"] is None and kept["validation"]["senti"] == measure.base["senti"]
    from benchmarks.paper.report import _lam

    assert _lam({"lr": [1e-05, None, 1e-05], "steps": 6.7, "steps_ci95": 1.2}) == "lr 1e-05, – (base kept), 1e-05, 6.7 ± 1.2 steps"
    gen = torch.Generator().manual_seed(0)
    tau = {n: torch.randn(t.shape, generator=gen) * 0.1 for n, t in base.items() if n.startswith("encoder.layer.0")}
    res = search(suite, bench_params, tau, "negation", ["senti"], controls=["ctrl"], sign=-1.0, curve_dir=tmp_path / "curve", log=lambda m: None)
    assert res.evaluations[0]["lambda"] == 0.0 and res.evaluations[0]["metrics"] == measure.at_base()
    assert set(res.evaluations[-1]["metrics"]) == {"senti", "ctrl", "ctrl/drop_se"}
    assert json.loads((tmp_path / "curve" / "search.json").read_text())["best_lambda"] == res.best_lambda


def test_a_suite_without_the_negation_control_loads_no_control_rows(bench_params):
    """benchmarks/bench_analogy.py opens a suite of the analogy's target alone: the negation control's
    rows of ``search.control_splits`` are not loaded (they were, and Suite.load refused them)."""
    from benchmarks.paper.suite import open_suite

    bench_params.search.control_splits = ["validation", "train"]
    assert set(open_suite(bench_params, ["senti", "ctrl"]).sets) == {"validation", "test", "control"}
    suite = open_suite(bench_params, ["senti"])
    assert set(suite.sets) == {"validation", "test"} and set(suite.sets["validation"]) == {"senti"}


def test_one_curve_writer_both_layouts(tmp_path):
    result = search_lambda(lambda lam: {"b": 0.5, "a": 0.9 - (lam - 0.3) ** 2}, addition_objective(["a"], {"a": 0.9}), SearchSpec())
    csv_path, png_path = write_curve(tmp_path, result, tasks=["a", "b"], score_column="objective", task_prefix="acc/")
    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == ["lambda", "objective", "feasible", "acc/a", "acc/b"]
    by_lambda = {e["lambda"]: e for e in result.evaluations}
    for row in rows:
        e = by_lambda[float(row["lambda"])]
        assert float(row["objective"]) == e["score"] and float(row["acc/a"]) == e["metrics"]["a"] and row["feasible"] == "1"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- deterministic mode: one policy decides, fine-tuning and a CUDA process use it ---------------------


def test_a_cuda_policy_enters_deterministic_mode_with_the_cublas_workspace(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset-below")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # restored (absent) at teardown
    before = torch.are_deterministic_algorithms_enabled()
    with DevicePolicy("cpu").determinism():  # CPU: deterministic algorithms, no cuBLAS setting
        assert torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with DevicePolicy("cuda").determinism():  # sets the mode only: no CUDA call is made
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled() == before
    # the process's policy, created where CUDA is available, switches the process to deterministic mode
    monkeypatch.setattr(suite_mod, "_POLICY", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        assert suite_mod.device().device.type == "cuda" and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


def test_finetuning_runs_on_the_policy_device_inside_its_deterministic_mode(tiny_model, params, tmp_path, monkeypatch):
    from transformers import Trainer

    from taskvec.train import finetune

    class Recording(DevicePolicy):
        def __init__(self):
            super().__init__("cpu")
            self.entered = 0

        @contextlib.contextmanager
        def determinism(self):
            self.entered += 1
            with super().determinism():
                yield

    fake = Recording()
    monkeypatch.setattr(suite_mod, "device", lambda: fake)
    seen = []
    real = Trainer.train

    def train(self, *a, **kw):
        seen.append((self.args.use_cpu, self.args.device.type, torch.are_deterministic_algorithms_enabled()))
        return real(self, *a, **kw)

    monkeypatch.setattr(Trainer, "train", train)
    before = torch.are_deterministic_algorithms_enabled()
    result = finetune("senti", params, tmp_path / "ft", steps=2, progress=False)
    assert fake.entered == 1 and seen == [(True, "cpu", True)]  # the policy's device, told to the Trainer, deterministic
    assert result.manifest["device"] == "cpu" and torch.are_deterministic_algorithms_enabled() == before
