"""Issue 11, engine side: what the engine does (not only what it refuses).

* the hash cache cannot be fooled by a rewritten file whose mtime was restored;
* previous taskvec outputs are replaced atomically, foreign data only with --force,
  through a symlink without leaving a temp link, never nesting earlier outputs;
* the λ grammar accepts the plain forms; OS errors name the user's path.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from taskvec import engine
from taskvec.errors import HomologyError, TaskvecError
from taskvec.io import TensorSource, check_output, file_sha256, hashing, user_path
from taskvec.vector import VectorFile, parse_vector_arg


def run_cli(capsys, *args) -> tuple[int, str, str]:
    from taskvec.cli import main as cli_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture(scope="module")
def vec(tiny_models, tmp_path_factory):
    base, ft1, _ = tiny_models
    return engine.extract(base, ft1, tmp_path_factory.mktemp("v") / "v.safetensors").path


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite_in_place(path: Path, data: bytes) -> None:
    """Overwrite ``path``'s bytes in place (same inode, same size) and restore its mtime, like ``touch -r``."""
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------
# the hash cache


def test_restored_mtime_does_not_fool_the_content_hash_cache(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "RACY_NS", 0)  # trust every entry: only the key can catch the rewrite
    base, ft1, ft2 = tiny_models
    b = _copy_model(base, tmp_path / "b")
    old = TensorSource(b).content_hash()  # cached now
    _rewrite_in_place(b / "model.safetensors", (ft2 / "model.safetensors").read_bytes())
    new = TensorSource(b).content_hash()
    assert new != old
    assert new == TensorSource(ft2).content_hash(use_cache=False)


def test_restored_mtime_does_not_fool_file_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "RACY_NS", 0)
    f = tmp_path / "x.bin"
    f.write_bytes(b"a" * 1000)
    assert file_sha256(f) == file_sha256(f, use_cache=False)
    _rewrite_in_place(f, b"b" * 1000)
    import hashlib

    assert file_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_apply_refuses_a_base_rewritten_with_restored_mtime(tiny_models, vec, tmp_path, monkeypatch):
    """The attack of the issue: the next apply must see the new base, not the cached hash of the old one."""
    monkeypatch.setattr(hashing, "RACY_NS", 0)
    base, _, ft2 = tiny_models
    b = _copy_model(base, tmp_path / "b")
    engine.apply(b, [(vec, 0.5)], tmp_path / "first")  # caches b's content hash
    _rewrite_in_place(b / "model.safetensors", (ft2 / "model.safetensors").read_bytes())
    with pytest.raises(HomologyError, match="differs from the hash"):
        engine.apply(b, [(vec, 0.5)], tmp_path / "second")
    assert not (tmp_path / "second").exists()


def test_cache_hits_when_nothing_changed(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "RACY_NS", 0)
    b = _copy_model(tiny_models[0], tmp_path / "b")
    calls = []
    real = TensorSource._hash_tensors
    monkeypatch.setattr(TensorSource, "_hash_tensors", lambda self: calls.append(1) or real(self))
    first = TensorSource(b).content_hash()
    assert TensorSource(b).content_hash() == first
    assert len(calls) == 1


def test_racily_clean_entry_is_rehashed(tiny_models, tmp_path, monkeypatch):
    """An entry stored too soon after the files changed is not believed (git's racy-clean rule)."""
    monkeypatch.setattr(hashing, "RACY_NS", 10**18)
    b = _copy_model(tiny_models[0], tmp_path / "b")
    calls = []
    real = TensorSource._hash_tensors
    monkeypatch.setattr(TensorSource, "_hash_tensors", lambda self: calls.append(1) or real(self))
    assert TensorSource(b).content_hash() == TensorSource(b).content_hash()
    assert len(calls) == 2


# ---------------------------------------------------------------------------
# outputs


def test_previous_output_is_replaced_without_nesting(tiny_models, vec, tmp_path):
    base = tiny_models[0]
    out = tmp_path / "edited"
    first = engine.apply(base, [(vec, 0.5)], out)
    second = engine.apply(base, [(vec, 0.25)], out)  # a taskvec output: replaced, no --force needed
    assert first["output_hash"] != second["output_hash"]
    assert TensorSource(out).content_hash(use_cache=False) == second["output_hash"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir()) + ["taskvec.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["edited"]  # no temp sibling left


def test_earlier_outputs_and_temp_folders_inside_a_model_are_not_copied(tiny_models, vec, tmp_path):
    b = _copy_model(tiny_models[0], tmp_path / "b")
    (b / "old-edit").mkdir()
    (b / "old-edit" / "taskvec.json").write_text("{}\n")
    (b / "old-edit" / "model.safetensors").write_bytes(b"x")
    (b / ".edited.host-1.abc.tmp").mkdir()
    (b / "1_Pooling").mkdir()
    (b / "1_Pooling" / "config.json").write_text("{}\n")
    engine.apply(b, [(vec, 1.0)], tmp_path / "out")
    names = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")}
    assert "1_Pooling/config.json" in names
    assert not any(n.startswith(("old-edit", ".edited")) for n in names)
    assert len(list((tmp_path / "out").rglob("*.safetensors"))) == 1


def test_force_replaces_a_foreign_folder_and_file(tiny_models, vec, tmp_path, capsys):
    base, ft1, _ = tiny_models
    (tmp_path / "D" / "docs").mkdir(parents=True)
    (tmp_path / "D" / "docs" / "f").write_text("x\n")
    code, _, err = run_cli(capsys, "apply", base, vec, "-o", tmp_path / "D", "-q")
    assert code == 2 and "--force" in err and (tmp_path / "D" / "docs" / "f").read_text() == "x\n"
    code, _, err = run_cli(capsys, "apply", base, vec, "-o", tmp_path / "D", "-q", "--force")
    assert code == 0, err
    assert not (tmp_path / "D" / "docs").exists() and (tmp_path / "D" / "taskvec.json").is_file()
    (tmp_path / "notes.safetensors").write_text("mine\n")
    code, _, err = run_cli(capsys, "extract", base, ft1, "-o", tmp_path / "notes.safetensors", "-q", "--force")
    assert code == 0, err
    assert VectorFile(tmp_path / "notes.safetensors").names


def test_force_never_allows_writing_over_an_input(tiny_models, vec, tmp_path):
    b = _copy_model(tiny_models[0], tmp_path / "b")
    before = (b / "model.safetensors").read_bytes()
    with pytest.raises(TaskvecError, match="is the input"):
        engine.apply(b, [(vec, 1.0)], b, force=True)
    with pytest.raises(TaskvecError, match="lies inside the input"):
        engine.extract(b, tiny_models[1], b / "model.safetensors", force=True)
    assert (b / "model.safetensors").read_bytes() == before


def test_symlinked_output_is_written_through_without_temp_links(tiny_models, vec, tmp_path):
    base = tiny_models[0]
    engine.apply(base, [(vec, 1.0)], tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    ledger = engine.apply(base, [(vec, 0.5)], tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert TensorSource(tmp_path / "real").content_hash(use_cache=False) == ledger["output_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    # a vector file through a symlink: the target is replaced, the link stays
    engine.extract(base, tiny_models[1], tmp_path / "v.safetensors")
    (tmp_path / "vl.safetensors").symlink_to(tmp_path / "v.safetensors")
    engine.combine([(tmp_path / "v.safetensors", 2.0)], tmp_path / "c.safetensors")
    engine.combine([(tmp_path / "c.safetensors", 0.5)], tmp_path / "vl.safetensors")
    assert (tmp_path / "vl.safetensors").is_symlink()
    torch.testing.assert_close(VectorFile(tmp_path / "v.safetensors").read(VectorFile(vec).names[0]), VectorFile(vec).read(VectorFile(vec).names[0]), rtol=0, atol=0)


def test_check_output_accepts_new_empty_and_taskvec_outputs(tmp_path, vec):
    assert check_output(tmp_path / "new", [vec], kind="folder") == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", [vec], kind="folder")
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "finetune.json").write_text("{}")
    (tmp_path / "ft" / "model.safetensors").write_bytes(b"x")
    check_output(tmp_path / "ft", [vec], kind="folder")
    (tmp_path / "old.safetensors").write_bytes(Path(vec).read_bytes())
    check_output(tmp_path / "old.safetensors", [], kind="file")


# ---------------------------------------------------------------------------
# the λ grammar


@pytest.mark.parametrize(("lam", "value"), [("0.5", 0.5), ("-1", -1.0), ("+2", 2.0), ("2e-3", 2e-3), (".5", 0.5), ("1.", 1.0), ("-1.5E+2", -150.0), ("0", 0.0)])
def test_lambda_grammar_accepts_plain_numbers(lam, value):
    assert parse_vector_arg(f"v.safetensors:{lam}") == ("v.safetensors", value)


@pytest.mark.parametrize("lam", ["1_0", "0x10", "inf", "-inf", "nan", "Infinity", "", " 1", "1 ", "1e", "e3", "١"])
def test_lambda_grammar_refuses_everything_else(lam):
    with pytest.raises(TaskvecError, match="plain decimal"):
        parse_vector_arg(f"v.safetensors:{lam}")


def test_a_file_name_with_a_colon_is_taken_whole(tmp_path):
    f = tmp_path / "task.safetensors:2"
    f.write_bytes(b"")
    assert parse_vector_arg(str(f)) == (str(f), 1.0)  # only the literal file exists
    (tmp_path / "task.safetensors").write_bytes(b"")
    with pytest.raises(TaskvecError, match="ambiguous"):
        parse_vector_arg(str(f))
    assert parse_vector_arg(f"{f}:1") == (str(f), 1.0)
    g = tmp_path / "a:b.safetensors"
    g.write_bytes(b"")
    assert parse_vector_arg(str(g)) == (str(g), 1.0)


# ---------------------------------------------------------------------------
# OS errors name the user's path


def test_user_path_maps_temp_names_back():
    assert user_path("/x/.v.safetensors.host_a-123.k2j3.tmp") == "/x/v.safetensors"
    assert user_path("/x/.out.host-9.abc.tmp/model.safetensors") == "/x/out"
    assert user_path("/x/.hidden/file") == "/x/.hidden/file"


def test_read_only_output_names_the_user_path(tiny_models, tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(kwargs["dir"], ".v.safetensors.h-1.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = tmp_path / "v.safetensors"
    code, _, err = run_cli(capsys, "extract", tiny_models[0], tiny_models[1], "-o", out, "-q")
    assert code == 2
    assert err == f"error: cannot write {out}: Read-only file system\n"


def test_os_error_outside_the_writers_is_one_line_exit_2(capsys, monkeypatch, tmp_path):
    from taskvec import engine as eng

    def boom(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".out.h-1.a.tmp" / "x"))

    monkeypatch.setattr(eng, "resolve_model", boom)
    code, _, err = run_cli(capsys, "extract", "a", "b", "-o", tmp_path / "v.safetensors", "-q")
    assert (code, err) == (2, f"error: Permission denied: {tmp_path / 'out'}\n")


def test_non_utf8_file_names_work(tiny_models, tmp_path, capsys):
    name = os.fsdecode(b"v\xff.safetensors")
    out = tmp_path / name
    code, stdout, err = run_cli(capsys, "extract", tiny_models[0], tiny_models[1], "-o", out, "-q")
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "inspect", out)
    assert code == 0 and "v\\udcff" in stdout


def test_header_validation_accepts_library_written_files(tmp_path):
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "empty": torch.zeros(0, 4), "i": torch.tensor([1, 2], dtype=torch.int64)}
    save_file(t, tmp_path / "m.safetensors", metadata={"format": "pt"})
    with TensorSource(tmp_path / "m.safetensors") as s:
        assert {n: s.read(n).tolist() for n in s.names()} == {k: v.tolist() for k, v in load_file(tmp_path / "m.safetensors").items()}
