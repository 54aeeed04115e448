"""Side by side with the strongest peers, one process, identical inputs (issue 11; performance.md 3.4).

Groups (``--benchmark-group-by=group``; "x" ratios read within a group):

* ``peers-encode-<size>``: ``concept_ext.topk_encode`` (W_enc in TopKSAE's own layout, nn.Linear's [m, d]
  passed transposed) vs plain ``F.linear`` + ReLU + ``torch.topk``, eai-sparsify's ``fused_encoder`` and
  SAELens' ``TopKSAE.encode`` (dense [N, m] code); plus ours with bfloat16 weights (opt-in, fp32
  accumulation). Tie-aware check (performance.md 3.6) of every selection next to its timing.
* ``peers-decode-<size>``: ``sparse_decode`` forward + backward vs ``F.embedding_bag``, sparsify's
  ``decoder_impl`` (``F.embedding_bag`` on CPU) and SAELens' dense decode; outputs and the grads of
  values and W_dec checked against each other.
* ``peers-train-<size>``: one TopK-SAE training step, forward + backward, no optimiser, MSE only:
  ours = :func:`concept_ext.sae.losses.sae_losses` with ``normalize='none'``, ``mse_normalization='fvu'``,
  lambda_ar = lambda_cls = 0 (sparsify's FVU objective); sparsify ``SparseCoder`` (``transcode=True``: no
  pre-bias, like ours); SAELens ``TopKTrainingSAE.training_forward_pass`` (its loss is our FVU times
  sum||x - mean||^2 / B). Loss and every parameter gradient are compared with sparsify's.
* ``peers-jenks-N``: exact 2-class Jenks for 20 concepts: ours vs jenkspy 0.4.1 vs a plain numpy
  sort + prefix-sum rewrite; identical breaks asserted.
* ``peers-sentence_sim-N``: ours vs a blockwise bucketed-sums rewrite (row blocks of the N x N
  shared-count and cosine matrices, one scatter-add into count bins); equal curves asserted (and, at
  smoke size, equal to the N x N reference loop of bench_eval_interpret).
* ``peers-causality``: the conditional causality sweep (20 concepts, Pythia-410M-shaped tail) vs one
  batched call over the needed (sentence, concept) pairs; per-concept counts and scores compared.

Sizes from ``conftest.py``: smoke by default (CI: ``pytest benchmarks --benchmark-disable``; a missing
peer is then a skip with its reason); ``CONCEPT_EXT_BENCH_FULL=1`` runs CS (= S1: N 2000, d 2048, m 4096,
k 10) and S2 (N 4096, d 1024, m 16384, k 32), Jenks/SentenceSim at N 7,600 and 25,000, and then every
peer must be importable (a missing one fails the run). Peers: the ``peers`` extra of pyproject.toml.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import concept_ext
import peers
from concept_ext.ops import reference
from concept_ext.config.sae import SAEConfig, TrainConfig
from concept_ext.sae.losses import sae_losses
from concept_ext.metrics.interpret import sentence_sim
from concept_ext.metrics.jenks import jenks2_breaks
from concept_ext.sae.model import TopKSAE
from conftest import FULL, SIZES

ROUNDS = int(os.environ.get("CONCEPT_EXT_BENCH_ROUNDS", "5")) if FULL else 1


def _run(benchmark, fn, rounds=None):
    return benchmark.pedantic(fn, rounds=rounds or ROUNDS, iterations=1, warmup_rounds=1)


PAIRS = int(os.environ.get("CONCEPT_EXT_BENCH_PAIRS", "5" if FULL else "0"))


def _interleaved(benchmark, ours, others: dict) -> None:
    """Load-robust ratios (full mode): alternate ours and each alternative call by call, PAIRS times, and
    store median(other / ours) over the pairs plus min(other) / min(ours) in extra_info. On a shared
    machine the separate pytest-benchmark rows are taken minutes apart; these pairs are not."""
    import statistics
    import time

    for name, other in others.items():
        a, b = [], []
        for _ in range(PAIRS):
            for fn, acc in ((ours, a), (other, b)):
                t = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t)
        if a:
            benchmark.extra_info[f"interleaved_{name}_over_ours_median"] = statistics.median(
                y / x for x, y in zip(a, b))
            benchmark.extra_info[f"interleaved_{name}_over_ours_min"] = min(b) / min(a)


def _inputs(size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size.n, size.d, generator=g) * 2 + 0.3


def _check_selection(values, indices, x, w_enc, b_enc, k, *, atol):
    """Tie-aware top-k check (performance.md 3.6) against an fp64 recomputation."""
    pre = torch.addmm(b_enc.double(), x.double(), w_enc.double())  # [N, m]
    ref = pre.topk(k, dim=1).values.clamp_min(0)
    v = values.double()
    torch.testing.assert_close(v.sort(1, descending=True).values, ref, atol=atol, rtol=atol)
    torch.testing.assert_close(v, pre.gather(1, indices.long()).clamp_min(0), atol=atol, rtol=atol)


# ------------------------------------------------------------------------------------------ encode

ENCODE_IMPLS = ["ours", "ours_bf16", "plain", "sparsify", "sae_lens"]


@pytest.mark.parametrize("impl", ENCODE_IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: s.name)
def test_encode(benchmark, size, impl):
    benchmark.group = f"peers-encode-{size.name}"
    w = peers.make_weights(size.d, size.m)
    x = _inputs(size)
    w_lin = w.W_enc.t().contiguous()  # [m, d]: nn.Linear's layout (TopKSAE keeps W_enc this way)
    w_enc = w_lin.t()  # [d, m] view
    atol = 1e-4
    if impl == "ours":
        ours = lambda: concept_ext.topk_encode(x, w_enc, w.b_enc, size.k)  # noqa: E731
        values, indices = _run(benchmark, ours)
        others = {"plain": lambda: torch.topk(F.relu(F.linear(x, w_lin, w.b_enc)), size.k, dim=1, sorted=False),
                  "bf16": lambda: concept_ext.topk_encode(x, w16_, w.b_enc, size.k, weight_dtype=torch.bfloat16)}
        w16_ = w_lin.to(torch.bfloat16).t()
        if not peers.missing_reason("sparsify"):
            coder = peers.sparsify_coder(w, size.k)
            others["sparsify"] = lambda: peers.sparsify_encode(coder, x)
        _interleaved(benchmark, ours, others)
    elif impl == "ours_bf16":
        w16 = w_lin.to(torch.bfloat16).t()
        values, indices = _run(
            benchmark, lambda: concept_ext.topk_encode(x, w16, w.b_enc, size.k, weight_dtype=torch.bfloat16)
        )
        # The selection is exact for the bf16-rounded weights (fp32 accumulation)...
        _check_selection(values, indices, x, w16.float(), w.b_enc, size.k, atol=1e-4)
        # ...and its error against the fp32 weights is the rounding of W_enc to bf16 (stated here).
        ref_v, ref_i = concept_ext.topk_encode(x, w_enc, w.b_enc, size.k)
        rel = float((values.sum(1) - ref_v.sum(1)).abs().max() / ref_v.sum(1).abs().max())
        overlap = float((indices.sort(1).values[:, :, None] == ref_i[:, None, :]).any(2).float().mean())
        benchmark.extra_info.update({"rel_err_of_row_sums_vs_fp32": rel, "topk_overlap_vs_fp32": overlap})
        assert rel < 2e-2 and overlap > 0.8
        return
    elif impl == "plain":
        def plain():
            top = torch.topk(F.relu(F.linear(x, w_lin, w.b_enc)), size.k, dim=1, sorted=False)
            return top.values, top.indices

        values, indices = _run(benchmark, plain)
    elif impl == "sparsify":
        peers.require("sparsify")
        coder = peers.sparsify_coder(w, size.k)
        values, indices = _run(benchmark, lambda: peers.sparsify_encode(coder, x))
    else:
        peers.require("sae_lens")
        sae = peers.saelens_sae(w, size.k)
        dense = _run(benchmark, lambda: peers.saelens_encode(sae, x))  # [N, m]
        values, indices = dense.topk(size.k, dim=1)
    _check_selection(values, indices, x, w.W_enc, w.b_enc, size.k, atol=atol)


# ------------------------------------------------------------------------------------------ decode

DECODE_IMPLS = ["ours", "embedding_bag", "sparsify", "sae_lens_dense"]


@pytest.mark.parametrize("impl", DECODE_IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: s.name)
def test_decode_fwd_bwd(benchmark, size, impl):
    benchmark.group = f"peers-decode-{size.name}"
    w = peers.make_weights(size.d, size.m)
    g = torch.Generator().manual_seed(2)
    values0 = torch.rand(size.n, size.k, generator=g) + 0.1
    indices = torch.stack([torch.randperm(size.m, generator=g)[: size.k] for _ in range(size.n)])
    grad_out = torch.randn(size.n, size.d, generator=g)
    values = values0.clone().requires_grad_(True)
    W_dec = w.W_dec.clone().requires_grad_(True)
    b_dec = w.b_dec.clone().requires_grad_(True)
    if impl == "sparsify":
        peers.require("sparsify")
        decode = peers.sparsify_decode()
    if impl == "sae_lens_dense":
        peers.require("sae_lens")

    def step():
        values.grad = W_dec.grad = b_dec.grad = None
        if impl == "ours":
            out = concept_ext.sparse_decode(values, indices, W_dec, b_dec)
        elif impl == "embedding_bag":
            out = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec
        elif impl == "sparsify":
            out = decode(indices, values, W_dec.mT) + b_dec
        else:  # SAELens' decode: scatter into a dense [N, m] code, then a dense GEMM
            dense = torch.zeros(size.n, size.m).scatter(1, indices, values)
            out = dense @ W_dec + b_dec
        out.backward(grad_out)
        return out.detach()

    out = _run(benchmark, step)
    if impl == "ours" and PAIRS:
        def bag():
            values.grad = W_dec.grad = b_dec.grad = None
            (F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec).backward(grad_out)

        _interleaved(benchmark, step, {"embedding_bag": bag})
    want = reference.sparse_decode(values0, indices, w.W_dec, w.b_dec)
    gv, gw = reference.sparse_decode_backward(grad_out, values0, indices, w.W_dec)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values.grad, gv, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(W_dec.grad, gw, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b_dec.grad, grad_out.sum(0), atol=1e-3, rtol=1e-4)


# ------------------------------------------------------------------------------------------ training step

TRAIN_IMPLS = ["ours", "sparsify", "sae_lens"]
MSE_ONLY = TrainConfig(lambda_mse=1.0, lambda_ar=0.0, lambda_cls=0.0, mse_normalization="fvu",
                       dead_latents="none", device="cpu")


def _our_sae(w, size):
    sae = TopKSAE(SAEConfig(d=size.d, m=size.m, k=size.k, architecture="topk", normalize="none",
                            n_concepts=0))
    with torch.no_grad():  # copy_ keeps TopKSAE's parameter layouts (W_enc stored as [m, d])
        for p, t in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), w):
            p.copy_(t)
    return sae


def _our_step(sae, x):
    out = sae_losses(sae, x, None, MSE_ONLY)
    out.terms.total.backward()
    return out.terms.total.detach()


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: s.name)
def test_train_step(benchmark, size, impl):
    benchmark.group = f"peers-train-{size.name}"
    peers.require("sparsify")  # the reference for the loss and gradients of every implementation
    w = peers.make_weights(size.d, size.m)
    x = _inputs(size)
    coder = peers.sparsify_coder(w, size.k)
    if impl == "ours":
        module = _our_sae(w, size)
        step = _our_step
    elif impl == "sparsify":
        module, step = coder, peers.sparsify_step
    else:
        peers.require("sae_lens")
        module, step = peers.saelens_sae(w, size.k), peers.saelens_step

    def run():
        module.zero_grad(set_to_none=True)
        return step(module, x)

    rounds = ROUNDS if not (FULL and impl == "sae_lens" and size.m > 4096) else min(ROUNDS, 3)
    loss = _run(benchmark, run, rounds)
    # The timed step's gradients (left by its last round; set_to_none gives later calls fresh tensors).
    if impl == "ours":
        got_g = {"W_enc": module.W_enc.grad, "b_enc": module.b_enc.grad, "W_dec": module.W_dec.grad,
                 "b_dec": module.b_dec.grad}
        scale = 1.0
    elif impl == "sparsify":
        got_g, scale = peers.sparsify_grads(coder), 1.0
    else:
        got_g = peers.saelens_grads(module)
        scale = float(((x - x.mean(0)) ** 2).sum() / x.shape[0])  # SAELens' loss = FVU * this
    if impl == "ours" and PAIRS:
        def sp():
            coder.zero_grad(set_to_none=True)
            peers.sparsify_step(coder, x)

        _interleaved(benchmark, run, {"sparsify": sp})
    if impl == "sparsify":  # sparsify is the others' reference; its own is ours, on a fresh copy
        ref_sae = _our_sae(w, size)
        want = _our_step(ref_sae, x)
        want_g = {"W_enc": ref_sae.W_enc.grad, "b_enc": ref_sae.b_enc.grad, "W_dec": ref_sae.W_dec.grad,
                  "b_dec": ref_sae.b_dec.grad}
    else:
        ref_coder = peers.sparsify_coder(w, size.k)
        want = peers.sparsify_step(ref_coder, x)
        want_g = peers.sparsify_grads(ref_coder)
    torch.testing.assert_close(loss / scale, want, rtol=1e-4, atol=1e-6)
    for name, gw in want_g.items():
        torch.testing.assert_close(got_g[name] / scale, gw, rtol=1e-3, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    benchmark.extra_info["loss"] = float(want)


# ------------------------------------------------------------------------------------------ Jenks

N_CONCEPTS = 20
JENKS_N = [7600, 25000] if FULL else [300]


def sae_like_acts(n: int, f: int, seed: int = 0) -> np.ndarray:  # [n, f], 90% exact zeros
    rng = np.random.default_rng(seed)
    return np.where(rng.random((n, f)) < 0.9, 0.0, rng.gamma(2.0, size=(n, f))).astype(np.float32)


def jenks_rewrite(acts: np.ndarray) -> np.ndarray:
    """Plain numpy 2-class Jenks: sort, prefix sums, SSE of every split, first minimum. [F, N] -> [F]."""
    xs = np.sort(acts.astype(np.float64), axis=1)
    n = xs.shape[1]
    c1, c2 = np.cumsum(xs, axis=1), np.cumsum(xs * xs, axis=1)
    s = np.arange(1, n)
    lo = c2[:, :-1] - c1[:, :-1] ** 2 / s
    hi = (c2[:, -1:] - c2[:, :-1]) - (c1[:, -1:] - c1[:, :-1]) ** 2 / (n - s)
    return xs[np.arange(xs.shape[0]), np.argmin(lo + hi, axis=1)]


@pytest.mark.parametrize("impl", ["ours", "rewrite", "jenkspy"])
@pytest.mark.parametrize("n", JENKS_N)
def test_jenks(benchmark, n, impl):
    benchmark.group = f"peers-jenks-F{N_CONCEPTS}-N{n}"
    acts = sae_like_acts(n, N_CONCEPTS).T.copy()  # [F, N]
    if impl == "ours":
        out = _run(benchmark, lambda: jenks2_breaks(acts).breaks.numpy(), rounds=max(ROUNDS, 5))
    elif impl == "rewrite":
        out = _run(benchmark, lambda: jenks_rewrite(acts), rounds=max(ROUNDS, 5))
    else:
        peers.require("jenkspy")
        import jenkspy

        out = benchmark.pedantic(
            lambda: np.array([jenkspy.jenks_breaks(r, n_classes=2)[1] for r in acts]), rounds=1, iterations=1
        )
    np.testing.assert_array_equal(out, jenks2_breaks(acts).breaks.numpy())
    np.testing.assert_array_equal(out, jenks_rewrite(acts))


# ------------------------------------------------------------------------------------------ SentenceSim

SSIM_N = [7600, 25000] if FULL else [150]
EMB = 384 if FULL else 32


def sentence_sim_rewrite(acts: torch.Tensor, emb: torch.Tensor, *, top: int = 5, block: int = 1024):
    """Blockwise bucketed sums: per row block, shared counts and cosines against all N rows, one
    scatter-add into count bins 0..top; the self pair removed; per-row means averaged per k."""
    n, f = acts.shape
    vals, idx = torch.topk(acts, k=min(top, f), dim=1)
    mask = torch.zeros_like(acts).scatter_(1, idx, (vals != 0).to(acts.dtype))  # [N, F]
    e = F.normalize(emb.double(), dim=1).float()
    bins = min(top, f) + 1
    total = torch.zeros(bins, dtype=torch.float64)
    rows_with = torch.zeros(bins, dtype=torch.int64)
    for s in range(0, n, block):
        mb, eb = mask[s:s + block], e[s:s + block]
        shared = torch.round(mb @ mask.T).long()  # [b, N]
        cos = (eb @ e.T).double()  # [b, N]
        r = torch.arange(shared.shape[0])
        shared[r, r + s] = bins  # the self pair goes to a spare bin
        sums = torch.zeros(shared.shape[0], bins + 1, dtype=torch.float64).scatter_add_(1, shared, cos)
        cnt = torch.zeros(shared.shape[0], bins + 1, dtype=torch.float64).scatter_add_(
            1, shared, torch.ones_like(cos))
        has = cnt[:, :bins] > 0
        total += torch.where(has, sums[:, :bins] / cnt[:, :bins].clamp_min(1), 0.0).sum(0)
        rows_with += has.sum(0)
    return [float(total[k] / rows_with[k]) if rows_with[k] else 0.0 for k in (1, 2, 3, 4)]


@pytest.mark.parametrize("impl", ["ours", "rewrite"])
@pytest.mark.parametrize("n", SSIM_N)
def test_sentence_sim(benchmark, n, impl):
    benchmark.group = f"peers-sentence_sim-F{N_CONCEPTS}-e{EMB}-N{n}"
    g = torch.Generator().manual_seed(3)
    acts = torch.from_numpy(sae_like_acts(n, N_CONCEPTS, seed=2)).mul_(torch.rand(n, N_CONCEPTS, generator=g) + 0.5)
    acts[acts.sum(dim=1) == 0, 0] = 1.0
    emb = F.normalize(torch.randn(8, EMB, generator=g)[torch.randint(0, 8, (n,), generator=g)]
                      + torch.randn(n, EMB, generator=g), dim=1)
    rounds = 1 if FULL and n > 10000 else max(ROUNDS, 3)
    if impl == "ours":
        out = _run(benchmark, lambda: sentence_sim(acts, emb).sentence_sim, rounds)
    else:
        out = _run(benchmark, lambda: sentence_sim_rewrite(acts, emb), rounds)
    np.testing.assert_allclose(out, sentence_sim_rewrite(acts, emb), atol=1e-5)
    if not FULL:
        from bench_eval_interpret import sentence_sim_reference

        np.testing.assert_allclose(out, sentence_sim_reference(acts, emb), atol=1e-5)


# ------------------------------------------------------------------------------------------ causality


def causality_rewrite(sae, h, y, tail, *, thr: float):
    """One batched tail call over the bottleneck rows and every active (sentence, concept) pair.
    Returns per concept (count, flips, tvd sum, delta-acc sum)."""
    import bench_eval_causality as bec

    sel = torch.tensor(sae.selected)
    v, i = sae.sparse_code(h)
    z = torch.zeros(h.shape[0], bec.M).scatter_(1, i, v)[:, sel]  # [N, F] selected part of the code
    active = z.abs() > thr
    w_sel = sae.W_dec[sel]  # [F, d]
    base = z @ w_sel + sae.b_dec  # [N, d] bottleneck reconstruction
    rows, f = active.nonzero(as_tuple=True)
    abl = base[rows] - z[rows, f, None] * w_sel[f]
    xs = torch.cat([base, abl])
    target = h.norm(dim=1)[torch.cat([torch.arange(h.shape[0]), rows])]
    xs = xs * (target / (xs.norm(dim=1) + 1e-9))[:, None]
    q = torch.softmax(tail(xs).double(), dim=1)
    qb, qa = q[: h.shape[0]][rows], q[h.shape[0]:]
    n_f = sel.numel()
    cnt = torch.bincount(f, minlength=n_f).double()
    flips = torch.zeros(n_f, dtype=torch.float64).index_add_(0, f, (qa.argmax(1) != qb.argmax(1)).double())
    tvd = torch.zeros(n_f, dtype=torch.float64).index_add_(0, f, 0.5 * (qa - qb).abs().sum(1))
    yr = y[rows]
    dacc = torch.zeros(n_f, dtype=torch.float64).index_add_(
        0, f, (qa.argmax(1) == yr).double() - (qb.argmax(1) == yr).double())
    return cnt, flips, tvd, dacc


@pytest.mark.parametrize("impl", ["ours", "rewrite"])
def test_causality_sweep(benchmark, impl):
    import bench_eval_causality as bec
    from concept_ext.metrics.causality import ACTIVE_THRESHOLD, conditional_ablation
    from concept_ext.metrics.readout import TailReadout

    benchmark.group = f"peers-causality-N{bec.N}"
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(bec.N, bec.D, generator=gen) * 4 + torch.randn(bec.D, generator=gen)
    y = torch.randint(0, bec.C, (bec.N,), generator=gen)
    sae, tail = bec.BenchSAE(h, gen), bec.pythia_tail(gen)
    ours = lambda: conditional_ablation(sae, h, y, TailReadout(tail, progress=False))  # noqa: E731
    rounds = 1 if FULL else 2
    # The timed result against the other implementation and, at smoke size, the reference protocol
    # (|F| + 1 full sweeps, bench_eval_causality; too slow at full size, which that benchmark times apart).
    rewrite = lambda: causality_rewrite(sae, h, y, tail, thr=ACTIVE_THRESHOLD)  # noqa: E731
    if impl == "ours":
        res = _run(benchmark, ours, rounds)
        per_concept = [tuple(map(float, t)) for t in zip(*rewrite())]
    else:
        per_concept = [tuple(map(float, t)) for t in zip(*_run(benchmark, rewrite, rounds))]
        res = ours()
    refs = [per_concept] if FULL else [per_concept, bec.reference_protocol(sae, h, y, tail)]
    for ref in refs:
        assert len(ref) == len(res.per_concept) and sum(c for c, *_ in ref) > 0
        for j, (got, (c, flips, tvd, dacc)) in enumerate(zip(res.per_concept, ref)):
            assert got.n_active == int(c), j
            if c:  # a flip may differ on a float near-tie between batch shapes
                assert abs(got.flip_rate * c - flips) <= 1, j
                assert abs(got.tvd * c - tvd) <= 1e-3 * c, j
    benchmark.extra_info["pairs"] = res.n_pairs


def test_peer_versions_recorded(benchmark):
    """Record the versions of everything in the comparison (in the JSON's extra_info), checked against the
    installed distributions: a peer that imports has its version recorded, a missing one is recorded None."""
    import importlib.metadata as md

    benchmark.group = "peers-versions"
    versions = benchmark.pedantic(peers.peer_versions, rounds=1, iterations=1)
    benchmark.extra_info.update(versions)
    assert versions["torch"] == torch.__version__
    for name, (_, dist, _) in peers.PEERS.items():
        try:
            installed = md.version(dist)
        except md.PackageNotFoundError:
            installed = None
        assert versions[dist] == installed, dist
        if not peers.missing_reason(name):  # importable, hence installed: its version is in the record
            assert installed is not None and versions[dist] == installed, name
    if FULL:
        missing = [name for name in peers.PEERS if peers.missing_reason(name)]
        assert not missing, f"full run without peers {missing}"
