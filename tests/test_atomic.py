"""loradrop_trainer.atomic: what lands has the umask's permissions, and a failed write leaves nothing behind."""

from __future__ import annotations

import json
import os
import stat

import pytest

from hub_export import TargetExistsError
from hub_export.atomic import Layout, atomic_directory
from loradrop_trainer import build_plan
from loradrop_trainer.atomic import atomic_write, staged_directory
from loradrop_trainer.report import PLAN_FILE, write_plan


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o027
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _fail(*args, **kwargs):
    raise OSError("disk full")


def test_atomic_write_gives_the_umask_permissions_and_replaces(tmp_path, umask_027):
    path = atomic_write(tmp_path / "new" / "a.json", "first")
    assert path.read_text() == "first" and _mode(path) == 0o640
    os.chmod(path, 0o600)
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second" and _mode(path) == 0o640
    assert os.listdir(path.parent) == ["a.json"]


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, step):
    path = atomic_write(tmp_path / "a.json", "old")
    monkeypatch.setattr(os, step, _fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


def test_staged_directory_replaces_the_target_with_ordinary_permissions(tmp_path, umask_027):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with staged_directory(target) as staging:
        fd = os.open(staging / "weights", os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors writes its files
        os.close(fd)
        (staging / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(staging / "run.sh", 0o700)
    assert sorted(os.listdir(target)) == ["run.sh", "weights"] and os.listdir(tmp_path) == ["out"]
    assert (_mode(target), _mode(target / "weights"), _mode(target / "run.sh")) == (0o750, 0o640, 0o750)


def test_a_failed_staging_keeps_the_target_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "kept.txt").write_text("old")
    with pytest.raises(KeyError), staged_directory(target) as staging:
        (staging / "half").write_text("partial")
        raise KeyError("killed")
    monkeypatch.setattr(os, "replace", _fail)
    with pytest.raises(OSError, match="disk full"), staged_directory(target) as staging:
        (staging / "new").write_text("complete")
    assert os.listdir(target) == ["kept.txt"] and os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("earlier", [False, True], ids=["missing", "earlier-output"])
def test_21_12_a_file_another_process_writes_into_the_target_meanwhile_is_refused_not_deleted(tmp_path, earlier):
    """Issue 21, item 12: the target is checked before writing and again just before it is replaced; a file that
    appeared in it while the new directory was being written (a missing target created by someone else, or an earlier
    output that gained a file) used to be deleted with the old version."""
    layout = Layout("test output", frozenset({"data.txt"}), marker="data.txt")
    target = tmp_path / "out"
    if earlier:
        with atomic_directory(target, layout) as staging:
            (staging / "data.txt").write_text("earlier")
    with pytest.raises(TargetExistsError, match=r"holds notes\.txt"), atomic_directory(target, layout) as staging:
        (staging / "data.txt").write_text("new")
        target.mkdir(exist_ok=True)  # another process, while this one writes
        (target / "notes.txt").write_text("theirs")
    assert (target / "notes.txt").read_text() == "theirs"
    assert sorted(os.listdir(target)) == (["data.txt", "notes.txt"] if earlier else ["notes.txt"])
    assert not earlier or (target / "data.txt").read_text() == "earlier"
    assert os.listdir(tmp_path) == ["out"], "no staging or moved-aside directory is left"


def test_the_plan_file_is_readable_by_others_and_never_left_half_written(tmp_path, monkeypatch):
    previous = os.umask(0o022)
    try:
        plan = build_plan({"a.q": 2.0, "b.q": 1.0, "c.q": 1.0}, {"a.q": "q", "b.q": "q", "c.q": "q"}, 0.5)
        path = write_plan(plan, tmp_path, {"config": {"alpha": 0.1}})
    finally:
        os.umask(previous)
    assert path == tmp_path / PLAN_FILE and _mode(path) == 0o644
    assert json.loads(path.read_text())["config"] == {"alpha": 0.1}
    monkeypatch.setattr(os, "fsync", _fail)
    with pytest.raises(OSError, match="disk full"):
        write_plan(plan, tmp_path, {"config": {"alpha": 0.2}})
    assert json.loads(path.read_text())["config"] == {"alpha": 0.1} and os.listdir(tmp_path) == [PLAN_FILE]
