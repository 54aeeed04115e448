"""Shared benchmark settings: sizes of performance.md section 3.3 and a full/smoke switch.

``CONCEPT_EXT_BENCH_FULL=1`` runs the real sizes (paper scale CS and the larger SAE size S2); without it
every benchmark runs at tiny smoke sizes so that ``pytest benchmarks --benchmark-disable`` is a quick CI
check that each benchmark still runs and its implementations still agree.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch

FULL = os.environ.get("CONCEPT_EXT_BENCH_FULL", "0") == "1"


class Size(NamedTuple):
    """One benchmark shape."""

    name: str
    n: int
    d: int
    m: int
    k: int


#: Paper scale (Pythia-1B ClassifSAE, method.md section 2.6) and the larger SAE of issue 2/11.
FULL_SIZES = [Size("CS", 2000, 2048, 4096, 10), Size("S2", 4096, 1024, 16384, 32)]
SMOKE_SIZES = [Size("smoke", 64, 32, 256, 8)]
SIZES = FULL_SIZES if FULL else SMOKE_SIZES


@pytest.fixture(autouse=True)
def _threads():
    # The development/CI machine class has 2 cores; pin the thread count so runs are comparable.
    torch.set_num_threads(int(os.environ.get("CONCEPT_EXT_BENCH_THREADS", "2")))
    yield
