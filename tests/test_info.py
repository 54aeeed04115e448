"""`python -m concept_ext info --json`: per-op implementation on CPU and CUDA, versions, build facts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import concept_ext
from concept_ext.ops import OP_NAMES

ROOT = Path(__file__).resolve().parents[1]


def test_info_json_cli():
    res = subprocess.run([sys.executable, "-m", "concept_ext", "info", "--json"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["torch_version"] == torch.__version__
    assert set(info["ops"]) == set(OP_NAMES)
    for op, impl in info["ops"].items():
        assert impl["cpu"] in ("cpu_kernel", "reference") and impl["cuda"] in ("cuda_kernel", "reference"), op
        assert impl["cpu"] == ("cpu_kernel" if concept_ext.HAS_C_EXTENSION else "reference")
    assert isinstance(info["cuda_kernels_built"], bool)
    assert "cuda_arch_list" in info and "extension_loaded" in info


@pytest.mark.skipif(not concept_ext.KERNELS_REQUIRED and not concept_ext.HAS_C_EXTENSION,
                    reason="extension not built and CONCEPT_EXT_REQUIRE_KERNELS unset (a user's fallback install)")
def test_info_json_reports_cpu_kernels_when_required():
    """With CONCEPT_EXT_REQUIRE_KERNELS=1 (make test, CI), every op must be served by its compiled CPU kernel:
    a broken or partial build fails here (or at import) instead of passing on the reference ops."""
    env = {**os.environ, concept_ext.REQUIRE_KERNELS_ENV: "1"}
    res = subprocess.run([sys.executable, "-m", "concept_ext", "info", "--json"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120)
    assert res.returncode == 0, f"info --json failed with the kernels required:\n{res.stderr}"
    info = json.loads(res.stdout)
    assert info["extension_loaded"] is True and info["extension_error"] is None, info
    served = {op: impl["cpu"] for op, impl in info["ops"].items()}
    assert set(served) == set(OP_NAMES)
    assert served == {op: "cpu_kernel" for op in OP_NAMES}, served
