"""train/files.py: a file is replaced whole or left as it was."""

from __future__ import annotations

import os

import pytest

from train.files import write_text_atomic


def test_a_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "config.yaml"
    write_text_atomic(path, "old\n")
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left behind


def test_a_write_interrupted_before_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "stopped.json"
    write_text_atomic(path, "old\n")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["stopped.json"]


def test_a_written_file_has_the_umask_s_mode_not_mkstemp_s(tmp_path):
    mask = os.umask(0o022)
    try:
        path = tmp_path / "result.json"
        write_text_atomic(path, "{}\n")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_text_atomic(path, "{}\n")
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(mask)
