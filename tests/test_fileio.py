"""The one home of atomic writes (vllm_slq.fileio): complete or absent, never half written,
and an existing target survives any failure."""
import json

import pytest

from vllm_slq.fileio import atomic_dir, atomic_path, atomic_write, atomic_write_json


def test_atomic_write_and_json_leave_only_the_target(tmp_path):
    atomic_write(tmp_path / "a" / "x.txt", "hello")
    atomic_write_json(tmp_path / "a" / "y.json", {"b": 1, "a": 2}, sort_keys=True)
    assert (tmp_path / "a" / "x.txt").read_text() == "hello"
    assert json.loads((tmp_path / "a" / "y.json").read_text()) == {"a": 2, "b": 1}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.txt", "y.json"]


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "w.png"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path  # writers that infer format see it
            tmp.write_text("half")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.png"]


def test_atomic_dir_publishes_on_success_and_removes_the_temp_on_failure(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(ValueError):
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise ValueError("quantization failed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(out, durable=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").exists()
    with pytest.raises(FileExistsError, match="ckpt"):
        with atomic_dir(out):
            pass


def test_atomic_dir_replace_swaps_only_after_success(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyError):
        with atomic_dir(out, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyError("late failure")
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the old output survives
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp or old directory left
