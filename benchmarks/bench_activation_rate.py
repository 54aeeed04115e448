"""Activation-rate loss L_ar (method.md section 2.3): the sparse concept_ext op vs the dense reference.

Group ``activation_rate-<size>-fwd+bwd`` compares, in the same process, forward + backward of

* ``ours``: :func:`concept_ext.activation_rate_loss` on the sparse code (counting sort by latent and a
  per-latent selection only where a latent has more than floor(rate * N) positive entries; O(N*k));
* ``ours_op``: the same kernel through ``torch.ops.concept_ext.activation_rate_loss`` (autograd included),
  without the public wrapper's argument, index-range and finiteness checks;
* ``dense``: scatter the code into ``zeros[N, m]``, ``torch.topk`` of ``floor(rate * N)`` along the batch
  dimension, ``L = (sum(z) - sum(top)) / N``, autograd.

Codes use distinct latents per row drawn from a 1/rank distribution, so a few latents fire in far more
than ``floor(rate * N)`` rows (as dense latents do in practice) and the selection path is exercised.
``rate = 0.1`` (m_tau = 200 for B = 2000, method.md section 2.3). Correctness (loss and gradient) is
checked against the dense formula before timing. Target (CPU, 2 threads, fp32): ours >= 10x dense at
m >= 16384.
"""
from __future__ import annotations

import math

import pytest
import torch

import concept_ext
from concept_ext.ops import reference as ref

from conftest import FULL, SIZES

RATE = 0.1
IMPLS = ["ours", "ours_op", "dense"]
_CACHE: dict = {}


def _inputs(size):
    if size.name not in _CACHE:
        _CACHE.clear()
        g = torch.Generator().manual_seed(0)
        weights = 1.0 / torch.arange(1, size.m + 1, dtype=torch.float32)
        idx = torch.multinomial(weights.expand(size.n, size.m), size.k, replacement=False, generator=g)
        values = torch.rand(size.n, size.k, generator=g) + 1e-3  # ReLU outputs, tie-free
        _CACHE[size.name] = (values, idx)
    return _CACHE[size.name]


def _dense_loss(values, idx, m, rate):
    n = values.shape[0]
    z = torch.zeros(n, m, dtype=values.dtype).scatter(1, idx, values)
    m_keep = int(math.floor(rate * n + 1e-9))
    top = torch.topk(z, m_keep, dim=0).values.sum() if m_keep > 0 else z.new_zeros(())
    return (z.sum() - top) / n


def _loss(impl, values, idx, m):
    if impl == "ours":
        return concept_ext.activation_rate_loss(values, idx, m, RATE)
    if impl == "ours_op":
        return torch.ops.concept_ext.activation_rate_loss(values, idx, m, RATE)
    return _dense_loss(values, idx, m, RATE)


def _check(values, idx, m):
    grads = []
    for impl in IMPLS:
        v = values.detach().clone().requires_grad_()
        loss = _loss(impl, v, idx, m)
        loss.backward()
        grads.append((loss.detach(), v.grad))
    for loss, grad in grads[:-1]:  # every implementation vs the dense one (last)
        torch.testing.assert_close(loss, grads[-1][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, grads[-1][1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: s.name)
def test_activation_rate_forward_backward(benchmark, size, impl):
    values, idx = _inputs(size)
    benchmark.group = f"activation_rate-{size.name}-fwd+bwd"
    benchmark.extra_info.update(size._asdict(), rate=RATE)
    if impl == "ours":  # check once per size (the check runs both implementations)
        _check(values, idx, size.m)
    v = values.detach().clone().requires_grad_()

    def run():
        v.grad = None
        loss = _loss(impl, v, idx, size.m)
        loss.backward()
        return loss

    rounds = (3 if impl == "dense" else 15) if FULL else 1
    loss = benchmark.pedantic(run, rounds=rounds, warmup_rounds=1 if FULL else 0)
    # The timed loss and gradient against the pure-PyTorch reference (fp64, independent of the dense form).
    want = ref.activation_rate_loss(values.double(), idx, size.m, RATE)
    want_grad = ref.activation_rate_loss_backward(torch.ones((), dtype=torch.float64), values.double(), idx,
                                                  size.m, RATE)
    torch.testing.assert_close(loss.detach().double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v.grad.double(), want_grad, rtol=1e-4, atol=1e-6)
