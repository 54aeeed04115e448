"""CUDA kernels of every concept_ext op vs the pure-PyTorch reference (concept_ext/reference.py).

The kernel-level tests take the ``backend`` fixture (tests/kernel_backend.py): they run on the GPU, skipped
unless one is visible and the compiled extension registered CUDA kernels (checked in the dispatch table,
not guessed), and on the CPU under the CUDA emulator (tools/cuda_emulate.py: the same .cu sources, so CI
without a GPU runs them too). The public-wrapper, stream, CUDA-graph and 287 MiB tests need the real
device (``needs_cuda``). Inputs are fresh random tensors: odd sizes, k = 1 and k = m, exact ties,
empty batches, non-contiguous inputs, int32 indices, float32/float64/bfloat16 with dtype-based
tolerances; outputs are allocated from a NaN-poisoned caching allocator so that an unwritten element
shows up. Also: float64 gradcheck through the public wrappers, a non-default-stream run and a CUDA-graph
capture of the training ops.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import concept_ext
from concept_ext.ops import reference as ref
from kernel_backend import backend, has_cuda_kernels, poison_cuda_allocator  # noqa: F401 (backend: fixture)
from samples import LAYOUT_DTYPES, W_LAYOUTS

needs_cuda = pytest.mark.skipif(not has_cuda_kernels(), reason="no GPU or no concept_ext CUDA kernels built")

# The device and ops of the needs_cuda tests (the backend tests use backend.dev and backend.ops).
DEV = "cuda"
OPS_NS = torch.ops.concept_ext
# (rtol, atol) per dtype; sums run over at most a few hundred terms of O(1) values.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4), torch.bfloat16: (1.6e-2, 2e-2),
       torch.float16: (2e-3, 4e-3)}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


_poison = poison_cuda_allocator


def _close(actual, expected, dtype, scale: float = 1.0) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


def _gen(seed: int, dev: str) -> torch.Generator:
    """A seeded generator on ``dev``; the helpers below draw on the generator's device."""
    return torch.Generator(device=dev).manual_seed(seed)


def _randn(*shape, dtype, g) -> torch.Tensor:
    return torch.randn(*shape, generator=g, device=g.device, dtype=torch.float32).to(dtype)


def _code(n, k, m, dtype, g, *, ties=False, index_dtype=torch.int64, zeros=True):
    """A sparse code [n, k]: distinct latents per row, positive values (some zeros)."""
    dev = g.device
    idx = torch.argsort(torch.rand(n, m, generator=g, device=dev), dim=1)[:, :k] if n else torch.empty(
        (0, k), dtype=torch.int64, device=dev)
    if ties:  # few distinct levels -> many exact ties
        vals = torch.randint(0, 4, (n, k), generator=g, device=dev).float() / 2
    else:
        vals = torch.rand(n, k, generator=g, device=dev) + 0.05
        if zeros and n:
            vals[:, -1] = 0.0
    return vals.to(dtype), idx.to(index_dtype)


# --------------------------------------------------------------------------------------------------
# topk_encode
# --------------------------------------------------------------------------------------------------
TOPK_CASES = [(0, 16, 32, 4), (1, 7, 13, 1), (37, 19, 53, 53), (65, 33, 300, 17), (130, 64, 1000, 64),
              (5, 8, 3000, 2500)]


def _check_topk(x, W, b, k, values, indices, dtype):
    """Tie-aware: values match the reference's sorted top-k, and each index is a valid top-k choice."""
    rv, _ = ref.topk_encode(x, W, b, k)
    assert indices.dtype == torch.int64 and values.dtype == dtype
    assert values.shape == indices.shape == (x.shape[0], k)
    if x.shape[0] == 0:
        return
    assert not torch.isnan(values).any()
    scale = float(rv.abs().max()) + 1.0
    _close(values, rv, dtype, scale)
    assert (values[:, 1:] <= values[:, :-1]).all(), "values must be sorted descending"
    assert (indices.sort(1).values.diff(1) > 0).all(), "indices must be distinct within a row"
    pre = x.double() @ W.double() + b.double()  # [n, m], exact enough to judge the selection
    kth = pre.topk(k, dim=1).values[:, -1:]
    chosen = pre.gather(1, indices)
    tol = 1e-9 if dtype == torch.float64 else 1e-4 * scale
    assert (chosen >= kth - tol).all(), "a selected latent lies below the k-th largest pre-activation"
    torch.testing.assert_close(chosen.clamp_min(0), values.double(), rtol=TOL[dtype][0] * 4,
                               atol=TOL[dtype][1] * scale * 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,m,k", TOPK_CASES)
def test_topk_encode(n, d, m, k, dtype, backend):
    g = _gen(n * 1000 + m + k, backend.dev)
    x, W, b = _randn(n, d, dtype=dtype, g=g), _randn(d, m, dtype=dtype, g=g), _randn(m, dtype=dtype, g=g)
    backend.poison()
    values, indices = backend.ops.topk_encode(x, W, b, k)
    _check_topk(x, W, b, k, values, indices, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_encode_ties_and_noncontiguous(dtype, backend):
    g = _gen(7, backend.dev)
    n, d, m, k = 41, 12, 97, 9
    x = _randn(d, n, dtype=dtype, g=g).t()  # non-contiguous [n, d]
    W = _randn(d, 2 * m, dtype=dtype, g=g)[:, ::2]  # non-contiguous [d, m]
    W[:, 10:40] = W[:, 5:6]  # 31 identical latents: exact ties straddle the k-th place
    b = torch.zeros(m, dtype=dtype, device=backend.dev)
    b[5:40] = 3.0
    values, indices = backend.ops.topk_encode(x, W, b, k)
    _check_topk(x, W, b, k, values, indices, dtype)


def test_topk_encode_backward(backend):
    for dtype in DTYPES:
        for idx_dtype in (torch.int64, torch.int32):
            g = _gen(11, backend.dev)
            n, d, m, k = 29, 21, 77, 6
            x, W, b = _randn(n, d, dtype=dtype, g=g), _randn(d, m, dtype=dtype, g=g), _randn(m, dtype=dtype, g=g)
            b[:] -= 1.0  # some selected pre-activations <= 0: the ReLU blocks their gradient
            values, indices = ref.topk_encode(x, W, b, k)
            gv = _randn(n, k, dtype=dtype, g=g)
            backend.poison()
            got = backend.ops.topk_encode_backward(gv, values, indices.to(idx_dtype), x, W)
            want = ref.topk_encode_backward(gv, values, indices, x, W)
            for a, e in zip(got, want):
                assert a.shape == e.shape and a.dtype == e.dtype
                _close(a, e, dtype, scale=4.0)
    # empty batch: zero weight gradients
    x = torch.empty(0, 5, device=backend.dev)
    W = torch.randn(5, 9, device=backend.dev)
    e = torch.empty(0, 3, device=backend.dev)
    gx, gw, gb = backend.ops.topk_encode_backward(e, e, e.long(), x, W)
    assert gx.shape == (0, 5) and (gw == 0).all() and (gb == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_encode_transposed_weight_layout(dtype, backend):
    """W_enc held as nn.Linear's row-major [m, d] and passed transposed (how TopKSAE keeps it): the same
    results as a row-major [d, m] W_enc, and grad_W_enc in W_enc's own layout (no relayout copies)."""
    g = _gen(13, backend.dev)
    n, d, m, k = 45, 24, 130, 7
    x, b = _randn(n, d, dtype=dtype, g=g), _randn(m, dtype=dtype, g=g)
    W_t = _randn(m, d, dtype=dtype, g=g)  # [m, d] row-major
    W = W_t.t()  # [d, m] view, strides (1, d)
    assert W.stride() == (1, d)
    backend.poison()
    values, indices = backend.ops.topk_encode(x, W, b, k)
    _check_topk(x, W, b, k, values, indices, dtype)
    rv, _ = backend.ops.topk_encode(x, W.contiguous(), b, k)  # the GEMM may round differently per layout
    _close(values, rv, dtype, scale=4.0)
    gv = _randn(n, k, dtype=dtype, g=g)
    backend.poison()
    gx, gw, gb = backend.ops.topk_encode_backward(gv, values, indices, x, W)
    assert gw.shape == (d, m) and gw.stride() == W.stride(), gw.stride()
    want = ref.topk_encode_backward(gv, values, indices, x, W)
    for a, e in zip((gx, gw, gb), want):
        _close(a, e, dtype, scale=4.0)
    # Through autograd into the [m, d] leaf: the gradient lands without a layout copy.
    leaf = W_t.clone().requires_grad_(True)
    v, _ = concept_ext.topk_encode(x, leaf.t(), b, k)
    v.backward(gv)
    _close(leaf.grad.t(), want[1], dtype, scale=4.0)
    # A row-major W_enc still gets a row-major gradient.
    assert backend.ops.topk_encode_backward(gv, values, indices, x, W.contiguous())[1].is_contiguous()


def test_topk_encode_weight_grad_layouts(backend):
    """grad_W_enc follows reference.weight_grad_like's layout rule (which the fake kernel follows too,
    test_ops_correctness.py) for every W_enc layout, including ones cuBLAS cannot read in place."""
    g = _gen(17, backend.dev)
    for name, layout in W_LAYOUTS.items():
        for xdt, wdt in LAYOUT_DTYPES:
            x = _randn(9, 6, dtype=xdt, g=g)
            W = layout(_randn(6, 40, dtype=wdt, g=g))
            b = torch.zeros(40, device=backend.dev, dtype=xdt)
            values, indices = backend.ops.topk_encode(x, W if wdt == xdt else W.to(xdt), b, 5)
            _check_topk(x, W.to(xdt), b, 5, values, indices, xdt)
            gv = _randn(9, 5, dtype=xdt, g=g)
            backend.poison()
            got = backend.ops.topk_encode_backward(gv, values, indices, x, W)
            want = ref.topk_encode_backward(gv, values, indices, x, W)
            assert got[1].stride() == want[1].stride(), (name, xdt, wdt, got[1].stride())
            assert got[1].dtype == wdt and got[0].is_contiguous(), (name, xdt, wdt)
            for a, e in zip(got, want):
                _close(a, e, torch.bfloat16 if torch.bfloat16 in (xdt, wdt) else xdt, scale=4.0)


# --------------------------------------------------------------------------------------------------
# sparse_decode
# --------------------------------------------------------------------------------------------------
DECODE_CASES = [(0, 3, 10, 8), (1, 1, 5, 7), (33, 5, 40, 64), (17, 40, 40, 13), (64, 32, 1000, 260)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("n,k,m,d", DECODE_CASES)
def test_sparse_decode(n, k, m, d, index_dtype, dtype, backend):
    g = _gen(n + k + m + d, backend.dev)
    values, indices = _code(n, k, m, dtype, g, index_dtype=index_dtype)
    if n:
        indices[0, -1] = indices[0, 0]  # a duplicated latent in one row is summed
    W, b = _randn(m, d, dtype=dtype, g=g), _randn(d, dtype=dtype, g=g)
    backend.poison()
    out = backend.ops.sparse_decode(values, indices, W, b)
    _close(out, ref.sparse_decode(values, indices, W, b), dtype, scale=float(k) ** 0.5)
    grad_out = _randn(n, d, dtype=dtype, g=g)
    backend.poison()
    gv, gw = backend.ops.sparse_decode_backward(grad_out, values, indices, W)
    rgv, rgw = ref.sparse_decode_backward(grad_out, values, indices, W)
    _close(gv, rgv, dtype, scale=float(d) ** 0.5)
    _close(gw, rgw, dtype, scale=float(n) ** 0.5 + 1)


def test_sparse_decode_noncontiguous(backend):
    g = _gen(3, backend.dev)
    values, indices = _code(20, 8, 50, torch.float32, g)
    W = _randn(36, 50, dtype=torch.float32, g=g).t()  # [50, 36] non-contiguous
    b = _randn(72, dtype=torch.float32, g=g)[::2]
    vt = values.t().contiguous().t()  # same values, column-major
    _close(backend.ops.sparse_decode(vt, indices, W, b), ref.sparse_decode(values, indices, W, b), torch.float32)
    # d % 4 == 0 but W_dec starts 4 bytes past a 16-byte boundary: the float4 path must not be taken.
    Wm = _randn(50 * 36 + 1, dtype=torch.float32, g=g)[1:].view(50, 36)
    _close(backend.ops.sparse_decode(values, indices, Wm, b), ref.sparse_decode(values, indices, Wm, b), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sparse_decode_16bit_vector_path(dtype, backend):
    """16-bit W_dec with d % 8 == 0 takes the 16-byte-load path (8 values a load); a W_dec that starts 2 bytes
    past a 16-byte boundary, or d % 8 != 0, must fall back to scalar loads with the same result."""
    g = _gen(19, backend.dev)
    values, indices = _code(33, 9, 70, dtype, g)
    b = _randn(40, dtype=dtype, g=g)
    W = _randn(70, 40, dtype=dtype, g=g)
    _close(backend.ops.sparse_decode(values, indices, W, b), ref.sparse_decode(values, indices, W, b), dtype, 3.0)
    Wm = _randn(70 * 40 + 1, dtype=dtype, g=g)[1:].view(70, 40)  # misaligned start
    _close(backend.ops.sparse_decode(values, indices, Wm, b), ref.sparse_decode(values, indices, Wm, b), dtype, 3.0)
    W3 = _randn(70, 2104, dtype=dtype, g=g)  # two column tiles of 8 * 256 columns, the second partly used
    b3 = _randn(2104, dtype=dtype, g=g)
    _close(backend.ops.sparse_decode(values, indices, W3, b3), ref.sparse_decode(values, indices, W3, b3), dtype, 3.0)


# --------------------------------------------------------------------------------------------------
# activation_rate_loss
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("n,k,m", [(0, 4, 10), (1, 1, 3), (50, 7, 11), (300, 16, 40), (257, 3, 500)])
def test_activation_rate_loss(n, k, m, rate, ties, dtype, backend):
    g = _gen(n * 7 + k + m, backend.dev)
    values, indices = _code(n, k, m, dtype, g, ties=ties)
    if n > 1 and k > 1:
        values[1, 0] = -0.5  # negative entries are inactive but still get gradient 1/N
    loss = backend.ops.activation_rate_loss(values, indices, m, rate)
    want = ref.activation_rate_loss(values, indices, m, rate)
    assert loss.shape == () and loss.dtype == dtype
    _close(loss, want, dtype, scale=float(k))
    grad = torch.tensor(1.7, device=backend.dev, dtype=dtype)
    backend.poison()
    gv = backend.ops.activation_rate_loss_backward(grad, values, indices.to(torch.int32), m, rate)
    rgv = ref.activation_rate_loss_backward(grad, values, indices, m, rate)
    # The top mask (ties: earliest row-major entry wins) must agree exactly: zero where the reference is.
    assert torch.equal(gv == 0, rgv == 0)
    _close(gv, rgv, dtype)


# --------------------------------------------------------------------------------------------------
# ablate_decode
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("n,k,m,d,f", [(0, 3, 10, 4, 2), (1, 1, 5, 7, 5), (31, 6, 20, 33, 8),
                                       (64, 12, 300, 65, 0), (40, 20, 60, 300, 25)])
def test_ablate_decode(n, k, m, d, f, with_norm, dtype, backend):
    g = _gen(n + 3 * k + m + d + f, backend.dev)
    values, indices = _code(n, k, m, dtype, g, zeros=True)
    if n > 2 and k > 2:
        indices[1, 1] = indices[1, 0]  # duplicate latent: entries summed, one pair
        values[2, 0] = -0.3  # negative kept entry: in x_F, not a pair
    keep = torch.randperm(m, generator=torch.Generator().manual_seed(f))[:f].to(backend.dev)
    W, b = _randn(m, d, dtype=dtype, g=g), _randn(d, dtype=dtype, g=g)
    tn = (torch.rand(n, generator=g, device=backend.dev) + 0.5).to(dtype) if with_norm else None
    backend.poison()
    got = backend.ops.ablate_decode(values, indices.to(torch.int32), W, b, keep.to(torch.int32), tn)
    want = ref.ablate_decode(values, indices, W, b, keep, tn)
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3]), "pair lists differ"
    assert got[2].dtype == got[3].dtype == torch.int64
    _close(got[0], want[0], dtype, scale=float(k) ** 0.5)
    _close(got[1], want[1], dtype, scale=float(k) ** 0.5)
    # The padded form: the exact slot layout of the padded reference, zero rows in empty slots.
    backend.poison()
    pad = backend.ops.ablate_decode_padded(values, indices.to(torch.int32), W, b, keep.to(torch.int32), tn)
    pwant = ref.ablate_decode_padded(values, indices, W, b, keep, tn)
    assert pad[1].shape == (n * k, d)
    assert torch.equal(pad[2], pwant[2]) and torch.equal(pad[3], pwant[3]), "padded slot layouts differ"
    assert bool((pad[1][pad[2] < 0] == 0).all()), "an empty padded slot is not a zero row"
    _close(pad[0], pwant[0], dtype, scale=float(k) ** 0.5)
    _close(pad[1], pwant[1], dtype, scale=float(k) ** 0.5)


# --------------------------------------------------------------------------------------------------
# gradients, streams, graphs
# --------------------------------------------------------------------------------------------------
@needs_cuda
def test_gradcheck_float64():
    # Weight gradients use atomics, so a repeated backward may differ in the last bits: nondet_tol.
    check = lambda f, inputs: torch.autograd.gradcheck(f, inputs, nondet_tol=1e-10)  # noqa: E731
    g = _gen(5, DEV)
    n, d, m, k = 6, 5, 9, 3
    x = _randn(n, d, dtype=torch.float64, g=g).requires_grad_()
    W = _randn(d, m, dtype=torch.float64, g=g).requires_grad_()
    b = (_randn(m, dtype=torch.float64, g=g) + 2.0).requires_grad_()  # all selected values > 0
    assert check(lambda *a: concept_ext.topk_encode(*a, k).values, (x, W, b))
    values, indices = _code(n, k, m, torch.float64, g, zeros=False)
    values.requires_grad_()
    Wd = _randn(m, d, dtype=torch.float64, g=g).requires_grad_()
    bd = _randn(d, dtype=torch.float64, g=g).requires_grad_()
    assert check(lambda v, w, bb: concept_ext.sparse_decode(v, indices, w, bb), (values, Wd, bd))
    assert check(lambda v: concept_ext.activation_rate_loss(v, indices, m, 0.5), (values,))


@needs_cuda
def test_current_stream_is_used():
    g = _gen(9, DEV)
    x, W, b = _randn(70, 24, dtype=torch.float32, g=g), _randn(24, 300, dtype=torch.float32, g=g), _randn(
        300, dtype=torch.float32, g=g)
    want = ref.topk_encode(x, W, b, 8)[0]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        values, indices = OPS_NS.topk_encode(x, W, b, 8)
        out = OPS_NS.sparse_decode(values, indices, W.t().contiguous(), b[:24].contiguous())
    torch.cuda.current_stream().wait_stream(s)
    _close(values, want, torch.float32, scale=10.0)
    _close(out, ref.sparse_decode(values, indices, W.t().contiguous(), b[:24].contiguous()), torch.float32, 10.0)


@needs_cuda
def test_cuda_graph_capture():
    g = _gen(13, DEV)
    n, d, m, k = 96, 48, 512, 16
    x, W, b = _randn(n, d, dtype=torch.float32, g=g), _randn(d, m, dtype=torch.float32, g=g), _randn(
        m, dtype=torch.float32, g=g)
    Wd, bd = _randn(m, d, dtype=torch.float32, g=g), _randn(d, dtype=torch.float32, g=g)

    def step(x):
        values, indices = OPS_NS.topk_encode(x, W, b, k)
        x_hat = OPS_NS.sparse_decode(values, indices, Wd, bd)
        loss = OPS_NS.activation_rate_loss(values, indices, m, 0.1)
        gv = OPS_NS.activation_rate_loss_backward(torch.ones((), device=DEV), values, indices, m, 0.1)
        gv2, gw = OPS_NS.sparse_decode_backward(x_hat, values, indices, Wd)
        gx, gwe, gbe = OPS_NS.topk_encode_backward(gv + gv2, values, indices, x, W)
        return values, indices, x_hat, loss, gx, gw

    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(static_x)  # warm-up (cuBLAS handles, allocator) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_x)
    new_x = _randn(n, d, dtype=torch.float32, g=g)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    eager = step(new_x)
    assert torch.equal(static_out[1], eager[1])
    for a, e in zip(static_out, eager):
        _close(a, e, torch.float32, scale=10.0)


@needs_cuda
def test_cuda_graph_capture_ablate_decode_padded():
    """The padded ablation pass has no host synchronisation: it captures, and a replay on new codes equals
    an eager call (the compact form, which reads P back to the host, cannot be captured)."""
    g = _gen(17, DEV)
    n, k, m, d = 80, 12, 400, 64
    values, indices = _code(n, k, m, torch.float32, g)
    W, b = _randn(m, d, dtype=torch.float32, g=g), _randn(d, dtype=torch.float32, g=g)
    keep = torch.randperm(m, generator=torch.Generator().manual_seed(3))[:50].to(DEV)
    tn = torch.rand(n, generator=g, device=DEV) + 0.5
    sv, si = values.clone(), indices.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        OPS_NS.ablate_decode_padded(sv, si, W, b, keep, tn)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = OPS_NS.ablate_decode_padded(sv, si, W, b, keep, tn)
    v2, i2 = _code(n, k, m, torch.float32, g)
    sv.copy_(v2)
    si.copy_(i2)
    graph.replay()
    torch.cuda.synchronize()
    eager = ref.ablate_decode_padded(v2, i2, W, b, keep, tn)
    assert torch.equal(static_out[2], eager[2]) and torch.equal(static_out[3], eager[3])
    _close(static_out[0], eager[0], torch.float32, scale=4.0)
    _close(static_out[1], eager[1], torch.float32, scale=4.0)


@needs_cuda
def test_out_of_range_indices_raise_on_cuda():
    """The CUDA kernels do not range-check their indices (that would need a host synchronisation inside
    the op), so the wrappers do it on CUDA: an out-of-range id is a clear error, never an invalid read."""
    g = _gen(23, DEV)
    values, indices = _code(8, 3, 12, torch.float32, g)
    W, b = _randn(12, 5, dtype=torch.float32, g=g), _randn(5, dtype=torch.float32, g=g)
    bad = indices.clone()
    bad[3, 1] = 12
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 12\)"):
        concept_ext.sparse_decode(values, bad, W, b)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 12\)"):
        concept_ext.activation_rate_loss(values, bad, 12, 0.1)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 12\)"):
        concept_ext.ablate_decode(values, bad, W, b, torch.tensor([0, 1], device=DEV))
    with pytest.raises(ValueError, match=r"keep must lie in \[0, 12\)"):
        concept_ext.ablate_decode(values, indices, W, b, torch.tensor([0, 12], device=DEV))
    torch.cuda.synchronize()  # and the context is still healthy



@needs_cuda
def test_deterministic_mode_is_bitwise_reproducible():
    """Under torch.use_deterministic_algorithms(True) the weight gradients come from the sorted bucket
    reduction: the same inputs give the same bits on every run (the atomic default does not promise it)."""
    g = _gen(47, DEV)
    n, d, m, k = 257, 96, 1000, 24
    x = _randn(n, d, dtype=torch.float32, g=g).requires_grad_()
    W_enc = _randn(d, m, dtype=torch.float32, g=g).requires_grad_()
    b_enc = _randn(m, dtype=torch.float32, g=g).requires_grad_()
    W_dec = _randn(m, d, dtype=torch.float32, g=g).requires_grad_()
    b_dec = _randn(d, dtype=torch.float32, g=g).requires_grad_()

    def grads():
        values, indices = concept_ext.topk_encode(x, W_enc, b_enc, k)
        loss = (concept_ext.sparse_decode(values, indices, W_dec, b_dec) - x).pow(2).sum()
        return torch.autograd.grad(loss, (x, W_enc, b_enc, W_dec, b_dec))

    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for a, b in zip(first, grads()):  # and the default path agrees up to rounding
        _close(a, b, torch.float32, scale=float(n) ** 0.5)


@needs_cuda
def test_device_side_index_check_stops_unchecked_calls():
    """Under concept_ext.unchecked() the wrappers skip their range check (a host synchronisation), so the
    kernel's own check must stop the launch instead of reading out of bounds. The CUDA context is not
    usable after a trap, so the call runs in a child process."""
    code = textwrap.dedent("""
        import torch, concept_ext
        v = torch.rand(8, 3, device="cuda") + 0.1
        i = torch.randint(0, 12, (8, 3), device="cuda")
        i[3, 1] = 12
        W, b = torch.randn(12, 5, device="cuda"), torch.randn(5, device="cuda")
        with concept_ext.unchecked():
            concept_ext.sparse_decode(v, i, W, b)
        torch.cuda.synchronize()
        print("NO ERROR")
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "NO ERROR" not in out, out[-3000:]
    # The kernel's printf names the id; the launch error is the trap's.
    assert "indices out of range: 12 not in [0, 12)" in out or "illegal instruction" in out or \
        "unspecified launch failure" in out, out[-3000:]


# --------------------------------------------------------------------------------------------------
# edge cases beyond the grids above: bfloat16 weights, d = 0, k > one tile, long buckets, chunked encode
# --------------------------------------------------------------------------------------------------
@needs_cuda
def test_topk_encode_bfloat16_weights():
    """The opt-in form: float32 x and b_enc, bfloat16 W_enc (widened, fp32 accumulation)."""
    g = _gen(29, DEV)
    n, d, m, k = 45, 24, 300, 12
    x, b = _randn(n, d, dtype=torch.float32, g=g), _randn(m, dtype=torch.float32, g=g)
    W = _randn(d, m, dtype=torch.bfloat16, g=g)
    _poison()
    values, indices = concept_ext.topk_encode(x, W, b, k, weight_dtype=torch.bfloat16)
    _check_topk(x, W.float(), b, k, values, indices, torch.float32)
    gv = _randn(n, k, dtype=torch.float32, g=g)
    got = OPS_NS.topk_encode_backward(gv, values, indices, x, W)
    want = ref.topk_encode_backward(gv, values, indices, x, W)
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.dtype == e.dtype
        _close(a, e, e.dtype, scale=4.0)


def test_zero_width_d(backend):
    """d = 0: every dot product over d is empty, but grad_b_enc still sums the selected gradients."""
    g = _gen(31, backend.dev)
    x, W = torch.empty(6, 0, device=backend.dev), torch.empty(0, 10, device=backend.dev)
    b = _randn(10, dtype=torch.float32, g=g) + 1.0
    values, indices = backend.ops.topk_encode(x, W, b, 3)
    gv = _randn(6, 3, dtype=torch.float32, g=g)
    backend.poison()
    got = backend.ops.topk_encode_backward(gv, values, indices, x, W)
    want = ref.topk_encode_backward(gv, values, indices, x, W)
    for a, e in zip(got, want):
        assert a.shape == e.shape
        _close(a, e, torch.float32)
    vals, idx = _code(5, 3, 8, torch.float32, g)
    backend.poison()
    gval, gw = backend.ops.sparse_decode_backward(torch.empty(5, 0, device=backend.dev), vals, idx, torch.empty(8, 0, device=backend.dev))
    assert torch.equal(gval, torch.zeros_like(vals)) and gw.shape == (8, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_k_beyond_one_tile(dtype, backend):
    """k > 256 (the block size): the decode and encode-backward kernels loop over several tiles of k."""
    g = _gen(37, backend.dev)
    n, k, m, d = 9, 300, 700, 37
    values, indices = _code(n, k, m, dtype, g)
    W, b = _randn(m, d, dtype=dtype, g=g), _randn(d, dtype=dtype, g=g)
    backend.poison()
    _close(backend.ops.sparse_decode(values, indices, W, b), ref.sparse_decode(values, indices, W, b), dtype, k ** 0.5)
    grad_out = _randn(n, d, dtype=dtype, g=g)
    for a, e in zip(backend.ops.sparse_decode_backward(grad_out, values, indices, W),
                    ref.sparse_decode_backward(grad_out, values, indices, W)):
        _close(a, e, dtype, scale=float(d) ** 0.5 + 4)
    x, We, be = _randn(n, d, dtype=dtype, g=g), _randn(d, m, dtype=dtype, g=g), _randn(m, dtype=dtype, g=g)
    v, i = backend.ops.topk_encode(x, We, be, k)
    _check_topk(x, We, be, k, v, i, dtype)
    gv = _randn(n, k, dtype=dtype, g=g)
    for a, e in zip(backend.ops.topk_encode_backward(gv, v, i, x, We), ref.topk_encode_backward(gv, v, i, x, We)):
        _close(a, e, dtype, scale=float(k) ** 0.5 + 4)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_activation_rate_long_buckets(rate, backend):
    """Latents with thousands of entries: the per-latent selection runs over several tiles."""
    g = _gen(41, backend.dev)
    n, k, m = 3000, 2, 4
    values, indices = _code(n, k, m, torch.float32, g)
    _close(backend.ops.activation_rate_loss(values, indices, m, rate), ref.activation_rate_loss(values, indices, m, rate),
           torch.float32, scale=10.0)
    grad = torch.tensor(1.0, device=backend.dev)
    gv = backend.ops.activation_rate_loss_backward(grad, values, indices, m, rate)
    rgv = ref.activation_rate_loss_backward(grad, values, indices, m, rate)
    assert torch.equal(gv == 0, rgv == 0)
    _close(gv, rgv, torch.float32)


@needs_cuda
def test_topk_encode_in_several_chunks():
    """N * m * 4 bytes over the kernel's 256 MiB scratch: the forward runs in row chunks."""
    g = _gen(43, DEV)
    n, d, m, k = 70_000, 16, 1024, 8  # 287 MiB of pre-activations
    x, W, b = _randn(n, d, dtype=torch.float32, g=g), _randn(d, m, dtype=torch.float32, g=g), _randn(
        m, dtype=torch.float32, g=g)
    values, indices = OPS_NS.topk_encode(x, W, b, k)
    _check_topk(x, W, b, k, values, indices, torch.float32)
