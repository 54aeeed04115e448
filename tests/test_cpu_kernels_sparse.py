"""Kernel-focused tests of the C++ CPU kernels of the sparse-code ops.

Covers ``sparse_decode`` (+ backward), ``activation_rate_loss`` (+ backward) and ``ablate_decode``
(csrc/cpu/sparse_decode.cpp, activation_rate.cpp, ablate_decode.cpp) against ``concept_ext.ops.reference`` on
fresh random inputs: odd sizes, k = 1, k = m, ties, empty batch, int32 indices, non-contiguous inputs,
float32/float64/bfloat16/float16; float64 gradcheck through ``torch.ops.concept_ext``; the activation-rate
loss also against an independent dense formula (scatter to [N, m], column top-k). The ops are called
through ``torch.ops.concept_ext`` so that the compiled CPU kernel (not the Python wrapper) is under test.
"""
from __future__ import annotations

import math

import pytest
import torch

import concept_ext  # noqa: F401  (loads _C when built)
from concept_ext.ops import reference as ref

pytestmark = pytest.mark.cpu_kernel("sparse_decode", "sparse_decode_backward", "activation_rate_loss",
                                   "activation_rate_loss_backward", "ablate_decode")

OPS = torch.ops.concept_ext
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (N, k, m, d): odd sizes, k = 1, k = m, a single row, wide d (exercises the vector loops' tails).
SHAPES = [(7, 3, 11, 5), (13, 1, 9, 17), (5, 9, 9, 33), (1, 1, 1, 1), (33, 4, 20, 131)]


def _tol(dtype: torch.dtype) -> dict:
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
    }[dtype]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want.double(), **_tol(dtype))


def _code(n, k, m, *, dtype=torch.float32, index_dtype=torch.int64, distinct=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if distinct:
        idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)]) if n else torch.empty(0, k)
    else:
        idx = torch.randint(0, m, (n, k), generator=g)
    vals = torch.randn(n, k, generator=g).to(dtype)
    return vals, idx.to(index_dtype)


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous layout (a transposed copy viewed back)."""
    out = t.t().contiguous().t() if t.dim() == 2 else torch.stack([t, t], 1)[:, 0]
    assert not out.is_contiguous() or t.numel() <= 1
    return out


# ------------------------------------------------------------------------------------------ sparse_decode


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sparse_decode_matches_reference(shape, dtype, index_dtype):
    n, k, m, d = shape
    vals, idx = _code(n, k, m, dtype=dtype, index_dtype=index_dtype, seed=n * 7 + k)
    W = torch.randn(m, d).to(dtype)
    b = torch.randn(d).to(dtype)
    _close(OPS.sparse_decode(vals, idx, W, b), ref.sparse_decode(vals, idx, W, b), dtype)
    g = torch.randn(n, d).to(dtype)
    got = OPS.sparse_decode_backward(g, vals, idx, W)
    want = ref.sparse_decode_backward(g, vals, idx, W)
    for x, y in zip(got, want):
        _close(x, y, dtype)


def test_sparse_decode_noncontiguous_and_duplicates():
    n, k, m, d = 17, 6, 8, 24
    vals, idx = _code(n, k, m, seed=3)
    idx[:, 1] = idx[:, 0]  # the same latent twice in a row: both entries count
    W, b, g = torch.randn(m, d), torch.randn(d), torch.randn(n, d)
    args_nc = (_noncontig(vals), _noncontig(idx), _noncontig(W), _noncontig(b))
    _close(OPS.sparse_decode(*args_nc), ref.sparse_decode(vals, idx, W, b), torch.float32)
    got = OPS.sparse_decode_backward(_noncontig(g), *args_nc[:3])
    for x, y in zip(got, ref.sparse_decode_backward(g, vals, idx, W)):
        _close(x, y, torch.float32)


def test_sparse_decode_empty_batch():
    W, b = torch.randn(6, 5), torch.randn(5)
    vals, idx = torch.empty(0, 3), torch.empty(0, 3, dtype=torch.int64)
    assert OPS.sparse_decode(vals, idx, W, b).shape == (0, 5)
    gv, gw = OPS.sparse_decode_backward(torch.empty(0, 5), vals, idx, W)
    assert gv.shape == (0, 3) and torch.equal(gw, torch.zeros(6, 5))


def test_sparse_decode_untouched_latents_get_zero_grad():
    W = torch.randn(50, 8)
    vals, idx = torch.rand(4, 2), torch.tensor([[1, 2], [2, 3], [1, 1], [3, 2]])
    _, gw = OPS.sparse_decode_backward(torch.randn(4, 8), vals, idx, W)
    assert torch.equal(gw[4:], torch.zeros(46, 8)) and gw[1:4].abs().sum() > 0


@pytest.mark.parametrize("bad", [-1, 6, 1 << 40])
def test_sparse_decode_index_out_of_range_raises(bad):
    W, b = torch.randn(6, 4), torch.randn(4)
    vals, idx = torch.rand(3, 2), torch.tensor([[0, 1], [2, bad], [3, 4]])
    with pytest.raises(RuntimeError, match="indices"):
        OPS.sparse_decode(vals, idx, W, b)
    with pytest.raises(RuntimeError, match="indices"):
        OPS.sparse_decode_backward(torch.randn(3, 4), vals, idx, W)


def test_sparse_decode_bad_arguments_named():
    W, b = torch.randn(6, 4), torch.randn(4)
    vals, idx = torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="b_dec"):
        OPS.sparse_decode(vals, idx, W, torch.randn(5))
    with pytest.raises(RuntimeError, match="indices"):
        OPS.sparse_decode(vals, idx.float(), W, b)
    with pytest.raises(RuntimeError, match="indices"):
        OPS.sparse_decode(vals, idx[:, :1], W, b)


def test_sparse_decode_gradcheck():
    n, k, m, d = 6, 3, 7, 5
    vals, idx = _code(n, k, m, dtype=torch.float64, seed=11)
    vals.requires_grad_()
    W = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w, bb: OPS.sparse_decode(v, idx, w, bb), (vals, W, b))


# ----------------------------------------------------------------------------------- activation_rate_loss


def _dense_rate_loss(values, indices, m, rate):
    """Independent dense formula of method.md section 2.3 (rows must hold distinct latents)."""
    n = values.shape[0]
    z = torch.zeros(n, m, dtype=torch.float64).scatter(1, indices.long(), values.double()).clamp_min(0)
    m_keep = int(math.floor(rate * n + 1e-9))
    top = torch.topk(z, m_keep, dim=0).values.sum() if m_keep > 0 else 0.0
    return (z.sum() - top) / n


def _skewed_code(n, k, m, *, dtype=torch.float64, ties=False, seed=0):
    """Distinct latents per row drawn from a skewed distribution, so some latents exceed m_keep."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, m + 1, dtype=torch.float64)
    idx = torch.multinomial(weights.expand(n, m), k, replacement=False, generator=g)
    if ties:  # few distinct values, some <= 0: many ties at the m_keep-th place
        vals = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0])[torch.randint(0, 5, (n, k), generator=g)]
    else:
        vals = torch.rand(n, k, generator=g, dtype=torch.float64) * 2 - 0.3
    return vals.to(dtype), idx


RATES = [0.0, 0.05, 0.1, 0.34, 1.0]


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_activation_rate_matches_reference_and_dense(rate, ties, index_dtype):
    n, k, m = 61, 5, 23
    vals, idx = _skewed_code(n, k, m, ties=ties, seed=int(rate * 100) + ties)
    idx = idx.to(index_dtype)
    got = OPS.activation_rate_loss(vals, idx, m, rate)
    _close(got, ref.activation_rate_loss(vals, idx, m, rate), torch.float64)
    _close(got, _dense_rate_loss(vals, idx, m, rate), torch.float64)
    grad = torch.tensor(1.7, dtype=torch.float64)
    gb = OPS.activation_rate_loss_backward(grad, vals, idx, m, rate)
    # The top mask (ties included) must match exactly: the gradient is 0 or grad/N, nothing else.
    assert torch.equal(gb, ref.activation_rate_loss_backward(grad, vals, idx, m, rate))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activation_rate_low_precision(dtype):
    n, k, m = 97, 7, 31
    vals, idx = _skewed_code(n, k, m, dtype=dtype, ties=True, seed=5)
    _close(OPS.activation_rate_loss(vals, idx, m, 0.1), ref.activation_rate_loss(vals, idx, m, 0.1), dtype)
    grad = torch.tensor(1.0, dtype=dtype)
    got = OPS.activation_rate_loss_backward(grad, vals, idx, m, 0.1)
    assert torch.equal(got, ref.activation_rate_loss_backward(grad, vals, idx, m, 0.1))


def test_activation_rate_floor_epsilon_and_duplicates():
    # 0.1 * 500 = 50.000000000000007 or 49.99..., floor must give 50 like the reference.
    n, k, m = 500, 3, 4
    g = torch.Generator().manual_seed(1)
    vals = torch.rand(n, k, generator=g, dtype=torch.float64)
    idx = torch.randint(0, m, (n, k), generator=g)  # duplicates within rows: entries count separately
    _close(OPS.activation_rate_loss(vals, idx, m, 0.1), ref.activation_rate_loss(vals, idx, m, 0.1), torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    assert torch.equal(
        OPS.activation_rate_loss_backward(one, vals, idx, m, 0.1),
        ref.activation_rate_loss_backward(one, vals, idx, m, 0.1),
    )


def test_activation_rate_k_equals_m_noncontiguous_and_empty():
    n, m = 40, 6
    vals, idx = _skewed_code(n, m, m, seed=2)  # every latent in every row
    v_nc, i_nc = _noncontig(vals), _noncontig(idx)
    _close(OPS.activation_rate_loss(v_nc, i_nc, m, 0.2), _dense_rate_loss(vals, idx, m, 0.2), torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    assert torch.equal(
        OPS.activation_rate_loss_backward(one, v_nc, i_nc, m, 0.2),
        ref.activation_rate_loss_backward(one, vals, idx, m, 0.2),
    )
    empty_v, empty_i = torch.empty(0, 3), torch.empty(0, 3, dtype=torch.int64)
    loss = OPS.activation_rate_loss(empty_v, empty_i, 5, 0.1)
    assert loss.shape == () and loss.item() == 0.0
    assert OPS.activation_rate_loss_backward(torch.tensor(1.0), empty_v, empty_i, 5, 0.1).shape == (0, 3)


def test_activation_rate_index_out_of_range_raises():
    vals, idx = torch.rand(3, 2), torch.tensor([[0, 1], [2, 5], [3, 4]])
    with pytest.raises(RuntimeError, match="indices"):
        OPS.activation_rate_loss(vals, idx, 5, 0.5)
    with pytest.raises(RuntimeError, match="indices"):
        OPS.activation_rate_loss_backward(torch.tensor(1.0), vals, idx, 5, 0.5)


def test_activation_rate_gradcheck():
    n, k, m = 20, 3, 7
    _, idx = _skewed_code(n, k, m, seed=9)
    # Tie-free positive values with gaps far above gradcheck's eps, so the top sets do not move. Only
    # positive ones: by convention (reference) entries <= 0 get grad/N, which the clamp's true
    # derivative (0) would not match; the upstream ReLU makes that difference moot in training.
    perm = torch.randperm(n * k, generator=torch.Generator().manual_seed(9)).double().reshape(n, k)
    vals = (perm + 1) / 7
    vals.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: OPS.activation_rate_loss(v, idx, m, 0.1), (vals,))


# ------------------------------------------------------------------------------------------ ablate_decode


def _ablate_inputs(n, k, m, d, *, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, m, (n, k), generator=g)
    vals = torch.randn(n, k, generator=g)
    vals[vals.abs() < 0.3] = 0.0  # some exact zeros: inactive entries of kept latents
    W, b = torch.randn(m, d, generator=g), torch.randn(d, generator=g)
    return vals.to(dtype), idx, W.to(dtype), b.to(dtype)


def _check_ablate(got, want, dtype):
    for x, y in zip(got[:2], want[:2]):
        _close(x, y, dtype)
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    assert got[2].dtype == got[3].dtype == torch.int64


@pytest.mark.parametrize("shape", [(9, 4, 12, 7), (21, 1, 5, 33), (6, 8, 8, 3), (1, 1, 1, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rescale", [False, True])
def test_ablate_decode_matches_reference(shape, dtype, rescale):
    n, k, m, d = shape
    vals, idx, W, b = _ablate_inputs(n, k, m, d, dtype=dtype, seed=n + k + m)
    keep = torch.randperm(m, generator=torch.Generator().manual_seed(4))[: max(1, m // 2)]  # unsorted
    target = (torch.rand(n) + 0.5).to(dtype) if rescale else None
    got = OPS.ablate_decode(vals, idx, W, b, keep, target)
    _check_ablate(got, ref.ablate_decode(vals, idx, W, b, keep, target), dtype)


def test_ablate_decode_duplicates_int32_noncontiguous():
    n, k, m, d = 25, 6, 7, 10
    vals, idx, W, b = _ablate_inputs(n, k, m, d, seed=8)
    idx[:, 1] = idx[:, 0]  # a latent twice per row: coefficients summed, active if any entry > 0
    vals[::3, 1] = -vals[::3, 0].abs() - 0.1
    keep = torch.tensor([5, 0, 3], dtype=torch.int32)
    target = torch.rand(n) + 0.5
    got = OPS.ablate_decode(_noncontig(vals), _noncontig(idx.int()), _noncontig(W), _noncontig(b),
                            _noncontig(keep), _noncontig(target))
    _check_ablate(got, ref.ablate_decode(vals, idx, W, b, keep, target), torch.float32)


def test_ablate_decode_empty_batch_and_no_pairs():
    W, b = torch.randn(6, 4), torch.randn(4)
    keep = torch.tensor([1, 2])
    got = OPS.ablate_decode(torch.empty(0, 3), torch.empty(0, 3, dtype=torch.int64), W, b, keep, None)
    assert [t.shape for t in got] == [(0, 4), (0, 4), (0,), (0,)]
    vals, idx = torch.rand(5, 2), torch.tensor([[0, 3]] * 5)  # kept latents never active
    got = OPS.ablate_decode(vals, idx, W, b, keep, None)
    _check_ablate(got, ref.ablate_decode(vals, idx, W, b, keep, None), torch.float32)
    assert got[1].shape == (0, 4) and torch.allclose(got[0], b.expand(5, 4))


def test_ablate_decode_bad_keep_and_indices_raise():
    W, b = torch.randn(6, 4), torch.randn(4)
    vals, idx = torch.rand(3, 2), torch.tensor([[0, 1], [2, 3], [4, 5]])
    with pytest.raises(RuntimeError, match="keep"):
        OPS.ablate_decode(vals, idx, W, b, torch.tensor([1, 1]), None)
    with pytest.raises(RuntimeError, match="keep"):
        OPS.ablate_decode(vals, idx, W, b, torch.tensor([6]), None)
    with pytest.raises(RuntimeError, match="indices"):
        OPS.ablate_decode(vals, idx + 1, W, b, torch.tensor([1]), None)
    with pytest.raises(RuntimeError, match="target_norm"):
        OPS.ablate_decode(vals, idx, W, b, torch.tensor([1]), torch.rand(2))
