"""Build and dispatch information: which implementation serves each op on CPU and on CUDA.

``python -m concept_ext info --json`` prints :func:`build_info` as JSON.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from concept_ext.ops import OP_NAMES

_PUBLIC_OPS = ("topk_encode", "sparse_decode", "activation_rate_loss", "ablate_decode")


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"concept_ext::{op}", key)


def kernel_for(op: str, device: str) -> str:
    """``"cpu_kernel"``, ``"cuda_kernel"`` or ``"reference"``: what serves ``op`` on ``device``."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    return f"{device}_kernel" if _has_kernel(op, key) else "reference"


def build_info() -> dict[str, Any]:
    """Versions, build flags and the implementation of every op per device (JSON-serialisable)."""
    import concept_ext

    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    built: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            built = json.load(f)
    ops = {
        op: {"cpu": kernel_for(op, "cpu"), "cuda": kernel_for(op, "cuda")}
        for op in OP_NAMES
    }
    return {
        "concept_ext_version": concept_ext.__version__,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "extension_loaded": concept_ext.HAS_C_EXTENSION,
        "extension_error": concept_ext.C_EXTENSION_ERROR,
        "cuda_kernels_built": bool(built.get("cuda_built", False)),
        "cuda_arch_list": built.get("cuda_arch_list"),
        "build": built,
        "public_ops": list(_PUBLIC_OPS),
        "ops": ops,
    }


def format_info(info: dict[str, Any]) -> str:
    """A short human-readable table of :func:`build_info`."""
    lines = [
        f"concept_ext {info['concept_ext_version']}  torch {info['torch_version']}"
        f"  CUDA {info['torch_cuda_version']}  extension loaded: {info['extension_loaded']}",
        f"CUDA kernels built: {info['cuda_kernels_built']} (arch {info['cuda_arch_list']})",
        f"{'op':34s} {'cpu':12s} {'cuda':12s}",
    ]
    for op, impl in info["ops"].items():
        lines.append(f"{op:34s} {impl['cpu']:12s} {impl['cuda']:12s}")
    if info["extension_error"]:
        lines.append(f"extension error: {info['extension_error']}")
    return "\n".join(lines)
