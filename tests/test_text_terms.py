"""Concept terms that tell concepts apart (issue 22, item 5): with planted topic words, a word frequent in
every concept's sentences ranks below the words specific to a concept, and the concepts' top-10 terms
overlap less than under the reference's plain TF-IDF ranking."""
from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from concept_ext.metrics.text import clean_texts, term_overlap, tfidf_top_terms

SHARED_WORDS = ["car", "google", "driving"]  # in every concept's sentences, often
SPECIFIC = {0: ["battery", "charging", "lithium"], 1: ["insurance", "premium", "policy"],
            2: ["crash", "pedestrian", "collision"]}
FILLER = ("market report week city people team season price company time plan group office house "
          "water school story music field model night board family").split()


def _planted(seed: int, n_per_concept: int = 60, n_other: int = 120):
    """Sentences of three concepts (shared words + their specific words + filler) and of no concept."""
    rng = random.Random(seed)
    texts, owner = [], []
    for c in range(3):
        for _ in range(n_per_concept):
            words = rng.sample(SHARED_WORDS, 3) + rng.sample(SHARED_WORDS, 2)
            words += rng.sample(SPECIFIC[c], 1) + rng.sample(FILLER, 4)
            rng.shuffle(words)
            texts.append(" ".join(words))
            owner.append(c)
    for _ in range(n_other):
        words = rng.sample(FILLER, 6) + ([rng.choice(SHARED_WORDS)] if rng.random() < 0.3 else [])
        texts.append(" ".join(words))
        owner.append(-1)
    acts = torch.zeros(len(texts), 3)
    for i, c in enumerate(owner):
        if c >= 0:
            acts[i, c] = 1.0 + rng.random()
    return texts, acts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_word_ranks_below_specific_words_and_overlap_falls(seed):
    texts, acts = _planted(seed)
    mask = acts > 0
    cleaned, _ = clean_texts(texts, phrases=False)
    new = tfidf_top_terms(acts, mask, texts, top_k=20, cleaned=cleaned)
    old = tfidf_top_terms(acts, mask, texts, top_k=20, cleaned=cleaned, ranking="tfidf")
    assert new.ranking == "contrast" and old.ranking == "tfidf"
    for c in range(3):
        terms = new.terms[c]
        rank = {t: i for i, t in enumerate(terms)}
        for w in SPECIFIC[c]:
            assert w in rank, f"seed {seed}: concept {c} lacks its word {w!r}: {terms}"
            for shared in SHARED_WORDS:
                assert rank.get(shared, len(terms)) > rank[w], f"seed {seed}: {shared!r} above {w!r}: {terms}"
        assert not set(terms) & {w for k, ws in SPECIFIC.items() if k != c for w in ws}, f"seed {seed}: {terms}"
        # The reference's ranking keeps the shared words among the first: the concepts look alike.
        assert set(SHARED_WORDS) <= set(old.terms[c][:6]), f"seed {seed}: {old.terms[c]}"
    o_new, o_old = term_overlap(new.terms).jaccard, term_overlap(old.terms).jaccard
    assert o_new < 0.5 * o_old, f"seed {seed}: overlap {o_new} vs plain TF-IDF {o_old}"


def test_term_overlap_by_hand():
    res = term_overlap([["a", "b", "c"], ["b", "c", "d"], []])
    # pairs: (0,1) 2/4, (0,2) 0/3, (1,2) 0/3; no pair has two empty lists
    assert res.n_pairs == 3 and res.jaccard == pytest.approx((0.5 + 0 + 0) / 3)
    assert term_overlap([["a"]]).jaccard is None and term_overlap([[], []]).n_pairs == 0
    assert term_overlap([list("abcdefghijkl"), list("abcdefghijxy")], top=10).jaccard == 1.0  # top 10 only


def test_one_concept_is_contrasted_with_the_corpus():
    texts, acts = _planted(0)
    one = acts[:, :1]
    terms = tfidf_top_terms(one, one > 0, texts, top_k=10, phrases=False).terms[0]
    assert set(terms[:6]) == set(SPECIFIC[0] + SHARED_WORDS), terms  # its own words first, no filler


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim not installed (optional)")
def test_phrases_are_mined_with_gensim():
    rng = random.Random(0)
    texts = [" ".join(["new york"] + rng.sample(FILLER, 5)) for _ in range(10)]
    texts += [" ".join(rng.sample(FILLER, 6)) for _ in range(190)]
    cleaned, how = clean_texts(texts)
    assert how["phrases"] == "gensim" and "new_york" in cleaned[0], cleaned[0]
