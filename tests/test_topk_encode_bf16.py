"""Opt-in bfloat16 encoder weights (``topk_encode(..., weight_dtype=torch.bfloat16)``): fp32 accumulation,
so the result equals the fp32 reference on the bf16-rounded weights; its error against the fp32 weights is
only that rounding (stated bound below). Fresh random inputs, both W_enc layouts."""
from __future__ import annotations

import pytest
import torch

import concept_ext
from concept_ext.ops import reference


@pytest.mark.parametrize("layout", ["dm", "md_transposed"])
@pytest.mark.parametrize("n,d,m,k", [(70, 48, 600, 8), (9, 33, 130, 5)])
def test_bf16_weights_match_reference(layout, n, d, m, k):
    g = torch.Generator().manual_seed(n + m)
    x = torch.randn(n, d, generator=g)
    w32 = torch.randn(d, m, generator=g) / d**0.5
    b = torch.randn(m, generator=g) * 0.1
    w16 = w32.to(torch.bfloat16)
    if layout == "md_transposed":
        w16 = w16.t().contiguous().t()
    values, indices = concept_ext.topk_encode(x, w16, b, k, weight_dtype=torch.bfloat16)
    assert values.dtype == torch.float32
    # Exact for the rounded weights: same values as the fp32 reference on w16.float().
    ref_v, _ = reference.topk_encode(x, w16.float(), b, k)
    torch.testing.assert_close(values, ref_v, atol=1e-5, rtol=1e-5)
    pre = torch.addmm(b, x, w16.float())
    torch.testing.assert_close(values, pre.gather(1, indices).clamp_min(0), atol=1e-5, rtol=1e-5)
    # Against fp32 weights: every pre-activation moves by at most 2^-8 |x| . |w| (bf16 rounding).
    bound = (x.abs() @ w32.abs()) * 2.0**-8
    pre32 = torch.addmm(b, x, w32)
    assert bool(((pre - pre32).abs() <= bound + 1e-6).all())
    # Gradients flow (W_enc's gradient in bfloat16, like the weight).
    wp = w16.clone().requires_grad_(True)
    xp = x.clone().requires_grad_(True)
    v, i = concept_ext.topk_encode(xp, wp, b, k, weight_dtype=torch.bfloat16)
    v.sum().backward()
    gx, gw, _ = reference.topk_encode_backward(torch.ones_like(v), v.detach(), i, x, w16.float())
    torch.testing.assert_close(xp.grad, gx, atol=1e-4, rtol=1e-4)
    assert wp.grad.dtype == torch.bfloat16
    torch.testing.assert_close(wp.grad.float(), gw, atol=2e-2, rtol=2e-2)


def test_bf16_weights_argument_errors():
    x, b = torch.randn(4, 8), torch.zeros(16)
    w = torch.randn(8, 16)
    with pytest.raises(TypeError, match="weight_dtype=torch.bfloat16 needs a bfloat16 W_enc"):
        concept_ext.topk_encode(x, w, b, 2, weight_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="share a dtype"):
        concept_ext.topk_encode(x, w.bfloat16(), b, 2)
    with pytest.raises(ValueError, match="weight_dtype must be None or torch.bfloat16"):
        concept_ext.topk_encode(x, w, b, 2, weight_dtype=torch.float16)
