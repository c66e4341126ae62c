"""Security: no code path unpickles untrusted data; credentials never reach logs or model cards.

1. A static (AST) scan of every module in ``taskvec/``, ``pipeline/``,
   ``tasks/`` and ``flows/`` for calls that run code from data:
   ``pickle``/``dill``/``cloudpickle``/``joblib``/``marshal``/``shelve``
   loads, ``torch.load`` without ``weights_only=True``, ``yaml.load`` without
   a safe loader, ``numpy.load(allow_pickle=True)``, ``pandas.read_pickle``,
   MLflow flavours that unpickle (``mlflow.pyfunc/pytorch/sklearn.load_model``),
   ``trust_remote_code=True``, ``weights_only=False`` and builtin
   ``eval``/``exec``. The scanner is itself tested on snippets that must be
   flagged (and ones that must not), so a silent scanner cannot pass.
2. Behaviour: a pickle checkpoint is refused by default and, when allowed, is
   loaded with ``weights_only=True`` — a pickle carrying code does not run.
3. Credential redaction (:mod:`taskvec.redact`, and the pipeline's own
   redaction once it exists) on the URIs of issue 6 and friends.
"""

from __future__ import annotations

import ast
import importlib
import logging
import pickle
from pathlib import Path

import pytest

from taskvec.errors import TaskvecError
from taskvec.redact import MASK, RedactingFilter, redact_mapping, redact_text, redact_uri, secret_values

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("taskvec", "pipeline", "tasks", "flows")

# ---------------------------------------------------------------------------
# 1. static scan

#: calls that deserialise with pickle (or run stored code) whatever their arguments
ALWAYS_UNSAFE = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
    "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
    "joblib.load", "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle",
    "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all",
    "mlflow.pyfunc.load_model", "mlflow.pytorch.load_model", "mlflow.sklearn.load_model",
    "torch.serialization.load",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _literal(node: ast.AST | None):
    return node.value if isinstance(node, ast.Constant) else None


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin for every import in the module (``import pickle as p``, ``from yaml import load``)."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def scan_source(source: str, filename: str = "<snippet>") -> list[str]:
    """Every unsafe call in ``source`` as ``file:line: what``."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        if name in ALWAYS_UNSAFE:
            flag(node, f"{name}() deserialises untrusted data")
        elif name == "torch.load":
            if _literal(_kw(node, "weights_only")) is not True:
                flag(node, "torch.load without weights_only=True")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            lname = (_dotted(loader, aliases) or "").rsplit(".", 1)[-1] if loader is not None else ""
            if lname not in SAFE_YAML_LOADERS:
                flag(node, f"{name} without a safe Loader")
        elif name in ("numpy.load", "np.load") and _kw(node, "allow_pickle") is not None and _literal(_kw(node, "allow_pickle")) is not False:
            flag(node, "numpy.load with allow_pickle")
        elif isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec") and node.func.id not in aliases:
            flag(node, f"builtin {node.func.id}()")
        for kw in node.keywords:
            if kw.arg == "weights_only" and _literal(kw.value) is False and name != "torch.load":
                flag(node, "weights_only=False")  # e.g. passed through to a loader
            if kw.arg == "trust_remote_code" and _literal(kw.value) is not False:
                flag(node, "trust_remote_code not literally False (runs code downloaded with a model)")
    return found


def _modules() -> list[Path]:
    files = []
    for pkg in SCANNED:
        files += sorted((ROOT / pkg).rglob("*.py"))
    return files


def test_scanner_flags_unsafe_calls():
    bad = """
import pickle, torch, yaml, dill, joblib, marshal
import pickle as pk
from pickle import loads as L
from yaml import load as yl
import numpy as np
import mlflow
from transformers import AutoModel
pickle.load(f); pk.loads(b); L(b); dill.load(f); joblib.load(p); marshal.loads(b)
torch.load(p); torch.load(p, weights_only=False); torch.load(p, map_location="cpu")
yaml.load(s); yl(s, Loader=yaml.Loader); yaml.full_load(s); yaml.unsafe_load(s)
np.load(p, allow_pickle=True)
mlflow.pyfunc.load_model(u); mlflow.pytorch.load_model(u)
AutoModel.from_pretrained(p, trust_remote_code=True)
eval(text); exec(code)
"""
    found = scan_source(bad)
    assert len(found) == 19, "\n".join(found)


def test_scanner_accepts_safe_calls():
    good = """
import torch, yaml
import numpy as np
from yaml import safe_load
torch.load(p, map_location="cpu", weights_only=True)
yaml.safe_load(s); safe_load(s); yaml.load(s, Loader=yaml.SafeLoader); yaml.load(s, yaml.CSafeLoader)
np.load(p); np.load(p, allow_pickle=False)
model.eval(); obj.exec_module(m)
AutoModel.from_pretrained(p, trust_remote_code=False)
"""
    assert scan_source(good) == []


def test_scanned_packages_exist():
    assert (ROOT / "taskvec" / "io" / "reader.py").is_file()
    assert any(m.parent.name == "io" for m in _modules())
    assert any(m.parent.name == "pipeline" for m in _modules())


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_unpickles_or_evaluates_data(path):
    assert scan_source(path.read_text(), str(path.relative_to(ROOT))) == []


# ---------------------------------------------------------------------------
# 2. behaviour: pickle refused by default, weights_only when allowed


class _Exploit:
    """Unpickling this runs ``os.system``-like code: here it just creates a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_never_runs(tmp_path, tiny_models):
    from taskvec import engine

    marker = tmp_path / "pwned"
    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"embeddings.word_embeddings.weight": _Exploit(str(marker))}, f)
    with pytest.raises(TaskvecError, match="pickle checkpoint refused"):
        engine.extract(tiny_models[0], tmp_path / "evil", tmp_path / "v.safetensors")
    with pytest.raises(TaskvecError, match="weights_only=True"):
        engine.extract(tiny_models[0], tmp_path / "evil", tmp_path / "v.safetensors", allow_pickle=True)
    assert not marker.exists(), "a pickled payload ran"
    assert not (tmp_path / "v.safetensors").exists()


# ---------------------------------------------------------------------------
# 3. credential redaction

SECRET = "s3cr3t-Tok3n"
URIS = [
    # (uri, secret that must vanish, part that must survive)
    (f"postgresql://user:{SECRET}@host/db", SECRET, "postgresql://user:***@host/db"),
    (f"postgresql+psycopg2://mlflow:{SECRET}@127.0.0.1:5432/mlflow?sslmode=require", SECRET, "@127.0.0.1:5432/mlflow?sslmode=require"),
    (f"http://user:{SECRET}@host", SECRET, "http://user:***@host"),
    (f"https://user:{SECRET}@mlflow.example.com:443/api/2.0", SECRET, "mlflow.example.com:443/api/2.0"),
    (f"https://host/?token={SECRET}", SECRET, "https://host/?token=***"),
    (f"https://host/path?run=1&access_token={SECRET}&x=2", SECRET, "run=1&access_token=***&x=2"),
    (f"https://host/#token={SECRET}", SECRET, "https://host/#token=***"),
    (f"https://{SECRET}@github.com/org/repo.git", SECRET, "@github.com/org/repo.git"),
    (f"s3://bucket/obj?X-Amz-Credential=AKIA1234&X-Amz-Signature={SECRET}", SECRET, "s3://bucket/obj?"),
    (f"postgresql://user:pa/ss{SECRET}@host/db", SECRET, "@host/db"),
]
UNCHANGED = ["sqlite:///mlflow.db", "file:///tmp/mlruns", "http://127.0.0.1:5000", "https://host/api?run_id=1&tokenizer=bert", "mlartifacts", "postgresql://127.0.0.1:5432/mlflow"]


@pytest.mark.parametrize(("uri", "secret", "kept"), URIS, ids=[u[0].split(":")[0] + str(i) for i, u in enumerate(URIS)])
def test_redact_uri_hides_credentials(uri, secret, kept):
    out = redact_uri(uri)
    assert secret not in out and MASK in out and kept in out, out
    assert redact_uri(out) == out  # idempotent


@pytest.mark.parametrize("uri", UNCHANGED)
def test_redact_uri_leaves_clean_uris_alone(uri):
    assert redact_uri(uri) == uri


def test_redact_text_and_mapping(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "envPassw0rd")
    monkeypatch.setenv("HF_TOKEN", "hf_" + "a" * 34)
    text = (
        f"tracking at postgresql://u:{SECRET}@db/x; MLFLOW_TRACKING_TOKEN={SECRET} "
        "Authorization: Bearer abcdefghijklmnop password: 'envPassw0rd' hub hf_" + "a" * 34 + " tokenizer=bert-base"
    )
    out = redact_text(text)
    for s in (SECRET, "envPassw0rd", "abcdefghijklmnop", "hf_aaaa"):
        assert s not in out, out
    assert "tokenizer=bert-base" in out and "postgresql://u:***@db/x" in out
    assert set(secret_values()) >= {"envPassw0rd", "hf_" + "a" * 34}
    card = {"tracking_uri": f"http://u:{SECRET}@h", "api_key": SECRET, "lr": 0.1, "nested": {"token": SECRET, "tags": [f"https://h/?token={SECRET}"]}, "author": "me"}
    clean = redact_mapping(card)
    assert SECRET not in repr(clean)
    assert clean["lr"] == 0.1 and clean["author"] == "me" and clean["tracking_uri"] == "http://u:***@h"


def test_redacting_log_filter(caplog):
    logger = logging.getLogger("taskvec.test.redact")
    flt = RedactingFilter()
    logger.addFilter(flt)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("tracking uri %s", f"postgresql://u:{SECRET}@db/x")
    finally:
        logger.removeFilter(flt)
    assert SECRET not in caplog.text and "postgresql://u:***@db/x" in caplog.text


#: the three URIs issue 6 names, checked against every redaction function the pipeline defines
ISSUE_URIS = [(f"postgresql://user:{SECRET}@host/db", "postgresql"), (f"http://user:{SECRET}@host", "http-userinfo"), (f"https://host/?token={SECRET}", "https-token")]
#: known gaps, reported to the lead (strict: the test fails once fixed, so the mark gets removed)
KNOWN_GAPS: dict[tuple[str, str], str] = {}


def _pipeline_redactors() -> list[tuple[str, object]]:
    """Redaction functions the pipeline defines (``*redact*`` callables in pipeline modules)."""
    out = []
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        if "redact" not in path.read_text():
            continue
        mod = importlib.import_module(f"pipeline.{path.stem}")
        for name in dir(mod):
            obj = getattr(mod, name)
            if "redact" in name.lower() and callable(obj) and getattr(obj, "__module__", "") == mod.__name__:
                out.append((f"{path.stem}.{name}", obj))
    return out


def _redactor_cases():
    cases = []
    for rid, fn in _pipeline_redactors():
        for uri, uid in ISSUE_URIS:
            gap = KNOWN_GAPS.get((rid, uid))
            marks = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
            cases.append(pytest.param(fn, uri, id=f"{rid}-{uid}", marks=marks))
    return cases or [pytest.param(None, None, marks=pytest.mark.skip(reason="the pipeline defines no redaction function"))]


@pytest.mark.parametrize(("redactor", "uri"), _redactor_cases())
def test_pipeline_redaction_hides_credentials(redactor, uri):
    """Whatever the pipeline uses to print tracking/database URLs hides their credentials."""
    out = redactor(uri)
    assert SECRET not in out and "host" in out, out


def test_tracker_never_logs_credentials(tmp_path, monkeypatch, caplog):
    """An unusable tracking store with a password in its URI: the one-line error masks the password."""
    from types import SimpleNamespace

    tracking = pytest.importorskip("pipeline.ops.tracking")
    uri = f"postgresql://mlflow:{SECRET}@127.0.0.1:9/mlflow"
    p = SimpleNamespace(root=tmp_path, mlflow=SimpleNamespace(tracking_uri=uri, artifact_root="mlartifacts", experiment="x"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with caplog.at_level(logging.DEBUG), pytest.raises(TaskvecError) as exc:
        tracking.Tracker(p)
    assert SECRET not in str(exc.value) and "127.0.0.1" in str(exc.value)
    assert SECRET not in caplog.text
