"""Every op, as dispatched (compiled kernel when built, else the reference), against independent dense
oracles and against ``concept_ext.ops.reference``, on fresh random inputs and the edge cases of samples.py."""
from __future__ import annotations

import pytest
import torch

import concept_ext
from concept_ext.ops import reference
from dense_oracles import dense_decode, dense_rate_loss, naive_ablation, pre_activations
from samples import LAYOUT_DTYPES, W_LAYOUTS, decode_cases, encode_cases, make_code, rate_cases

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# Relative/absolute tolerances by dtype (performance.md section 3.6): fp32 << 1e-3, bf16 1e-3..1e-2.
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _devices(op: str) -> list[str]:
    devs = ["cpu"]
    if torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"concept_ext::{op}", "CUDA"):
        devs.append("cuda")
    return devs


def _leaf(t):
    """A float64 CPU leaf that never aliases the sample tensor."""
    return t.detach().double().cpu().clone().requires_grad_()


def _close(actual, expected, dtype, scale=1.0):
    tol = TOL[dtype] * max(1.0, scale)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol)


def check_topk(values, indices, x, W_enc, b_enc, k, dtype):
    """Tie-aware check (performance.md section 3.6)."""
    n = x.shape[0]
    assert values.shape == (n, k) and indices.shape == (n, k)
    assert indices.dtype == torch.int64 and values.dtype == x.dtype
    if n == 0:
        return
    pre = pre_activations(x, W_enc, b_enc)  # [N, m] float64
    idx = indices.cpu()
    # Distinct latents per row.
    assert (idx.sort(1).values.diff(dim=1) != 0).all()
    sel = pre.gather(1, idx)  # pre-activations at the returned indices
    scale = float(pre.abs().max())
    _close(values, sel.clamp_min(0), dtype, scale)  # each value is ReLU of its own pre-activation
    assert (values.double().cpu().diff(dim=1) <= TOL[dtype] * max(1.0, scale)).all()  # sorted descending
    # The multiset of selected pre-activations equals the true top-k (ties may pick other indices).
    _close(sel.sort(1, descending=True).values, torch.topk(pre, k, dim=1).values, dtype, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", _devices("topk_encode"))
def test_topk_encode(device, dtype, rand_gen):
    gen = rand_gen
    for label, kw in encode_cases(dtype, gen, device):
        values, indices = concept_ext.topk_encode(**kw)
        check_topk(values, indices, kw["x"], kw["W_enc"], kw["b_enc"], kw["k"], dtype)
        rv, ri = reference.topk_encode(**kw)
        _close(values, rv, dtype, float(rv.abs().max()) if rv.numel() else 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", _devices("sparse_decode"))
def test_sparse_decode(device, dtype, rand_gen):
    gen = rand_gen
    for label, kw in decode_cases(dtype, gen, device):
        out = concept_ext.sparse_decode(**kw)
        assert out.shape == (kw["values"].shape[0], kw["W_dec"].shape[1]) and out.dtype == dtype, label
        _close(out, dense_decode(**kw), dtype, 4.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", _devices("sparse_decode"))
def test_sparse_decode_backward_matches_dense_autograd(device, dtype, rand_gen):
    gen = rand_gen
    for label, kw in decode_cases(dtype, gen, device):
        g = torch.randn((kw["values"].shape[0], kw["W_dec"].shape[1]), generator=gen).to(dtype=dtype, device=device)
        gv, gw = torch.ops.concept_ext.sparse_decode_backward(g, kw["values"], kw["indices"], kw["W_dec"])
        v = _leaf(kw["values"])
        w = _leaf(kw["W_dec"])
        out = dense_decode(v, kw["indices"], w, kw["b_dec"])
        ev, ew = torch.autograd.grad(out, (v, w), g.double().cpu()) if out.numel() else (
            torch.zeros_like(v), torch.zeros_like(w))
        _close(gv, ev, dtype, 8.0)
        _close(gw, ew, dtype, 8.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", _devices("topk_encode"))
def test_topk_encode_backward_matches_dense_autograd(device, dtype, rand_gen):
    gen = rand_gen
    for label, kw in encode_cases(dtype, gen, device):
        if label == "ties":  # the selected set is ambiguous under ties; covered by the tie-free cases
            continue
        values, indices = concept_ext.topk_encode(**kw)
        g = torch.randn(values.shape, generator=gen).to(dtype=dtype, device=device)
        gx, gw, gb = torch.ops.concept_ext.topk_encode_backward(g, values, indices, kw["x"], kw["W_enc"])
        x = _leaf(kw["x"])
        w = _leaf(kw["W_enc"])
        b = _leaf(kw["b_enc"])
        pre = x @ w + b
        sel = pre.gather(1, indices.cpu()).clamp_min(0)  # the same selection, dense autograd
        if sel.numel():
            ex, ew, eb = torch.autograd.grad(sel, (x, w, b), g.double().cpu())
        else:
            ex, ew, eb = torch.zeros_like(x), torch.zeros_like(w), torch.zeros_like(b)
        s = 8.0 * max(1.0, float(kw["x"].double().abs().amax())) if kw["x"].numel() else 1.0
        _close(gx, ex, dtype, s)
        _close(gw, ew, dtype, s)
        _close(gb, eb, dtype, s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", _devices("activation_rate_loss"))
def test_activation_rate_loss(device, dtype, rand_gen):
    gen = rand_gen
    for label, kw in rate_cases(dtype, gen, device):
        loss = concept_ext.activation_rate_loss(**kw)
        assert loss.shape == () and loss.dtype == dtype, label
        expected = dense_rate_loss(kw["values"], kw["indices"], kw["n_latents"], kw["rate"])
        _close(loss, expected, dtype, 4.0)


@pytest.mark.parametrize("device", _devices("activation_rate_loss"))
def test_activation_rate_loss_gradient_matches_dense(device, rand_gen):
    """Tie-free values: the sparse gradient equals the dense formula's autograd gradient."""
    gen = rand_gen
    for n, k, m, rate in [(40, 3, 5, 0.1), (100, 8, 16, 0.1), (30, 4, 4, 0.2)]:
        v, i = make_code(n, k, m, dtype=torch.float64, gen=gen, device=device, zeros_frac=0.0)
        v = v + torch.arange(v.numel(), dtype=torch.float64, device=device).reshape(v.shape) * 1e-6  # no ties
        vv = v.clone().requires_grad_()
        concept_ext.activation_rate_loss(vv, i, m, rate).backward()
        vd = _leaf(v)
        dense_rate_loss(vd, i.cpu(), m, rate).backward()
        torch.testing.assert_close(vv.grad.cpu(), vd.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", _devices("ablate_decode"))
def test_ablate_decode_matches_naive_loop(device, dtype, with_norm, rand_gen):
    gen = rand_gen
    for label, kw in decode_cases(dtype, gen, device):
        m = kw["W_dec"].shape[0]
        keep = torch.randperm(m, generator=gen)[: max(1, m // 2)].to(device)
        n = kw["values"].shape[0]
        tn = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device) if with_norm else None
        out = concept_ext.ablate_decode(kw["values"], kw["indices"], kw["W_dec"], kw["b_dec"], keep, target_norm=tn)
        eb, ea, er, ec = naive_ablation(kw["values"], kw["indices"], kw["W_dec"], kw["b_dec"], keep, tn)
        assert torch.equal(out.pair_row.cpu(), er), label
        assert torch.equal(out.pair_concept.cpu(), ec), label
        if with_norm:
            # Rescaling a (near-)zero vector to a target norm is ill-conditioned (the rank-1 correction
            # leaves rounding residue where the exact result is 0): compare well-conditioned rows only.
            raw_b, raw_a, _, _ = naive_ablation(kw["values"], kw["indices"], kw["W_dec"], kw["b_dec"], keep)
            ok_b, ok_a = raw_b.norm(dim=1) > 1e-2, raw_a.norm(dim=1) > 1e-2
            _close(out.base[ok_b.to(device)], eb[ok_b], dtype, 8.0)
            _close(out.ablated[ok_a.to(device)], ea[ok_a], dtype, 8.0)
        else:
            _close(out.base, eb, dtype, 8.0)
            _close(out.ablated, ea, dtype, 8.0)


@pytest.mark.parametrize("op", ["topk_encode", "sparse_decode", "activation_rate_loss", "ablate_decode"])
def test_dispatched_kernel_equals_reference_on_fresh_inputs(op, rand_gen):
    """Whatever serves the op on CPU gives the reference's numbers (bit-for-bit is not required)."""
    gen = rand_gen
    v, i = make_code(300, 12, 500, dtype=torch.float32, gen=gen)
    w = torch.randn((500, 64), generator=gen)
    b = torch.randn((64,), generator=gen)
    if op == "topk_encode":
        x = torch.randn((300, 64), generator=gen)
        got = torch.ops.concept_ext.topk_encode(x, w.t(), torch.zeros(500), 12)
        check_topk(*got, x, w.t(), torch.zeros(500), 12, torch.float32)
    elif op == "sparse_decode":
        _close(torch.ops.concept_ext.sparse_decode(v, i, w, b), reference.sparse_decode(v, i, w, b), torch.float32, 8)
    elif op == "activation_rate_loss":
        _close(torch.ops.concept_ext.activation_rate_loss(v, i, 500, 0.1),
               reference.activation_rate_loss(v, i, 500, 0.1), torch.float32, 8)
    else:
        keep = torch.randperm(500, generator=gen)[:20]
        got = torch.ops.concept_ext.ablate_decode(v, i, w, b, keep, None)
        exp = reference.ablate_decode(v, i, w, b, keep, None)
        for a, e in zip(got, exp):
            if a.is_floating_point():
                _close(a, e, torch.float32, 8)
            else:
                assert torch.equal(a, e)


def test_weight_grad_layout_is_the_same_everywhere():
    """grad_W_enc's layout is the same from the kernel, the reference and the fake (torch.compile, opcheck)
    for every W_enc layout and dtype: W_enc's own where it is transposed-contiguous, row-major otherwise."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(3)
    for name, layout in W_LAYOUTS.items():
        for xdt, wdt in LAYOUT_DTYPES:
            x = torch.randn(7, 6, generator=g).to(xdt)
            W = layout(torch.randn(6, 10, generator=g).to(wdt))  # [6, 10] in its dtype, then laid out
            b = torch.zeros(10, dtype=wdt)
            values, indices = reference.topk_encode(x, W.to(xdt), b.to(xdt), 3)
            gv = torch.randn(7, 3, generator=g).to(xdt)
            got = torch.ops.concept_ext.topk_encode_backward(gv, values, indices, x, W)
            want = reference.topk_encode_backward(gv, values, indices, x, W)
            with FakeTensorMode() as mode:
                fake = torch.ops.concept_ext.topk_encode_backward(
                    *(mode.from_tensor(t) for t in (gv, values, indices, x, W)))
            rule = (1, 6) if reference.is_transposed_contiguous(W) else (10, 1)
            for what, out in (("kernel", got), ("reference", want), ("fake", fake)):
                assert out[1].stride() == rule, (name, xdt, wdt, what, out[1].stride())
                assert out[1].dtype == wdt and out[0].stride() == (6, 1), (name, xdt, wdt, what)
            _close(got[1], want[1], torch.bfloat16 if torch.bfloat16 in (xdt, wdt) else xdt, scale=4.0)
