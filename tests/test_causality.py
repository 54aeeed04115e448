"""Causality metrics (method.md 6.3, 6.4) against deliberately naive implementations.

The naive side follows the reference protocol literally: one readout call per (concept, sentence) pair
(or per sentence and ablated set), full-width codes, no batching, no shared encode. Fake concept models
(dense linear, non-linear decoder, TopK SAE) and fake readouts live here and are reused by
test_completeness.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from concept_ext import sparse_decode, topk_encode
from concept_ext.metrics.causality import conditional_ablation, segment_ablation
from concept_ext.metrics.readout import ContextReadout, TailReadout, encode_selected

THR = 1e-8


# ----------------------------------------------------------------------------------------------- fakes


class LinearDictModel:
    """Dense encoder with a shifted ReLU (exact zeros), linear dictionary decoder plus a mean."""

    def __init__(self, d, n_concepts, selected, n_classes, *, gen, dtype=torch.float64, nonlinear=False):
        self.W_e = torch.randn(d, n_concepts, generator=gen, dtype=dtype) / math.sqrt(d)
        self.D = torch.randn(n_concepts, d, generator=gen, dtype=dtype)
        self.mu = torch.randn(d, generator=gen, dtype=dtype) * 0.1
        self.W1 = torch.randn(n_concepts, 16, generator=gen, dtype=dtype)
        self.W2 = torch.randn(16, d, generator=gen, dtype=dtype) / 4
        self.nonlinear = nonlinear
        self.selected = list(selected)
        self.segmentation = [int(j) % n_classes for j in self.selected]

    def encode(self, h):
        return torch.relu(h @ self.W_e - 0.3)

    def reconstruct(self, acts):
        if self.nonlinear:  # ConceptSHAP-like g(p): ablations must be re-decoded, never linearised
            return torch.relu(acts @ self.W1) @ self.W2
        return acts @ self.D + self.mu

    def directions(self):
        return self.D


class FakeSAE:
    """TopK SAE on the normalised input x = h * sqrt(d) / ||h||; exposes the sparse code."""

    def __init__(self, d, m, k, selected, n_classes, *, gen, dtype=torch.float64):
        self.W_enc = torch.randn(d, m, generator=gen, dtype=dtype) / math.sqrt(d)
        self.b_enc = torch.randn(m, generator=gen, dtype=dtype) * 0.1
        self.W_dec = torch.randn(m, d, generator=gen, dtype=dtype) / math.sqrt(d)
        self.b_dec = torch.randn(d, generator=gen, dtype=dtype) * 0.1
        self.k, self.m = k, m
        self.selected = list(selected)
        self.segmentation = [int(j) % n_classes for j in self.selected]

    def _x(self, h):
        return h * (math.sqrt(h.shape[1]) / h.norm(dim=1, keepdim=True))

    def sparse_code(self, h):
        c = topk_encode(self._x(h), self.W_enc, self.b_enc, self.k)
        return c.values, c.indices

    def encode(self, h):
        v, i = self.sparse_code(h)
        return torch.zeros(h.shape[0], self.m, dtype=h.dtype).scatter_add_(1, i, v)

    def reconstruct(self, acts):  # normalised space: the ||h|| rescale cancels the input scale
        return acts @ self.W_dec + self.b_dec

    def directions(self):
        return self.W_dec


def make_tail(d, n_classes, *, gen, dtype=torch.float64):
    A = torch.randn(d, 24, generator=gen, dtype=dtype) / math.sqrt(d)
    B = torch.randn(24, n_classes, generator=gen, dtype=dtype) * 2
    a = torch.randn(24, generator=gen, dtype=dtype) * 0.1
    return lambda v: torch.tanh(v @ A + a) @ B


def make_ctx(d, n_rows, n_classes, *, gen, dtype=torch.float64):
    tail = make_tail(d, n_classes, gen=gen, dtype=dtype)
    prefix = torch.randn(n_rows, d, generator=gen, dtype=dtype) * 0.5
    return lambda v, r: tail(v + prefix[r])


def data(n, d, n_classes, *, gen, dtype=torch.float64):
    h = torch.randn(n, d, generator=gen, dtype=dtype) * 3
    y = torch.randint(0, n_classes, (n,), generator=gen)
    return h, y


# ------------------------------------------------------------------------------------ naive references


def naive_vector(model, h_i, acts_full, *, rescale):
    x = model.reconstruct(acts_full[None])[0]
    return x * (h_i.norm() / (x.norm() + 1e-9)) if rescale else x


def naive_conditional(model, h, y, fn, *, rescale=True, rows_arg=False):
    """One readout call per pair, one model encode per sentence (the reference's per-concept sweeps)."""
    call = (lambda v, i: fn(v[None], torch.tensor([i]))[0]) if rows_arg else (lambda v, i: fn(v[None])[0])
    sel = list(model.selected)
    out = []
    for j in sel:
        flips, tvd, dacc, cnt = 0.0, 0.0, 0.0, 0
        for i in range(h.shape[0]):
            z = model.encode(h[i:i + 1])[0]
            mask = torch.zeros_like(z)
            mask[sel] = 1
            z = z * mask
            if not abs(float(z[j])) > THR:
                continue
            q = torch.softmax(call(naive_vector(model, h[i], z, rescale=rescale), i).double(), 0)
            z2 = z.clone()
            z2[j] = 0
            qa = torch.softmax(call(naive_vector(model, h[i], z2, rescale=rescale), i).double(), 0)
            cnt += 1
            flips += float(q.argmax() != qa.argmax())
            tvd += 0.5 * float((q - qa).abs().sum())
            dacc += float(qa.argmax() == y[i]) - float(q.argmax() == y[i])
        out.append((cnt,) + tuple(x / cnt if cnt else None for x in (flips, tvd, dacc)))
    return out


def naive_segment(model, h, y, fn, n_classes, *, fractions=(25, 50, 75, 100), rescale=True):
    sel = list(model.selected)
    acts = torch.stack([model.encode(h[i:i + 1])[0][sel] for i in range(h.shape[0])])
    strength = acts.abs().mean(0)
    res = {}
    for c in range(n_classes):
        seg = [f for f in range(len(sel)) if model.segmentation[f] == c]
        seg.sort(key=lambda f: (-float(strength[f]), f))
        for p in fractions:
            drop = [sel[f] for f in seg[: (p * len(seg)) // 100]]
            if not drop:
                res[(c, p)] = (0.0, 0.0, 0.0)
                continue
            acc0 = acc1 = flips = tvd = 0.0
            for i in range(h.shape[0]):
                z = torch.zeros(model.encode(h[i:i + 1]).shape[1], dtype=h.dtype)
                z[sel] = acts[i]
                q = torch.softmax(fn(naive_vector(model, h[i], z, rescale=rescale)[None])[0], 0)
                z[drop] = 0
                qa = torch.softmax(fn(naive_vector(model, h[i], z, rescale=rescale)[None])[0], 0)
                acc0 += float(q.argmax() == y[i])
                acc1 += float(qa.argmax() == y[i])
                flips += float(q.argmax() != qa.argmax())
                tvd += 0.5 * float((q - qa).abs().sum())
            n = h.shape[0]
            res[(c, p)] = ((acc1 - acc0) / n, flips / n, tvd / n)
    return res


def assert_matches_naive(result, naive):
    assert len(result.per_concept) == len(naive)
    for got, (cnt, flip, tvd, dacc) in zip(result.per_concept, naive):
        assert got.n_active == cnt
        if cnt == 0:
            assert got.flip_rate is None and got.tvd is None
            continue
        assert got.flip_rate == pytest.approx(flip, abs=1e-12)
        assert got.tvd == pytest.approx(tvd, abs=1e-9)
        assert got.delta_acc == pytest.approx(dacc, abs=1e-12)
    live = [x for x in naive if x[0] > 0]
    assert result.n_evaluated == len(live)
    assert result.delta_f_cond == pytest.approx(sum(x[1] for x in live) / len(live), abs=1e-12)
    assert result.tvd_cond == pytest.approx(sum(x[2] for x in live) / len(live), abs=1e-9)
    # (b) the selective mean leaves out concepts active on >= 99 % of the sentences; (c) weights by |S_j|.
    n = result.n_sentences
    sel = [x for x in live if x[0] < 0.99 * n]
    if sel:
        assert result.delta_f_cond_selective == pytest.approx(sum(x[1] for x in sel) / len(sel), abs=1e-12)
        assert result.tvd_cond_selective == pytest.approx(sum(x[2] for x in sel) / len(sel), abs=1e-9)
    else:
        assert result.delta_f_cond_selective is None and result.tvd_cond_selective is None
    pairs = sum(x[0] for x in live)
    assert result.delta_f_cond_weighted == pytest.approx(sum(x[0] * x[1] for x in live) / pairs, abs=1e-12)
    assert result.tvd_cond_weighted == pytest.approx(sum(x[0] * x[2] for x in live) / pairs, abs=1e-9)


# ---------------------------------------------------------------------------------------------- tests


def test_hand_made_flips():
    """d = C = 2, identity concepts and readout: flips and accuracy changes known by hand."""
    class Ident:
        selected, segmentation = [0, 1], [0, 1]

        def encode(self, h):
            return h.clone()

        def reconstruct(self, a):
            return a.clone()

    h = torch.tensor([[3.0, 1.0], [1.0, 3.0], [2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    calls = []
    ro = TailReadout(lambda v: (calls.append(v.shape[0]), v)[1])
    res = conditional_ablation(Ident(), h, y, ro, rescale=False)
    c0, c1 = res.per_concept
    assert (c0.n_active, c1.n_active) == (3, 2)
    assert c0.flip_rate == pytest.approx(1 / 3) and c1.flip_rate == pytest.approx(1 / 2)
    assert c0.delta_acc == pytest.approx(-1 / 3) and c1.delta_acc == pytest.approx(-1 / 2)
    assert res.delta_f_cond == pytest.approx(5 / 12)
    assert res.delta_f_cond_weighted == pytest.approx(2 / 5)  # 2 flips over 5 (sentence, concept) pairs
    assert res.delta_f_cond_selective == pytest.approx(5 / 12) and res.always_on == []
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731  2-class softmax = sigmoid of the margin
    tvd0 = (abs(sig(2) - sig(-1)) + abs(sig(-2) - sig(-3)) + abs(sig(2) - 0.5)) / 3
    assert c0.tvd == pytest.approx(tvd0)
    assert res.n_pairs == 5 and calls == [4 + 5]  # one readout call: N base + 5 pairs
    seg = segment_ablation(Ident(), h, y, ro, rescale=False)
    full = {(e.cls, e.fraction): e for e in seg.entries}
    assert full[(0, 25)].n_ablated == 0 and full[(0, 25)].delta_acc == 0.0
    for cl in (0, 1):
        assert full[(cl, 100)].delta_acc == pytest.approx(-0.25)
        assert full[(cl, 100)].flip_rate == pytest.approx(0.25)
    assert seg.means[-1].delta_acc == pytest.approx(-0.25) and seg.means[0].delta_acc == 0.0


@pytest.mark.parametrize("nonlinear", [False, True])
@pytest.mark.parametrize("rescale", [True, False])
def test_conditional_matches_per_pair_loop(nonlinear, rescale):
    gen = torch.Generator().manual_seed(1 + nonlinear + 2 * rescale)
    d, c, n = 12, 3, 40
    model = LinearDictModel(d, 9, [7, 0, 3, 5, 8], c, gen=gen, nonlinear=nonlinear)
    h, y = data(n, d, c, gen=gen)
    tail = make_tail(d, c, gen=gen)
    ro = TailReadout(tail, batch_size=16)
    res = conditional_ablation(model, h, y, ro, rescale=rescale, rows_per_chunk=7)
    assert res.path == "generic" and res.protocol == "tail"
    assert_matches_naive(res, naive_conditional(model, h, y, tail, rescale=rescale))
    assert 0 < res.n_pairs < n * 5  # the shifted ReLU leaves some concepts inactive


def test_context_protocol_matches_per_pair_loop():
    gen = torch.Generator().manual_seed(5)
    d, c, n = 10, 4, 30
    model = LinearDictModel(d, 6, [1, 2, 4], c, gen=gen)
    h, y = data(n, d, c, gen=gen)
    ctx = make_ctx(d, n, c, gen=gen)
    res = conditional_ablation(model, h, y, ContextReadout(ctx, batch_size=8), rows_per_chunk=11)
    assert res.protocol == "context"
    assert_matches_naive(res, naive_conditional(model, h, y, ctx, rows_arg=True))


def test_sae_fast_path_equals_generic_and_naive():
    gen = torch.Generator().manual_seed(7)
    d, m, k, c, n = 16, 48, 6, 3, 60
    model = FakeSAE(d, m, k, list(range(20)), c, gen=gen)
    h, y = data(n, d, c, gen=gen)
    h[3] *= 50  # the per-sample input scale must cancel
    tail = make_tail(d, c, gen=gen)
    fast = conditional_ablation(model, h, y, TailReadout(tail), rows_per_chunk=13)
    slow = conditional_ablation(model, h, y, TailReadout(tail), rows_per_chunk=17, fast=False)
    assert (fast.path, slow.path) == ("sparse", "generic")
    assert fast.n_pairs == slow.n_pairs > 0
    for a, b in zip(fast.per_concept, slow.per_concept):
        assert a.n_active == b.n_active and a.flip_rate == b.flip_rate and a.delta_acc == b.delta_acc
        assert (a.tvd is None and b.tvd is None) or a.tvd == pytest.approx(b.tvd, abs=1e-10)
    assert_matches_naive(fast, naive_conditional(model, h, y, tail))
    # float32: same pairs, scores within float tolerance
    m32 = FakeSAE(d, m, k, list(range(20)), c, gen=torch.Generator().manual_seed(7), dtype=torch.float32)
    t32 = make_tail(d, c, gen=torch.Generator().manual_seed(8), dtype=torch.float32)
    f32 = conditional_ablation(m32, h.float(), y, TailReadout(t32))
    g32 = conditional_ablation(m32, h.float(), y, TailReadout(t32), fast=False)
    assert f32.n_pairs == g32.n_pairs
    assert f32.tvd_cond == pytest.approx(g32.tvd_cond, abs=1e-5)


def test_segment_ablation_matches_naive():
    gen = torch.Generator().manual_seed(11)
    d, c, n = 12, 3, 25
    model = LinearDictModel(d, 10, [0, 1, 2, 3, 4, 5, 6, 9], c, gen=gen)
    model.segmentation = [0, 0, 0, 0, 0, 1, 1, 0]  # class 2 empty: contributes 0 to every mean
    h, y = data(n, d, c, gen=gen)
    tail = make_tail(d, c, gen=gen)
    res = segment_ablation(model, h, y, TailReadout(tail), max_vectors_per_call=64)
    naive = naive_segment(model, h, y, tail, c)
    for e in res.entries:
        assert (e.delta_acc, e.flip_rate) == pytest.approx(naive[(e.cls, e.fraction)][:2], abs=1e-12)
        assert e.tvd == pytest.approx(naive[(e.cls, e.fraction)][2], abs=1e-9)
    for mean in res.means:
        want = sum(naive[(cl, mean.fraction)][0] for cl in range(c)) / c
        assert mean.delta_acc == pytest.approx(want, abs=1e-12)
    assert res.segments[2] == [] and len(res.segments[0]) == 6
    # the SAE fast path gives the same segment scores as re-decoding
    sae = FakeSAE(d, 30, 5, list(range(12)), c, gen=gen)
    a = segment_ablation(sae, h, y, TailReadout(tail))
    b = segment_ablation(sae, h, y, TailReadout(tail), fast=False)
    for ea, eb in zip(a.entries, b.entries):
        assert ea.flip_rate == eb.flip_rate and ea.tvd == pytest.approx(eb.tvd, abs=1e-10)


def test_batching_never_calls_empty_and_shares_encode():
    gen = torch.Generator().manual_seed(3)
    d, c, n = 8, 2, 50
    model = LinearDictModel(d, 5, [0, 1], c, gen=gen)
    model.W_e[:, 1] = 0  # concept 1 never fires: |S_1| = 0, excluded from the means, no readout on it
    h, y = data(n, d, c, gen=gen)
    sizes = []
    tail = make_tail(d, c, gen=gen)
    ro = TailReadout(lambda v: (sizes.append(v.shape[0]), tail(v))[1], batch_size=1000)
    code = encode_selected(model, h)
    res = conditional_ablation(model, h, y, ro, code=code, rows_per_chunk=1000)
    assert res.per_concept[1].n_active == 0 and res.per_concept[1].flip_rate is None
    assert res.n_evaluated == 1 and res.delta_f_cond == res.per_concept[0].flip_rate
    assert sizes == [n + res.n_pairs] and all(s > 0 for s in sizes)
    d_json = res.to_dict()
    assert d_json["per_concept"][0]["concept"] == 0 and isinstance(d_json["tvd_cond"], float)


# ------------------------------------------------------------------------- real tiny GPT-NeoX readouts


def tiny_neox():
    """Random 2-layer GPT-NeoX from the pythia-14m config (float64 so argmax ties cannot differ)."""
    from pathlib import Path

    transformers = pytest.importorskip("transformers")
    from concept_ext.text.data import shared_dir

    shared = shared_dir()
    cfg_dir = shared / "models" / "pythia-configs" / "pythia-14m"
    if not cfg_dir.exists():
        pytest.skip("../shared/models/pythia-configs/pythia-14m is not available")
    cfg = transformers.AutoConfig.from_pretrained(
        str(cfg_dir), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    return transformers.GPTNeoXForCausalLM(cfg).double().eval()


class Inject:
    """Forward pre-hook on ``layers[L]`` replacing the last position of its input by given vectors."""

    def __init__(self, model, layer):
        self.model, self.layer, self.u, self.seen = model, layer, None, None

    def __call__(self, module, args):
        self.seen = args[0][:, -1].clone()
        if self.u is None:
            return None
        x = args[0].clone()
        x[:, -1] = self.u.to(x.dtype)
        return (x,) + tuple(args[1:])

    def logits(self, ids, u, label_ids):
        self.u = u
        handle = self.model.gpt_neox.layers[self.layer].register_forward_pre_hook(self)
        try:
            with torch.no_grad():
                return self.model(input_ids=ids, use_cache=False).logits[:, -1, label_ids]
        finally:
            handle.remove()
            self.u = None


@pytest.fixture
def one_thread():
    # Hundreds of tiny per-pair forwards: thread hand-offs dominate on a shared 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_hf_tiny_neox_tail_and_context_match_per_pair_forwards(one_thread):
    from concept_ext.metrics.completeness import completeness

    model = tiny_neox()
    layer, label_ids = 1, torch.tensor([11, 500, 3000])
    gen = torch.Generator().manual_seed(2)
    n, t = 20, 5
    ids = torch.randint(2, 1000, (n, t), generator=gen)
    inj = Inject(model, layer)
    o = inj.logits(ids, None, label_ids)  # full-model label logits, and the clean h at the hook
    h = inj.seen
    y = torch.randint(0, 3, (n,), generator=gen)

    # tail: the model from block L on a length-1 sequence whose only residual vector is u
    def tail(u):
        return inj.logits(torch.zeros((u.shape[0], 1), dtype=torch.long), u, label_ids)

    def ctx(u, rows):  # in-context: the real prefix of sentence `row`, u at its last position
        return inj.logits(ids[rows], u, label_ids)

    concepts = LinearDictModel(32, 8, [0, 2, 3, 6], 3, gen=gen)
    concepts.W_e *= 1.5 / float(h.norm(dim=1).mean())  # a few active concepts per sentence
    for fn, ro, rows_arg in [(tail, TailReadout(tail, batch_size=16), False),
                             (ctx, ContextReadout(ctx, batch_size=16), True)]:
        res = conditional_ablation(concepts, h, y, ro, rows_per_chunk=9)
        assert res.n_pairs > 0
        assert_matches_naive(res, naive_conditional(concepts, h, y, fn, rows_arg=rows_arg))
    # context ceiling is exactly 1 (ctx_i(h_i) = o_i); the tail ceiling is whatever agreement it has
    comp_ctx = completeness(concepts, h, o, y, ContextReadout(ctx))
    assert comp_ctx.ceiling == 1.0 and comp_ctx.protocol == "context"
    comp_tail = completeness(concepts, h, o, y, TailReadout(tail))
    per_row = torch.stack([tail(h[i:i + 1])[0] for i in range(n)])
    want = float((per_row.argmax(1) == o.argmax(1)).double().mean())
    assert comp_tail.ceiling == want


def test_always_on_concepts_leave_the_selective_mean():
    """A concept active on every sentence is named in ``always_on`` and left out of (b), kept in (a)/(c)."""
    class TwoConcepts:
        selected, segmentation = [0, 1], [0, 1]

        def encode(self, h):  # concept 0 always on (h[:, 0] = 1 everywhere), concept 1 on half the rows
            return h.clone()

        def reconstruct(self, a):
            return a.clone()

    h = torch.tensor([[1.0, 2.0], [1.0, 0.0], [1.0, 3.0], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1, 0, 1, 0])
    res = conditional_ablation(TwoConcepts(), h, y, TailReadout(lambda v: v), rescale=False)
    c0, c1 = res.per_concept
    assert (c0.n_active, c1.n_active) == (4, 2) and res.always_on == [0]
    assert res.delta_f_cond_selective == pytest.approx(c1.flip_rate)
    assert res.delta_f_cond == pytest.approx((c0.flip_rate + c1.flip_rate) / 2)
    assert res.delta_f_cond_weighted == pytest.approx((4 * c0.flip_rate + 2 * c1.flip_rate) / 6)
