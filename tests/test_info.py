"""`python -m concept_ext info --json`: per-op implementation on CPU and CUDA, versions, build facts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
