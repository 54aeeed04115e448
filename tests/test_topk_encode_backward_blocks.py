"""The blocked CPU backward of ``topk_encode`` (8x8 transposes, a per-thread W_enc^T scratch reused across
calls, skipped blocks of unused latents) against the pure-PyTorch reference on fresh random inputs."""
from __future__ import annotations

import pytest
import torch

import concept_ext  # noqa: F401  (loads _C, which registers the kernels)
from concept_ext.ops import reference

OP = torch.ops.concept_ext
pytestmark = pytest.mark.cpu_kernel("topk_encode", "topk_encode_backward")


def _case(n, d, m, k, seed, *, few_latents=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, m, generator=g) / d**0.5
    b = torch.randn(m, generator=g) * 0.1
    if few_latents:  # most latents never selected: whole 8-latent blocks of W_enc^T are skipped
        b[: 3 * k] += 20.0
    values, indices = OP.topk_encode(x, w, b, k)
    grad = torch.randn(n, k, generator=g)
    return grad, values, indices, x, w


@pytest.mark.parametrize(
    "n,d,m,k,few",
    [(64, 64, 512, 8, False), (64, 64, 512, 4, True), (37, 41, 259, 5, False), (200, 16, 96, 33, False)],
)
def test_backward_blocks_match_reference(n, d, m, k, few):
    # Run a larger case first so the per-thread scratch holds stale rows from another problem.
    OP.topk_encode_backward(*_case(50, 96, 1024, 16, seed=99))
    args = _case(n, d, m, k, seed=n + d + m + k, few_latents=few)
    got = OP.topk_encode_backward(*args)
    want = reference.topk_encode_backward(*args)
    for name, a, e in zip(("grad_x", "grad_W_enc", "grad_b_enc"), got, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("n,d,m,k", [(64, 64, 512, 8), (37, 41, 259, 5)])
def test_transposed_w_enc_read_in_place(n, d, m, k):
    # W_enc kept as nn.Linear's [m, d] weight and passed transposed (strides (1, d)): same results as the
    # reference, and grad_W_enc comes back in W_enc's own layout (so autograd stores it without a copy).
    g = torch.Generator().manual_seed(n * m)
    x = torch.randn(n, d, generator=g)
    w = (torch.randn(m, d, generator=g) / d**0.5).t()  # [d, m] view, strides (1, d)
    b = torch.randn(m, generator=g) * 0.1
    values, indices = OP.topk_encode(x, w, b, k)
    ref_v, _ = reference.topk_encode(x, w.contiguous(), b, k)
    torch.testing.assert_close(values, ref_v, atol=1e-5, rtol=1e-5)
    grad = torch.randn(n, k, generator=g)
    got = OP.topk_encode_backward(grad, values, indices, x, w)
    want = reference.topk_encode_backward(grad, values, indices, x, w.contiguous())
    for name, a, e in zip(("grad_x", "grad_W_enc", "grad_b_enc"), got, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=name)
    assert got[1].stride() == w.stride()
    # Through autograd on a parameter with that layout: the accumulated grad keeps the layout.
    p = torch.nn.Parameter(w.detach().t().contiguous().t())
    v, _ = concept_ext.topk_encode(x, p, b, k)
    v.backward(grad)
    assert p.grad.stride() == p.stride()
    torch.testing.assert_close(p.grad, want[1], atol=1e-5, rtol=1e-5)
