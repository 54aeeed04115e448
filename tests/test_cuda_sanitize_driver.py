"""tools/cuda_sanitize.py (the program compute-sanitizer runs on a GPU) on the CPU kernels: its checks
pass on correct kernels, and it refuses to run on CUDA without CUDA kernels rather than pass vacuously."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import cuda_sanitize  # noqa: E402


def test_driver_passes_on_the_cpu_kernels(capsys):
    assert cuda_sanitize.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "BAD" not in out and out.count(" ok ") >= 4 * 12


def test_driver_catches_a_wrong_kernel(monkeypatch, capsys):
    import concept_ext

    real = concept_ext.sparse_decode
    monkeypatch.setattr(concept_ext, "sparse_decode", lambda v, i, W, b: real(v, i, W, b) * 1.01)
    assert not cuda_sanitize.run(67, 45, 301, 7, torch.float32, 0, "cpu")
    assert "BAD sparse_decode " in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the CUDA path runs (tests/test_ops_cuda.py)")
def test_driver_needs_cuda_kernels():
    assert cuda_sanitize.main([]) == 2
