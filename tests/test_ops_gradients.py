"""float64 gradcheck of every differentiable op, through the dispatcher (compiled kernel when built)."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import concept_ext
from samples import make_code


@pytest.mark.parametrize("n,d,m,k", [(5, 4, 7, 3), (3, 6, 6, 6), (4, 3, 9, 1)])
def test_gradcheck_topk_encode(n, d, m, k, rand_gen):
    g = rand_gen
    x = torch.randn((n, d), generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn((d, m), generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn((m,), generator=g, dtype=torch.float64, requires_grad=True)
    # Finite differences cross the selection boundary only if pre-activations nearly tie; random
    # float64 inputs keep them apart by far more than gradcheck's eps.
    assert gradcheck(lambda x, w, b: concept_ext.topk_encode(x, w, b, k).values, (x, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,d,m,k", [(5, 4, 7, 3), (6, 3, 5, 5), (1, 2, 3, 1)])
def test_gradcheck_sparse_decode(n, d, m, k, rand_gen):
    g = rand_gen
    v, i = make_code(n, k, m, dtype=torch.float64, gen=g)
    v.requires_grad_()
    w = torch.randn((m, d), generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn((d,), generator=g, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda v, w, b: concept_ext.sparse_decode(v, i, w, b), (v, w, b))


def test_gradcheck_activation_rate_loss(rand_gen):
    g = rand_gen
    v, i = make_code(30, 3, 4, dtype=torch.float64, gen=g, zeros_frac=0.0)
    v = (v + 0.05 + torch.arange(v.numel(), dtype=torch.float64).reshape(v.shape) * 1e-3).requires_grad_()
    assert gradcheck(lambda v: concept_ext.activation_rate_loss(v, i, 4, 0.1), (v,))


@pytest.mark.parametrize("with_norm", [False, True])
def test_gradcheck_ablate_decode(with_norm, rand_gen):
    g = rand_gen
    v, i = make_code(6, 3, 8, dtype=torch.float64, gen=g, zeros_frac=0.0)
    v.requires_grad_()
    w = torch.randn((8, 5), generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn((5,), generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([0, 2, 3, 5, 7])
    tn = torch.rand(6, generator=g, dtype=torch.float64) + 1 if with_norm else None

    def f(v, w, b):
        out = concept_ext.ablate_decode(v, i, w, b, keep, target_norm=tn)
        return out.base, out.ablated

    assert gradcheck(f, (v, w, b))


def test_deterministic_mode_reaches_the_backward_ops(monkeypatch, rand_gen):
    """Autograd passes torch.are_deterministic_algorithms_enabled() to both backward ops (the CUDA kernels
    switch to their sorted reduction on it; the CPU kernels always are deterministic and must give the same
    bits either way)."""
    seen = []
    for name in ("topk_encode_backward", "sparse_decode_backward"):
        op = getattr(torch.ops.concept_ext, name)
        # Record the flag each call receives, then run the real kernel.
        monkeypatch.setattr(torch.ops.concept_ext, name, (lambda op, name: lambda *a: seen.append((name, a[-1])) or op(*a))(
            op, name))
    g = rand_gen
    x = torch.randn((40, 6), generator=g, requires_grad=True)
    w = torch.randn((6, 30), generator=g, requires_grad=True)
    b = torch.randn((30,), generator=g, requires_grad=True)
    wd = torch.randn((30, 6), generator=g, requires_grad=True)
    bd = torch.randn((6,), generator=g, requires_grad=True)

    def grads():
        v, i = concept_ext.topk_encode(x, w, b, 5)
        return torch.autograd.grad(concept_ext.sparse_decode(v, i, wd, bd).square().sum(), (x, w, b, wd, bd))

    plain = grads()
    prev = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        det = grads()
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
    assert sorted(seen) == sorted([("sparse_decode_backward", False), ("topk_encode_backward", False),
                                   ("sparse_decode_backward", True), ("topk_encode_backward", True)])
    for a, b_ in zip(plain, det):
        assert torch.equal(a, b_)
