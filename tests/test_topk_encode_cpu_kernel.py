"""The compiled CPU kernels of ``topk_encode`` / ``topk_encode_backward`` against concept_ext.ops.reference.

Kernel-focused: odd sizes, k = 1 and k = m, ties (repeated columns), the three dtypes, empty batch,
non-contiguous inputs, NaN errors, the two threading strategies and block sizes of the kernel
(environment knobs read per call), determinism of the backward, and gradcheck in float64 through
``torch.ops.concept_ext.topk_encode``. Skipped when the compiled CPU kernel is not registered (failed instead
under CONCEPT_EXT_REQUIRE_KERNELS=1).
"""
from __future__ import annotations

import os

import pytest
import torch

import concept_ext  # noqa: F401  (loads _C, which registers the kernels)
from concept_ext.ops import reference

pytestmark = pytest.mark.cpu_kernel("topk_encode", "topk_encode_backward")

OP = torch.ops.concept_ext
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}


def _inputs(n, d, m, dtype, *, seed=0, repeat_cols=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, m, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(m, generator=g, dtype=torch.float64) * 0.1
    if repeat_cols:  # exact ties: every latent j has a twin j + m/2 with the same column and bias
        h = m // 2
        w[:, h : 2 * h] = w[:, :h]
        b[h : 2 * h] = b[:h]
    return x.to(dtype), w.to(dtype), b.to(dtype)


def _pre(x, w, b):
    acc = torch.float64  # independent of the kernel: exact enough to judge every dtype
    return x.to(acc) @ w.to(acc) + b.to(acc)


def _check_topk(values, indices, x, w, b, k):
    """Tie-aware comparison: sorted multiset of values equals the reference's; each index points at a
    pre-activation equal to its value; indices within a row are distinct."""
    n = x.shape[0]
    assert values.shape == (n, k) and indices.shape == (n, k)
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    rv, _ = reference.topk_encode(x, w, b, k)
    tol = TOL[x.dtype]
    scale = 1 + _pre(x, w, b).abs().max().item() if n else 1.0
    torch.testing.assert_close(values.double(), rv.double(), atol=tol * scale, rtol=tol)
    if n == 0:
        return
    assert bool((values[:, :-1] >= values[:, 1:]).all()), "values not sorted descending"
    assert bool((indices >= 0).all()) and bool((indices < w.shape[1]).all())
    assert all(len(set(row.tolist())) == k for row in indices), "duplicate latent in a row"
    picked = _pre(x, w, b).gather(1, indices).clamp_min(0)
    torch.testing.assert_close(values.double(), picked, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "n,d,m,k",
    [(37, 19, 101, 5), (1, 3, 7, 1), (53, 8, 11, 11), (130, 40, 1000, 32), (300, 17, 2053, 64)],
)
def test_forward_matches_reference(n, d, m, k, dtype):
    x, w, b = _inputs(n, d, m, dtype, seed=n + m)
    values, indices = OP.topk_encode(x, w, b, k)
    _check_topk(values, indices, x, w, b, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_forward_ties_from_repeated_columns(k, dtype):
    x, w, b = _inputs(64, 12, 80, dtype, seed=3, repeat_cols=True)
    values, indices = OP.topk_encode(x, w, b, k)
    _check_topk(values, indices, x, w, b, k)


def test_forward_all_equal_and_negative():
    # Every pre-activation equal (x = 0): any k distinct latents, values ReLU(b) = 0 for b < 0.
    x = torch.zeros(5, 4)
    w = torch.randn(4, 50)
    b = torch.full((50,), -0.5)
    values, indices = OP.topk_encode(x, w, b, 10)
    assert bool((values == 0).all())
    assert all(len(set(row.tolist())) == 10 for row in indices)


def test_empty_batch():
    x, w, b = _inputs(0, 6, 9, torch.float32)
    values, indices = OP.topk_encode(x, w, b, 4)
    assert values.shape == (0, 4) and indices.shape == (0, 4) and indices.dtype == torch.int64
    gx, gw, gb = OP.topk_encode_backward(values, values, indices, x, w)
    assert gx.shape == (0, 6) and bool((gw == 0).all()) and bool((gb == 0).all())


def test_non_contiguous_inputs():
    x, w, b = _inputs(40, 24, 60, torch.float32, seed=5)
    xt = x.t().contiguous().t()  # same values, column-major
    wn = torch.cat([w, w], dim=1)[:, ::2]  # stride 2 along latents
    wn.copy_(w)
    bn = torch.stack([b, b], dim=1)[:, 0]
    assert not xt.is_contiguous() and not wn.is_contiguous() and not bn.is_contiguous()
    values, indices = OP.topk_encode(xt, wn, bn, 9)
    _check_topk(values, indices, x, w, b, 9)


@pytest.mark.parametrize("where", ["x", "W_enc", "b_enc"])
def test_nan_raises(where):
    x, w, b = _inputs(20, 8, 30, torch.float32)
    {"x": x, "W_enc": w, "b_enc": b}[where].view(-1)[3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        OP.topk_encode(x, w, b, 4)


@pytest.mark.parametrize(
    "strategy,rb,ct", [("rows", "1", "1"), ("rows", "7", "13"), ("tiles", "5", "64"), ("tiles", "300", "9")]
)
def test_strategies_and_blocks(monkeypatch, strategy, rb, ct):
    # The kernel reads these per call; every combination must give the same answer.
    monkeypatch.setenv("CONCEPT_EXT_TOPK_STRATEGY", strategy)
    monkeypatch.setenv("CONCEPT_EXT_TOPK_RB", rb)
    monkeypatch.setenv("CONCEPT_EXT_TOPK_CT", ct)
    for k in (1, 17):
        x, w, b = _inputs(45, 10, 131, torch.float32, seed=k)
        values, indices = OP.topk_encode(x, w, b, k)
        _check_topk(values, indices, x, w, b, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_backward_matches_reference(dtype, index_dtype):
    x, w, b = _inputs(70, 23, 300, dtype, seed=11)
    values, indices = reference.topk_encode(x, w, b, 12)
    values[:, -3:] = 0  # some entries cut by the ReLU mask
    grad = torch.randn(values.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = OP.topk_encode_backward(grad, values, indices.to(index_dtype), x, w)
    want = reference.topk_encode_backward(grad, values, indices, x, w)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    for name, a, e in zip(("grad_x", "grad_W_enc", "grad_b_enc"), got, want):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        torch.testing.assert_close(a.double(), e.double(), atol=tol, rtol=tol, msg=name)


def test_backward_deterministic_and_rejects_bad_indices():
    x, w, b = _inputs(200, 16, 64, torch.float32, seed=2)
    values, indices = OP.topk_encode(x, w, b, 8)  # many rows share each latent
    grad = torch.randn(values.shape)
    first = OP.topk_encode_backward(grad, values, indices, x, w)
    for _ in range(3):
        again = OP.topk_encode_backward(grad, values, indices, x, w)
        assert all(torch.equal(a, e) for a, e in zip(first, again))
    bad = indices.clone()
    bad[0, 0] = 64
    with pytest.raises(RuntimeError, match="indices"):
        OP.topk_encode_backward(grad, values, bad, x, w)


def test_gradcheck_float64():
    x, w, b = _inputs(9, 5, 23, torch.float64, seed=4)
    b = b + 1.0  # keep the selected pre-activations away from the ReLU kink
    x, w, b = (t.clone().requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: OP.topk_encode(*a, 6)[0], (x, w, b), eps=1e-6, atol=1e-6)
