"""Completeness metrics (method.md 3.2, 6.1, 6.2; oddity 11) against a per-sentence loop and sklearn."""
from __future__ import annotations

import json

import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support
from test_causality import FakeSAE, LinearDictModel, data, make_ctx, make_tail, naive_vector

from concept_ext.metrics.completeness import activation_rates, completeness, mean_ce
from concept_ext.metrics.readout import ContextReadout, TailReadout, encode_selected, rescale_to


def naive_completeness(model, h, o, y, fn, *, rescale=True, thr=1e-6):
    """One encode and one readout call per sentence, full-width codes."""
    sel = list(model.selected)
    q_pred, q_ce, ceil, active = [], [], [], torch.zeros(len(sel))
    for i in range(h.shape[0]):
        z = model.encode(h[i:i + 1])[0]
        zs = torch.zeros_like(z)
        zs[sel] = z[sel]
        active += (z[sel].abs() > thr).float()
        logit = fn(naive_vector(model, h[i], zs, rescale=rescale)[None])[0]
        q_pred.append(int(logit.argmax()))
        q_ce.append(float(-torch.log_softmax(logit, 0)[y[i]]))
        ceil.append(int(fn(h[i:i + 1])[0].argmax()))
    q_pred, ceil = torch.tensor(q_pred), torch.tensor(ceil)
    o_pred = o.argmax(1)
    return dict(
        racc=float((q_pred == o_pred).double().mean()), ceiling=float((ceil == o_pred).double().mean()),
        bottleneck_accuracy=float((q_pred == y).double().mean()), bottleneck_ce=sum(q_ce) / len(q_ce),
        q_pred=q_pred, rates=100 * active / h.shape[0],
    )


@pytest.mark.parametrize("rescale", [True, False])
def test_completeness_matches_per_sentence_loop(rescale):
    gen = torch.Generator().manual_seed(21 + rescale)
    d, c, n = 12, 3, 45
    model = LinearDictModel(d, 9, [8, 1, 4, 6], c, gen=gen)
    h, y = data(n, d, c, gen=gen)
    tail = make_tail(d, c, gen=gen)
    o = tail(h) + 4.0 * torch.randn(n, c, generator=gen, dtype=h.dtype)  # full-context logits differ
    res = completeness(model, h, o, y, TailReadout(tail, batch_size=10), rescale=rescale)
    want = naive_completeness(model, h, o, y, tail, rescale=rescale)
    for key in ("racc", "ceiling", "bottleneck_accuracy"):
        assert getattr(res, key) == want[key], key
    assert 0 < res.ceiling < 1 and res.racc_ratio == pytest.approx(res.racc / res.ceiling)
    assert res.bottleneck_ce == pytest.approx(want["bottleneck_ce"], rel=1e-10)
    assert res.original_accuracy == float((o.argmax(1) == y).double().mean())
    ce_o = float(torch.nn.functional.cross_entropy(o, y))
    assert res.original_ce == pytest.approx(ce_o, rel=1e-10)
    # per-class scores against sklearn (zero_division=0)
    for scores, pred in [(res.bottleneck_scores, want["q_pred"]), (res.original_scores, o.argmax(1))]:
        p, r, f, s = precision_recall_fscore_support(y.numpy(), pred.numpy(), labels=list(range(c)),
                                                     zero_division=0)
        assert scores.precision == pytest.approx(p.tolist()) and scores.recall == pytest.approx(r.tolist())
        assert scores.f1 == pytest.approx(f.tolist()) and scores.support == s.tolist()
    assert res.act_rates == pytest.approx(want["rates"].tolist())
    assert res.avg_act_rate == pytest.approx(float(want["rates"].mean()))
    assert res.max_act_rate == pytest.approx(float(want["rates"].max()))
    json.dumps(res.to_dict())  # plain numbers only


def test_activation_rate_thresholds_are_strict():
    acts = torch.tensor([[0.0, 1e-6, -2e-6], [1e-8, 2e-8, 0.5], [0.0, 0.0, 0.0], [1.0, -1.0, 0.0]],
                        dtype=torch.float64)
    assert activation_rates(acts, 1e-6).tolist() == [25.0, 25.0, 50.0]
    assert activation_rates(acts, 1e-8).tolist() == [25.0, 75.0, 50.0]


def test_reference_quirk_ce_per_batch_of_4():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert mean_ce(logits, y) == pytest.approx(float(ce.mean()))
    batch = (ce[:4].mean() + ce[4:8].mean() + ce[8:].mean()) / 3  # 10 is not a multiple of 4: they differ
    assert mean_ce(logits, y, per_batch=4) == pytest.approx(float(batch))
    assert abs(float(batch) - float(ce.mean())) > 1e-6
    model = LinearDictModel(5, 4, [0, 1], 3, gen=gen)
    h = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    tail = make_tail(5, 3, gen=gen)
    res = completeness(model, h, logits, y, TailReadout(tail), reference_quirks=True)
    assert res.ce_averaging == "batch4" and res.original_ce == pytest.approx(float(batch))


def test_sae_fast_path_and_context_ceiling():
    gen = torch.Generator().manual_seed(9)
    d, c, n = 16, 4, 40
    sae = FakeSAE(d, 40, 5, [0, 3, 5, 7, 11, 13, 17, 19, 23], c, gen=gen)
    h, y = data(n, d, c, gen=gen)
    ctx = make_ctx(d, n, c, gen=gen)
    rows = torch.arange(n)
    o = ctx(h, rows)  # the in-context readout reproduces the full model at h: ceiling exactly 1
    code = encode_selected(sae, h)
    fast = completeness(sae, h, o, y, ContextReadout(ctx), code=code)
    slow = completeness(sae, h, o, y, ContextReadout(ctx), fast=False)
    assert fast.ceiling == 1.0 and fast.protocol == "context"
    assert (fast.racc, fast.bottleneck_accuracy) == (slow.racc, slow.bottleneck_accuracy)
    assert fast.bottleneck_ce == pytest.approx(slow.bottleneck_ce, rel=1e-9)
    assert fast.n_selected == 9 and fast.selected == [0, 3, 5, 7, 11, 13, 17, 19, 23]


def test_rescale_matches_formula_and_bad_inputs():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    out = rescale_to(x, torch.tensor([10.0, 2.0], dtype=torch.float64))
    assert torch.allclose(out[0], x[0] * 10 / (5 + 1e-9)) and out[1].abs().sum() == 0
    gen = torch.Generator().manual_seed(0)
    model = LinearDictModel(4, 3, [0], 2, gen=gen)
    tail = make_tail(4, 2, gen=gen)
    h = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="logits"):
        completeness(model, h, torch.zeros(5, 2), torch.zeros(6, dtype=torch.long), TailReadout(tail))
    with pytest.raises(ValueError, match="labels"):
        completeness(model, h, torch.zeros(6, 2), torch.zeros(6, 1, dtype=torch.long), TailReadout(tail))
    with pytest.raises(ValueError, match="batch_size"):
        TailReadout(tail, batch_size=0)
    model.selected = [7]
    with pytest.raises(ValueError, match="selected"):
        completeness(model, h, torch.zeros(6, 2), torch.zeros(6, dtype=torch.long), TailReadout(tail))
