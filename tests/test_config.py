"""Params validation: defaults, task naming, and one-line refusals that name the key."""

from __future__ import annotations

import pytest

from taskvec.config import DEFAULT_BASE, Params, load_params, parse_params
from taskvec.errors import TaskvecError

GOOD = """
data_dir: data
tasks:
  sst2:
    source: ../shared/data/sst2
    labels: [negative, positive]
    descriptions: [a negative review, a positive review]
    max_rows: {train: 100}
  yelp_lm: {source: yelp_lm, kind: mlm}
train: {steps: 7}
search: {strategy: grid}
"""


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_good_file_loads_with_defaults(tmp_path):
    params = load_params(write(tmp_path, GOOD))
    assert params.base == DEFAULT_BASE
    sst2 = params.task("sst2")
    assert sst2.name == "sst2" and sst2.kind == "classification"
    assert sst2.head_texts == ["a negative review", "a positive review"]
    assert sst2.max_rows.train == 100 and sst2.max_rows.test is None
    assert params.task("yelp_lm").labels == []
    assert params.train.steps == 7 and params.train.batch_size == 16
    assert params.search.strategy == "grid" and params.search.grid_points == 21 and params.search.max_evals == 8
    assert params.data_root() == (tmp_path / "data").resolve()


def test_empty_file_gives_defaults(tmp_path):
    params = load_params(write(tmp_path, ""))
    assert params.tasks == {} and params.data_dir == "../shared/data"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("trian: {steps: 3}", "trian: Extra inputs are not permitted"),
        ("train: {steps: many}", "train.steps: Input should be a valid integer"),
        ("train: {steps: 0}", "train.steps: Input should be greater than 0"),
        ("tasks: {a: {source: x, labels: [p, q], colour: red}}", "tasks.a.colour: Extra inputs"),
        ("tasks: {a: {source: x, labels: [p]}}", "tasks.a: a classification task needs at least 2 labels"),
        ("tasks: {a: {source: x, labels: [p, p]}}", "tasks.a: labels must be unique"),
        ("tasks: {a: {source: x, labels: [p, q], descriptions: [one]}}", "descriptions has 1 entries for 2 labels"),
        ("tasks: {a: {source: x, kind: mlm, labels: [p, q]}}", "an mlm task declares no labels"),
        ("tasks: {a: {source: x, kind: regression, labels: [p, q]}}", "tasks.a.kind"),
        ("tasks: {a: {name: b, source: x, labels: [p, q]}}", "tasks.a.name is 'b'"),
        ("search: {strategy: random}", "search.strategy"),
        ("search: {lambda_min: 1.0}", "lambda_min (1.0) must be below lambda_max (1.0)"),
        ("eval: {max_rows: {dev: 3}}", "eval.max_rows.dev: Extra inputs"),
        ("- a\n- b", "expected a mapping at the top level"),
        ("train: [unclosed", "invalid YAML"),
    ],
)
def test_bad_files_are_refused_in_one_line_naming_the_key(tmp_path, text, expected):
    with pytest.raises(TaskvecError) as err:
        load_params(write(tmp_path, text))
    message = str(err.value)
    assert expected in message
    assert "\n" not in message and message.startswith(str(tmp_path / "params.yaml"))


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(TaskvecError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_unknown_task_lists_the_known_ones():
    params = parse_params({"tasks": {"b": {"source": "x", "labels": ["p", "q"]}, "a": {"source": "y", "labels": ["p", "q"]}}})
    with pytest.raises(TaskvecError, match=r"unknown task 'c' \(params declare: a, b\)"):
        params.task("c")


def test_params_can_be_extended_with_new_sections(tmp_path):
    from taskvec.config import _Strict

    class Edit(_Strict):
        lam: float = 0.5

    class Extended(Params):
        edit: Edit = Edit()

    params = load_params(write(tmp_path, "edit: {lam: 0.3}"), model=Extended)
    assert params.edit.lam == 0.3
    with pytest.raises(TaskvecError, match="edit.lam"):
        load_params(write(tmp_path, "edit: {lam: x}"), model=Extended)


# ---------------------------------------------------------------------------
# One reader, memoised: a file is parsed and validated once per content and schema


def _count_parses(monkeypatch):
    from taskvec import config

    calls = []
    real = config._parse_yaml
    monkeypatch.setattr(config, "_parse_yaml", lambda path, text: calls.append(path) or real(path, text))
    monkeypatch.setattr(config, "_MEMO", type(config._MEMO)())
    return calls


def test_load_params_parses_a_file_once_and_hands_out_copies(tmp_path, monkeypatch):
    calls = _count_parses(monkeypatch)
    path = write(tmp_path, GOOD)
    a = load_params(path)
    b = load_params(str(path))
    c = load_params(tmp_path / "." / "params.yaml")
    assert len(calls) == 1
    assert a == b == c and a is not b
    a.train.steps = 99  # a caller's changes stay in its copy
    assert load_params(path).train.steps == 7 and len(calls) == 1
    assert b.data_root() == (tmp_path / "data").resolve()  # the private root survives the copy


def test_load_params_sees_every_edit_even_within_one_timestamp_tick(tmp_path, monkeypatch):
    calls = _count_parses(monkeypatch)
    path = write(tmp_path, "train: {steps: 7}\n")
    assert load_params(path).train.steps == 7
    path.write_text("train: {steps: 8}\n")  # same size, written at once: a stat-keyed memo could miss it
    assert load_params(path).train.steps == 8
    path.write_text("train: {steps: 7}\n")
    assert load_params(path).train.steps == 7
    assert len(calls) == 2  # the first content was parsed once, then reused


def test_load_params_memo_is_per_schema_and_errors_are_not_cached(tmp_path, monkeypatch):
    from taskvec.config import _Strict

    class Extended(Params):
        extra_section: _Strict = _Strict()

    calls = _count_parses(monkeypatch)
    path = write(tmp_path, "train: {steps: 3}\n")
    assert type(load_params(path)) is Params
    assert type(load_params(path, model=Extended)) is Extended
    assert len(calls) == 2
    path.write_text("train: {steps: 0}\n")
    for _ in range(2):
        with pytest.raises(TaskvecError, match="train.steps"):
            load_params(path)
    assert len(calls) == 4


def test_core_app_still_refuses_pipeline_sections(tmp_path, capsys):
    """``taskvec.cli.build_app()`` (core schema) refuses sections it does not know, in one line."""
    from taskvec.cli import build_app, run_app

    path = write(tmp_path, GOOD + "finetune: {tasks: [sst2]}\n")
    with pytest.raises(SystemExit) as exc:
        run_app(build_app(), ["evaluate", "some-model", "--task", "sst2", "--params", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: finetune: Extra inputs are not permitted\n"


def test_overrides_and_the_merged_mapping_come_from_one_parse(tmp_path, monkeypatch):
    calls = _count_parses(monkeypatch)
    path = write(tmp_path, GOOD)
    params, mapping = load_params(path, overrides=["train.steps=3", "search.grid_points=4"], with_mapping=True)
    assert len(calls) == 1  # the file's own validation and the overridden one share the parse
    assert (params.train.steps, params.search.grid_points, params.search.strategy) == (3, 4, "grid")
    assert mapping["train"] == {"steps": 3} and mapping["search"] == {"strategy": "grid", "grid_points": 4}
    assert parse_params(mapping, root=tmp_path.resolve()) == params  # the mapping is exactly what was validated
    assert load_params(path).train.steps == 7  # the memoised file is untouched by the overrides
    again, same = load_params(path, with_mapping=True)
    assert len(calls) == 2 and same["train"] == {"steps": 7} and again.train.steps == 7  # a memo hit parses only for the mapping
    with pytest.raises(TaskvecError, match="with -S: train.steps"):
        load_params(path, overrides=["train.steps=0"], with_mapping=True)
