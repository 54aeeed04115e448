"""Atomic writers of run state (runstate.py): contents, permission bits, no temporary files left."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from concept_ext.concepts import _atomic_save_tensors
from concept_ext.runstate import atomic_write_json, atomic_write_text, default_file_mode


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_text_has_umask_mode_and_no_leftovers(tmp_path, umask_022):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"x": [1, 2]})
    assert path.read_text() == '{\n  "x": [\n    1,\n    2\n  ]\n}\n'
    # mkstemp's 0600 must not leak into published outputs.
    assert _mode(path) == 0o644 == default_file_mode()
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_atomic_tensors_have_umask_mode(tmp_path, umask_022):
    path = tmp_path / "t.safetensors"
    _atomic_save_tensors(path, {"w": torch.randn(3, 2)}, {"k": "v"})
    assert _mode(path) == 0o644


def test_failed_write_leaves_old_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):  # the write itself fails (not a str) after the temp file exists
        atomic_write_text(path, object())  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
