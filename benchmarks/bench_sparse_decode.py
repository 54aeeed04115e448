"""Sparse decode: the concept_ext op vs a dense decode vs ``F.embedding_bag``, forward and forward+backward.

Groups ``sparse_decode-<size>-<fwd|fwd+bwd>`` compare, in the same process and on the same inputs:

* ``ours``: :func:`concept_ext.sparse_decode` (C++ kernel when built; gather-sum forward, latent-bucketed
  scatter backward);
* ``ours_op``: the same kernel through ``torch.ops.concept_ext.sparse_decode`` (autograd included),
  without the public wrapper's argument and index-range checks;
* ``embedding_bag``: ``F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec``;
* ``dense``: scatter the code into ``zeros[N, m]`` then ``z @ W_dec + b_dec`` (what most SAE libraries do).

Backward is ``out.backward(grad)`` w.r.t. values, W_dec and b_dec. Before timing, each implementation's
output and gradients are checked against :mod:`concept_ext.ops.reference`.
Targets (performance.md, CPU, 2 threads, fp32): ours fwd+bwd >= 10x the dense path, and not slower than
embedding_bag (stretch: >= 1.2x).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import concept_ext
from concept_ext.ops import reference as ref

from conftest import FULL, SIZES

IMPLS = ["ours", "ours_op", "embedding_bag", "dense"]


def _inputs(size):
    g = torch.Generator().manual_seed(0)
    n, d, m, k = size.n, size.d, size.m, size.k
    # Distinct, uniformly spread latents per row, like a top-k code, without an [N, m] tensor: a random
    # start plus k strictly increasing offsets whose span stays below m.
    steps = torch.randint(1, max(2, m // k + 1), (n, k), generator=g).cumsum(1)
    idx = (torch.randint(0, m, (n, 1), generator=g) + steps) % m
    values = torch.rand(n, k, generator=g)
    W = torch.randn(m, d, generator=g) / d**0.5
    b = torch.randn(d, generator=g)
    grad = torch.randn(n, d, generator=g)
    return values, idx, W, b, grad


_CACHE: dict = {}


def _cached(size):
    if size.name not in _CACHE:
        _CACHE.clear()  # keep one size in memory at a time
        _CACHE[size.name] = _inputs(size)
    return _CACHE[size.name]


def _forward(impl, values, idx, W, b):
    if impl == "ours":
        return concept_ext.sparse_decode(values, idx, W, b)
    if impl == "ours_op":
        return torch.ops.concept_ext.sparse_decode(values, idx, W, b)
    if impl == "embedding_bag":
        return F.embedding_bag(idx, W, per_sample_weights=values, mode="sum") + b
    z = torch.zeros(values.shape[0], W.shape[0], dtype=values.dtype).scatter(1, idx, values)
    return z @ W + b


def _leaves(values, W, b):
    return [t.detach().clone().requires_grad_() for t in (values, W, b)]


def _check(impl, values, idx, W, b, grad):
    v, w, bb = _leaves(values, W, b)
    out = _forward(impl, v, idx, w, bb)
    out.backward(grad)
    want = ref.sparse_decode(values, idx, W, b)
    gv, gw = ref.sparse_decode_backward(grad, values, idx, W)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v.grad, gv, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(w.grad, gw, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(bb.grad, grad.sum(0), rtol=1e-4, atol=1e-3)


def _rounds(impl):
    if not FULL:
        return 1
    return 2 if impl == "dense" else 7


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: s.name)
def test_sparse_decode_forward(benchmark, size, impl):
    values, idx, W, b, grad = _cached(size)
    benchmark.group = f"sparse_decode-{size.name}-fwd"
    benchmark.extra_info.update(size._asdict())
    _check(impl, values, idx, W, b, grad)

    def run():
        with torch.no_grad():
            return _forward(impl, values, idx, W, b)

    out = benchmark.pedantic(run, rounds=_rounds(impl), warmup_rounds=1 if FULL else 0)
    torch.testing.assert_close(out, ref.sparse_decode(values, idx, W, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: s.name)
def test_sparse_decode_forward_backward(benchmark, size, impl):
    values, idx, W, b, grad = _cached(size)
    benchmark.group = f"sparse_decode-{size.name}-fwd+bwd"
    benchmark.extra_info.update(size._asdict())
    _check(impl, values, idx, W, b, grad)
    v, w, bb = _leaves(values, W, b)

    def run():
        v.grad = w.grad = bb.grad = None
        _forward(impl, v, idx, w, bb).backward(grad)
        return w.grad

    gw = benchmark.pedantic(run, rounds=_rounds(impl), warmup_rounds=1 if FULL else 0)
    # The timed step's gradients (left on the leaves by its last round) against the reference backward.
    want_v, want_w = ref.sparse_decode_backward(grad, values, idx, W)
    torch.testing.assert_close(gw, want_w, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(v.grad, want_v, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(bb.grad, grad.sum(0), rtol=1e-4, atol=1e-3)
