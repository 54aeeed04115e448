"""topk_encode: ours (concept_ext.topk_encode -> torch.ops.concept_ext.topk_encode) vs the plain-PyTorch
way, ``F.linear`` + ``torch.topk`` + ReLU (what sparsify/SAELens do), forward and forward+backward.

Each benchmark group (``topk_encode-fwd-<size>``, ``topk_encode-fwdbwd-<size>``) holds both
implementations, so pytest-benchmark shows their ratio. Next to the timing each test checks that the
two agree (values, and gradients for forward+backward). Sizes come from benchmarks/conftest.py; in full
mode (``CONCEPT_EXT_BENCH_FULL=1``) the issue's ``N=4096, d=512, m=16384, k=32`` is added.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import concept_ext
from concept_ext.ops import reference
from conftest import FULL, SIZES, Size

BENCH_SIZES = SIZES + ([Size("S2-d512", 4096, 512, 16384, 32)] if FULL else [])
ROUNDS = 5 if FULL else 1


def _inputs(size: Size, *, grad: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(size.n, size.d, generator=g)
    w = torch.randn(size.d, size.m, generator=g) / size.d**0.5  # [d, m]
    b = torch.randn(size.m, generator=g) * 0.1
    w_lin = w.t().contiguous()  # [m, d]: nn.Linear's layout, the fastest for F.linear
    plain = [t.clone().requires_grad_(grad) for t in (x, w_lin, b)]  # separate leaves for the baseline
    leaves = [t.requires_grad_(grad) for t in (x, w, b)], plain
    return leaves, torch.randn(size.n, size.k, generator=g)


def _ours(x, w, b, k):
    return concept_ext.topk_encode(x, w, b, k)


def _plain(x, w_lin, b, k):
    top, idx = torch.topk(F.linear(x, w_lin, b), k, dim=1)
    return top.relu(), idx


def _run(benchmark, fn):
    return benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1 if FULL else 0)


@pytest.mark.parametrize("impl", ["ours", "plain"])
@pytest.mark.parametrize("size", BENCH_SIZES, ids=lambda s: s.name)
def test_topk_encode_forward(benchmark, size, impl):
    benchmark.group = f"topk_encode-fwd-{size.name}"
    ((x, w, b), (x2, w_lin, b2)), _ = _inputs(size, grad=False)
    if impl == "ours":
        values, indices = _run(benchmark, lambda: _ours(x, w, b, size.k))
    else:
        values, indices = _run(benchmark, lambda: _plain(x2, w_lin, b2, size.k))
    # The timed selection against an fp64 recomputation (tie-aware: the sorted selected values).
    ref_values = torch.addmm(b.double(), x.double(), w.double()).topk(size.k, dim=1).values.clamp_min(0)
    torch.testing.assert_close(values.double().sort(1, descending=True).values, ref_values, atol=1e-4, rtol=1e-4)
    # Tie-robust index check: each returned index carries its returned value.
    pre = torch.addmm(b, x, w).gather(1, indices).relu()
    torch.testing.assert_close(values, pre, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["ours", "plain"])
@pytest.mark.parametrize("size", BENCH_SIZES, ids=lambda s: s.name)
def test_topk_encode_forward_backward(benchmark, size, impl):
    benchmark.group = f"topk_encode-fwdbwd-{size.name}"
    ((x, w, b), (x2, w_lin, b2)), g = _inputs(size, grad=True)

    def ours():
        x.grad = w.grad = b.grad = None
        values, indices = _ours(x, w, b, size.k)
        values.backward(g)
        return values.detach(), indices, (x.grad, w.grad, b.grad)

    def plain():
        x2.grad = w_lin.grad = b2.grad = None
        values, indices = _plain(x2, w_lin, b2, size.k)
        values.backward(g)
        return values.detach(), indices, (x2.grad, w_lin.grad.t(), b2.grad)

    values, indices, got = _run(benchmark, ours if impl == "ours" else plain)
    # Judge the gradients on the selection this implementation made (float rounding in the two GEMMs may
    # swap a near-tie at the k-th place), against the independent pure-PyTorch reference backward.
    want = reference.topk_encode_backward(g, values, indices, x.detach(), w.detach())
    for name, a, e in zip(("grad_x", "grad_W_enc", "grad_b_enc"), got, want):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=name)
