"""``ablate_decode(padded=True)``: one output slot per code entry, static shapes (CUDA-graph capturable).

Checked on fresh random inputs, on CPU as dispatched (compiled kernel when built, else the reference):
the slot layout against the padded reference exactly; the valid slots, compacted, against the compact
op and the naive per-pair loop; duplicates and negative entries of a kept latent; ``opcheck`` including
the dynamic-shape AOT test the compact op cannot take; ``torch.compile(fullgraph=True)``; gradients.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import concept_ext
from concept_ext.ops import reference
from dense_oracles import naive_ablation
from samples import decode_cases, make_code

TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _close(actual, expected, dtype, scale=8.0):
    tol = TOL[dtype] * scale
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol)


def compact(out: concept_ext.AblationBatch) -> concept_ext.AblationBatch:
    """The padded output reduced to the compact op's: valid slots, ordered by (row, position in keep)."""
    valid = out.pair_row >= 0
    rows, cons, abl = out.pair_row[valid], out.pair_concept[valid], out.ablated[valid]
    # Within a row the valid slots are distinct concepts; a stable sort by row then concept orders them.
    order = torch.argsort(rows * (int(cons.max()) + 1 if cons.numel() else 1) + cons, stable=True)
    return concept_ext.AblationBatch(out.base, abl[order], rows[order], cons[order])


def _cases(dtype, gen):
    yield from decode_cases(dtype, gen)
    # A kept latent twice in a row (values summed, one pair) and a negative kept entry (in the base, no
    # pair): the two places where "one slot per entry" and "one pair per (row, concept)" differ.
    v, i = make_code(9, 4, 7, dtype=dtype, gen=gen, zeros_frac=0.0)
    i[1, 1] = i[1, 0]
    i[2, 3] = i[2, 0]
    v[3, 0] = -0.4
    v[4, 2] = 0.0
    yield "duplicates_and_negative", dict(values=v, indices=i, W_dec=torch.randn((7, 5), generator=gen).to(dtype),
                                          b_dec=torch.randn((5,), generator=gen).to(dtype))


@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_padded_layout_and_values(dtype, with_norm, rand_gen):
    gen = rand_gen
    for label, kw in _cases(dtype, gen):
        m = kw["W_dec"].shape[0]
        n, k = kw["values"].shape
        keep = torch.randperm(m, generator=gen)[: max(1, m // 2)]
        tn = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).to(dtype) if with_norm else None
        args = (kw["values"], kw["indices"], kw["W_dec"], kw["b_dec"], keep)
        got = concept_ext.ablate_decode(*args, target_norm=tn, padded=True)
        want = reference.ablate_decode_padded(*args, tn)
        assert got.ablated.shape == (n * k, kw["W_dec"].shape[1]), label
        assert got.pair_row.dtype == got.pair_concept.dtype == torch.int64, label
        # The slot layout is exact: which entry holds a pair, and which (row, concept) it is.
        assert torch.equal(got.pair_row, want[2]), label
        assert torch.equal(got.pair_concept, want[3]), label
        empty = got.pair_row < 0
        assert torch.equal(got.pair_concept < 0, empty), label
        assert bool((got.ablated[empty] == 0).all()), f"{label}: an empty slot is not a zero row"
        # Rescaling a (near-)zero vector to a target norm is ill-conditioned (where the exact result is 0,
        # the rank-1 correction leaves rounding residue that the rescale blows up): with target_norm,
        # compare the rows whose unscaled value is well away from 0.
        ok_b, ok_a = _well_conditioned(args, with_norm)
        _close(got.base[ok_b], want[0][ok_b], dtype)
        _close(got.ablated[ok_a], want[1][ok_a], dtype)
        # Compacted, the padded output is the compact op's output.
        full = concept_ext.ablate_decode(*args, target_norm=tn)
        c = compact(got)
        assert torch.equal(c.pair_row, full.pair_row) and torch.equal(c.pair_concept, full.pair_concept), label
        _close(c.base[ok_b], full.base[ok_b], dtype)
        ok_c = compact(concept_ext.AblationBatch(got.base, ok_a[:, None].to(dtype), got.pair_row,
                                                 got.pair_concept)).ablated[:, 0] > 0
        _close(c.ablated[ok_c], full.ablated[ok_c], dtype)


def _well_conditioned(args, with_norm):
    """Masks of the base rows ``[N]`` and padded slots ``[N*k]`` safe to compare after a rescale."""
    raw = reference.ablate_decode_padded(*(a.double() if a.is_floating_point() else a for a in args), None)
    if not with_norm:
        return torch.ones(raw[0].shape[0], dtype=torch.bool), torch.ones(raw[1].shape[0], dtype=torch.bool)
    return raw[0].norm(dim=1) > 1e-2, (raw[1].norm(dim=1) > 1e-2) | (raw[2] < 0)


@pytest.mark.parametrize("with_norm", [False, True])
def test_padded_matches_naive_loop(with_norm, rand_gen):
    """Independent oracle: re-decode every ablated set from a dense code, per row and kept concept."""
    gen = rand_gen
    for label, kw in decode_cases(torch.float64, gen):
        m = kw["W_dec"].shape[0]
        n = kw["values"].shape[0]
        keep = torch.randperm(m, generator=gen)[: max(1, m // 2)]
        tn = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5 if with_norm else None
        out = compact(concept_ext.ablate_decode(kw["values"], kw["indices"], kw["W_dec"], kw["b_dec"], keep,
                                                target_norm=tn, padded=True))
        eb, ea, er, ec = naive_ablation(kw["values"], kw["indices"], kw["W_dec"], kw["b_dec"], keep, tn)
        assert torch.equal(out.pair_row, er) and torch.equal(out.pair_concept, ec), label
        # As above: with target_norm, compare the rows that are not rescaled (near-)zero vectors.
        raw_b, raw_a, _, _ = naive_ablation(kw["values"], kw["indices"], kw["W_dec"], kw["b_dec"], keep)
        ok_b = raw_b.norm(dim=1) > 1e-2 if with_norm else torch.ones(n, dtype=torch.bool)
        ok_a = raw_a.norm(dim=1) > 1e-2 if with_norm else torch.ones(raw_a.shape[0], dtype=torch.bool)
        _close(out.base[ok_b], eb[ok_b], torch.float64)
        _close(out.ablated[ok_a], ea[ok_a], torch.float64)


def test_reference_padded_equals_reference_compact(rand_gen):
    """The two references agree with each other on fresh inputs (what the kernels are tested against)."""
    gen = rand_gen
    v, i = make_code(200, 9, 60, dtype=torch.float64, gen=gen, distinct=False)
    w, b = torch.randn((60, 17), generator=gen, dtype=torch.float64), torch.randn(17, dtype=torch.float64)
    keep = torch.randperm(60, generator=gen)[:25]
    pad = concept_ext.AblationBatch(*reference.ablate_decode_padded(v, i, w, b, keep, None))
    full = reference.ablate_decode(v, i, w, b, keep, None)
    c = compact(pad)
    assert torch.equal(c.pair_row, full[2]) and torch.equal(c.pair_concept, full[3])
    torch.testing.assert_close(c.ablated, full[1])
    torch.testing.assert_close(c.base, full[0])


def _opcheck_samples():
    gen = torch.Generator().manual_seed(4321)
    for label, kw in _cases(torch.float32, gen):
        keep = torch.arange(0, kw["W_dec"].shape[0], 2)
        yield label, (kw["values"].clone().requires_grad_(), kw["indices"], kw["W_dec"].clone().requires_grad_(),
                      kw["b_dec"], keep, None)


OPCHECK = list(_opcheck_samples())


@pytest.mark.parametrize("label,args", OPCHECK, ids=[lbl for lbl, _ in OPCHECK])
def test_opcheck_padded(label, args):
    # Static output shapes: unlike the compact op, the dynamic-shape AOT dispatch test applies.
    torch.library.opcheck(torch.ops.concept_ext.ablate_decode_padded.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_gradcheck_padded(rand_gen):
    g = rand_gen
    v, i = make_code(6, 3, 8, dtype=torch.float64, gen=g, zeros_frac=0.0)
    v.requires_grad_()
    w = torch.randn((8, 5), generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn((5,), generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([0, 2, 3, 5, 7])
    tn = torch.rand(6, generator=g, dtype=torch.float64) + 1

    def f(v, w, b):
        out = concept_ext.ablate_decode(v, i, w, b, keep, target_norm=tn, padded=True)
        return out.base, out.ablated

    assert gradcheck(f, (v, w, b))


@pytest.mark.slow
def test_compile_fullgraph_padded(monkeypatch, rand_gen):
    """The padded form compiles without graph breaks, with dynamic batch size."""
    monkeypatch.setenv("CONCEPT_EXT_CHECK_DATA", "0")
    torch._dynamo.reset()
    g = rand_gen
    w, b = torch.randn((40, 6), generator=g), torch.randn(6, generator=g)
    keep = torch.arange(0, 40, 3)

    def flip_scores(v, i):  # a causality-sweep-like use: per-slot change of the reconstruction
        out = concept_ext.ablate_decode(v, i, w, b, keep, padded=True)
        delta = (out.ablated - out.base.repeat_interleave(v.shape[1], 0)).norm(dim=1)
        return torch.where(out.pair_row >= 0, delta, torch.zeros_like(delta))

    compiled = torch.compile(flip_scores, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (7, 19):
        v, i = make_code(n, 5, 40, dtype=torch.float32, gen=g)
        torch.testing.assert_close(compiled(v, i), flip_scores(v, i))
