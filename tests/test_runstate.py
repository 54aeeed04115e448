"""Atomic writers of run state (runstate.py): contents, permission bits, no temporary files left."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from concept_ext.concepts.base import _atomic_save_tensors
from concept_ext.runstate import atomic_write_json, atomic_write_text, default_file_mode, dumps_json, float32_list


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
    assert path.read_text() == '{\n  "x": [1, 2]\n}\n'
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


def test_dumps_json_puts_scalar_arrays_on_one_line_and_round_trips():
    obj = {"a": [1, 2.5, -3e-05, None, True], "nested": [[1, 2], [3.0, -4]], "objs": [{"x": [1]}], "empty": [],
           "mixed": ["s", 1], "special": [float("inf"), -float("inf")], "text": "[1,\n 2]"}
    text = dumps_json(obj)
    assert json.loads(text) == obj
    assert '"a": [1, 2.5, -3e-05, null, true]' in text and "[1, 2]," in text and "[3.0, -4]" in text
    assert '"mixed": [\n    "s",\n    1\n  ]' in text  # only arrays of scalars are folded
    assert '"text": "[1,\\n 2]"' in text  # strings are left alone


def test_float32_list_is_exact_and_short():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(300, 7, generator=gen) * 10.0 ** torch.randint(-30, 30, (300, 7), generator=gen)
    t[0, :4] = torch.tensor([float("inf"), -0.0, 0.0, float("-inf")])
    values = float32_list(t)
    assert torch.equal(torch.tensor(values, dtype=torch.float32), t)  # every float32 value comes back
    assert len(json.dumps(values)) < 0.75 * len(json.dumps(t.tolist()))
    assert float32_list(torch.zeros(0, 3)) == [] and float32_list(torch.tensor(1.5)) == 1.5


def test_stage_outputs_are_verified(tmp_path, caplog):
    """A record lists its stage's files (size, SHA-256); a changed, truncated or deleted file is named."""
    from concept_ext.runstate import StageRecord, output_digests, read_record, verify_outputs, write_record

    d = tmp_path / "fit"
    (d / "sae").mkdir(parents=True)
    (d / "sae" / "sae.safetensors").write_bytes(b"weights" * 100)
    (d / "cfg.json").write_text("{}")
    (d / ".tmp-x").write_text("scratch")  # hidden temporaries are not outputs
    rec = StageRecord("fit", "fp", 1.0, outputs=output_digests(d))
    assert sorted(rec.outputs) == ["cfg.json", "sae/sae.safetensors"]
    write_record(d, rec)
    assert read_record(d).outputs == rec.outputs and verify_outputs(d, read_record(d)) is None
    (d / "sae" / "sae.safetensors").write_bytes(b"Weights" * 100)  # same size, other bytes
    assert "sae.safetensors changed" in verify_outputs(d, rec)
    (d / "sae" / "sae.safetensors").write_bytes(b"w")
    assert "sae.safetensors has 1 bytes" in verify_outputs(d, rec)
    (d / "cfg.json").unlink()
    assert "cfg.json is missing" in verify_outputs(d, rec)
    assert verify_outputs(d, StageRecord("fit", "fp", 1.0)) is None  # records from before: trusted
    (d / "stage.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="concept_ext"):
        assert read_record(d) is None
    assert str(d / "stage.json") in caplog.text and "redone" in caplog.text
