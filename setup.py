"""Build the ``concept_ext._C`` extension.

* The C++ CPU kernels are always built (``CppExtension``).
* The CUDA kernels are added (``CUDAExtension``) when the installed PyTorch was built with CUDA and a
  CUDA toolkit is found (``torch.version.cuda`` and ``CUDA_HOME``); never gated on a visible GPU.
* ``CONCEPT_EXT_FORCE_CPU=1`` forces a CPU-only build.
* ``CONCEPT_EXT_NO_EXTENSION=1`` builds no extension at all: a pure-Python package whose ops all serve
  from the reference (tests/test_install.py uses it to check the packaging in seconds, without a compile).
* ``TORCH_CUDA_ARCH_LIST`` defaults to ``9.0`` (H100/H200) when unset, which also avoids
  pytorch/pytorch#137261 (arch detection raising without a visible GPU).
* Everything is written against the LibTorch stable ABI targeting 2.10, so one source tree builds on
  the CPU dev machine (torch 2.13) and the GPU machine (torch 2.11). See ``design.md`` section 4.

Install on top of an existing PyTorch with ``pip install --no-build-isolation -e .``.
"""
from __future__ import annotations

import glob
import json
import os

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_TARGET = "-DTORCH_TARGET_VERSION=0x020a000000000000"  # stable ABI of torch 2.10


def _want_cuda() -> bool:
    if os.environ.get("CONCEPT_EXT_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _sources(with_cuda: bool) -> list[str]:
    src = ["csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    if with_cuda:
        src += sorted(glob.glob("csrc/cuda/*.cu"))
    return src


def _write_build_info(with_cuda: bool, cxx: list[str], nvcc: list[str]) -> None:
    info = {
        "torch_built_against": torch.__version__,
        "torch_target_version": "2.10",
        "cuda_built": with_cuda,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "cxx_flags": cxx,
        "nvcc_flags": nvcc if with_cuda else [],
    }
    path = os.path.join(ROOT, "concept_ext", "_build_info.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, path)


def _extension():
    with_cuda = _want_cuda()
    cxx = ["-O3", "-std=c++20", TORCH_TARGET, "-fopenmp", "-march=x86-64-v3" if _x86() else "-O3"]
    nvcc = ["-O3", "-std=c++20", TORCH_TARGET, "-DUSE_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        cxx.append("-DUSE_CUDA")
    _write_build_info(with_cuda, cxx, nvcc)
    kwargs = dict(
        name="concept_ext._C",
        sources=_sources(with_cuda),
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if with_cuda:
        return cpp_extension.CUDAExtension(**kwargs)
    return cpp_extension.CppExtension(**kwargs)


def _x86() -> bool:
    import platform

    return platform.machine() in ("x86_64", "AMD64")


setup(
    ext_modules=[] if os.environ.get("CONCEPT_EXT_NO_EXTENSION", "0") == "1" else [_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
