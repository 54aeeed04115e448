"""The backends of the kernel-level op tests (test_ops_cuda.py): the real CUDA device and the CUDA
emulator on the CPU (tools/cuda_emulate.py, which builds ``csrc/cuda/*.cu`` unchanged against
``csrc/emu/cuda_runtime.h``). A test that takes the ``backend`` fixture runs once per backend: the same
inputs, references and tolerances; each backend skips where it cannot run (no GPU / no host compiler).
"""
from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CUDA_OPS = ["topk_encode", "topk_encode_backward", "sparse_decode", "sparse_decode_backward",
            "activation_rate_loss", "activation_rate_loss_backward", "ablate_decode", "ablate_decode_padded"]


class Backend(NamedTuple):
    """Where a kernel-level test runs."""

    name: str
    """``cuda`` or ``emulated``."""
    dev: str
    """The device of the test's tensors (``cuda``, or ``cpu`` for the emulator)."""
    ops: Any
    """The op namespace: ``torch.ops.concept_ext`` or the emulator's ``torch.ops.concept_ext_emu``."""
    poison: Callable[[], None]
    """Leave NaN garbage where the next outputs are allocated (the emulated backend poisons every
    ``torch.empty`` for the whole test instead, so this is a no-op there)."""


def has_cuda_kernels() -> bool:
    """A GPU is visible and the extension registered a CUDA kernel for every op (checked in the dispatch
    table, not guessed)."""
    if not torch.cuda.is_available():
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"concept_ext::{op}", "CUDA") for op in CUDA_OPS)


def has_host_compiler() -> bool:
    return shutil.which("c++") is not None or shutil.which("g++") is not None


def poison_cuda_allocator() -> None:
    """Leave NaN garbage in the caching allocator, so kernels that skip writing an output get caught.

    The allocator keeps two pools: blocks of at most 1 MiB come from the small pool, larger ones from
    the large pool, so both are filled (a freed 16 MiB block alone never backs a small output)."""
    junk = [torch.full((1 << 22,), float("nan"), device="cuda")]  # 16 MiB: large pool
    junk += [torch.full((n,), float("nan"), device="cuda") for n in (1 << 18, 1 << 16, 1 << 14, 1 << 12, 1 << 10,
                                                                      256, 64) for _ in range(4)]  # small pool
    del junk


class EmulatedOps:
    """``torch.ops.concept_ext_emu``, built and loaded on first use (not at collection)."""

    def __getattr__(self, name: str) -> Any:
        if str(ROOT / "tools") not in sys.path:
            sys.path.insert(0, str(ROOT / "tools"))
        import cuda_emulate

        return getattr(cuda_emulate.load(), name)


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Every uninitialised CPU tensor (the emulated kernels' outputs included) starts as NaN / the integer
    maximum while inside."""
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.utils.deterministic.fill_uninitialized_memory = prev[2]


@pytest.fixture(params=["cuda", "emulated"])
def backend(request) -> Iterator[Backend]:
    """The real device (skipped without CUDA kernels) and the emulator (skipped without a host compiler)."""
    if request.param == "cuda":
        if not has_cuda_kernels():
            pytest.skip("no GPU or no concept_ext CUDA kernels built")
        yield Backend("cuda", "cuda", torch.ops.concept_ext, poison_cuda_allocator)
        return
    if not has_host_compiler():
        pytest.skip("no host C++ compiler for the CUDA emulator")
    with poisoned_empty():
        yield Backend("emulated", "cpu", EmulatedOps(), lambda: None)
