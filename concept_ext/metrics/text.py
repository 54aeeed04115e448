"""Top terms per concept (method.md 6.7, the word-cloud input), and how much the concepts' terms overlap.

Documents: one per concept from its <= 100 top-activating sentences inside A_j.

Two rankings (``ranking=``):

* ``"contrast"`` (default, the package's decision, issue 22): the terms that set a concept apart. Each
  term's weighted log-odds z-score (Monroe, Colaresi & Quinn 2008, "Fightin' Words") of its frequency in
  the concept's document against the other concepts' documents, with an informative Dirichlet prior from
  the whole test corpus (scaled to the size of an average concept document). A word frequent in every
  concept's sentences has log-odds near 0 and ranks below one specific to the concept; only terms more
  frequent in the concept than elsewhere (z > 0) are kept. With one concept the contrast is with the
  corpus alone.
* ``"tfidf"`` (the reference): one document per concept plus one whole-corpus document (it stabilises the
  IDF and is dropped afterwards); ``TfidfVectorizer(sublinear_tf=True, min_df=2)``. With few concepts the
  IDF barely discounts a word shared by all of them, so related concepts list the same terms.

Either keeps the top 20 terms per concept. :func:`term_overlap` is the mean pairwise Jaccard of the
concepts' top-10 term sets (lower: concepts easier to tell apart).

Cleaning follows the reference: lower-cased regex words ``[a-zA-Z]+``, bigram then trigram phrases
(gensim ``Phrases``, min_count 5, thresholds 15 and 10; phrases of more than three words split back),
English stop-words removed, length >= 3, WordNet lemmas. gensim and NLTK are optional at run time (the
Makefile installs gensim): without gensim no phrases are mined; without NLTK (or its corpora)
scikit-learn's English stop-word list is used and words are not lemmatised. The result records which path
ran.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from torch import Tensor

from concept_ext.metrics.interpret import _Result, top_activating

__all__ = ["TfidfTerms", "TermOverlap", "clean_texts", "tfidf_top_terms", "term_overlap"]

logger = logging.getLogger("concept_ext")

_WORD = re.compile(r"\b[a-zA-Z]+\b")
_MIN_LEN = 3  # the reference drops words shorter than 3 letters


def _stopwords_and_lemmatizer() -> tuple[frozenset, Callable[[str], str], str, str]:
    try:
        from nltk.corpus import stopwords
        from nltk.stem import WordNetLemmatizer

        stops = frozenset(stopwords.words("english"))
        lem = WordNetLemmatizer()
        lem.lemmatize("tests")  # raises LookupError when the WordNet corpus is missing
        return stops, lem.lemmatize, "nltk", "wordnet"
    except (ImportError, LookupError):
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        return frozenset(ENGLISH_STOP_WORDS), (lambda w: w), "sklearn", "none"


def clean_texts(texts: Sequence[str], *, phrases: bool = True) -> tuple[list[list[str]], dict[str, str]]:
    """Tokenise and clean every text; returns the token lists and a description of the path used."""
    tokens = [_WORD.findall(t.lower()) for t in texts]
    phrase_path = "none"
    if phrases:
        try:
            from gensim.models.phrases import Phraser, Phrases

            bigram = Phraser(Phrases(tokens, min_count=5, threshold=15.0, delimiter="_"))
            trigram = Phraser(Phrases(bigram[tokens], threshold=10.0, delimiter="_"))
            merged = []
            for toks in tokens:
                out: list[str] = []
                for t in trigram[bigram[toks]]:
                    out.extend(t.split("_") if t.count("_") > 2 else [t])
                merged.append(out)
            tokens, phrase_path = merged, "gensim"
        except ImportError:
            logger.info("gensim not installed: TF-IDF terms are single words (no phrase mining)")
    stops, lemmatize, stop_path, lemma_path = _stopwords_and_lemmatizer()
    cleaned = [[lemmatize(t) for t in toks if t not in stops and len(t) >= _MIN_LEN] for toks in tokens]
    return cleaned, {"phrases": phrase_path, "stopwords": stop_path, "lemmatizer": lemma_path}


@dataclass
class TfidfTerms(_Result):
    """Top terms of each concept (method.md 6.7)."""

    terms: list[list[str]]
    """Per concept, up to ``top_k`` terms with a positive score, best first (ties: alphabetical)."""
    scores: list[list[float]]
    """The matching scores (log-odds z-scores for ``contrast``, TF-IDF weights for ``tfidf``)."""
    n_documents_sentences: list[int]
    """Sentences in each concept's document (<= ``max_sentences``, inside A_j)."""
    preprocessing: dict[str, str] = field(default_factory=dict)
    """Which cleaning path ran: phrases (gensim|none), stopwords (nltk|sklearn), lemmatizer (wordnet|none)."""
    ranking: str = "tfidf"
    """How the terms were ranked: ``contrast`` (log-odds against the other concepts) or ``tfidf``."""


def tfidf_top_terms(
    acts: Tensor,  # [N, F]
    mask: Tensor,  # [N, F] bool activating sets
    texts: Sequence[str],
    *,
    top_k: int = 20,
    max_sentences: int = 100,
    min_df: int = 2,
    phrases: bool = True,
    cleaned: Optional[list[list[str]]] = None,
    ranking: str = "contrast",
) -> TfidfTerms:
    """Top terms per concept from its top-activating sentences inside A_j (``ranking``: see the module
    docstring). ``min_df``: a term must occur in at least that many documents of the TF-IDF fit (for
    ``contrast``: in that many test sentences)."""
    if ranking not in ("contrast", "tfidf"):
        raise ValueError(f"ranking must be 'contrast' or 'tfidf', got {ranking!r}")
    if len(texts) != acts.shape[0]:
        raise ValueError(f"texts has {len(texts)} entries, expected {acts.shape[0]} (one per row of acts)")
    info: dict[str, str] = {}
    if cleaned is None:
        cleaned, info = clean_texts(texts, phrases=phrases)
    top = top_activating(acts, mask, k=max_sentences)
    docs = [" ".join(" ".join(cleaned[i]) for i in idx) for idx in top.indices]
    docs.append(" ".join(" ".join(toks) for toks in cleaned))  # whole-corpus document
    f = acts.shape[1]
    n_sent = [len(i) for i in top.indices]
    if ranking == "contrast":
        terms, scores = _contrast_terms(docs, cleaned, top_k=top_k, min_df=min_df)
        return TfidfTerms(terms, scores, n_sent, info, "contrast")
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(
        tokenizer=str.split, preprocessor=None, lowercase=False, token_pattern=None,
        sublinear_tf=True, min_df=min_df,
    )
    try:
        x = vec.fit_transform(docs)[:-1].toarray()  # [F, V]; the corpus row dropped
    except ValueError:  # empty vocabulary after min_df
        logger.warning("tfidf_top_terms: empty vocabulary (min_df=%d)", min_df)
        return TfidfTerms([[] for _ in range(f)], [[] for _ in range(f)], n_sent, info, "tfidf")
    vocab = vec.get_feature_names_out()
    terms, scores = [], []
    for row in x:
        pos = np.nonzero(row > 0)[0]
        order = sorted(pos, key=lambda j: (-row[j], vocab[j]))[:top_k]
        terms.append([str(vocab[j]) for j in order])
        scores.append([float(row[j]) for j in order])
    return TfidfTerms(terms, scores, n_sent, info, "tfidf")


def _contrast_terms(docs: list[str], cleaned: list[list[str]], *, top_k: int,
                    min_df: int) -> tuple[list[list[str]], list[list[float]]]:
    """Per concept document (``docs[:-1]``; ``docs[-1]`` is the corpus), the terms with the largest
    positive weighted log-odds z-score against the other concepts' documents, corpus prior."""
    from sklearn.feature_extraction.text import CountVectorizer

    f = len(docs) - 1
    vec = CountVectorizer(tokenizer=str.split, preprocessor=None, lowercase=False, token_pattern=None,
                          min_df=min_df)
    try:  # the vocabulary: terms in >= min_df test sentences
        vec.fit([" ".join(toks) for toks in cleaned])
    except ValueError:  # empty vocabulary after min_df
        logger.warning("tfidf_top_terms: empty vocabulary (min_df=%d)", min_df)
        return [[] for _ in range(f)], [[] for _ in range(f)]
    counts = vec.transform(docs).toarray().astype(np.float64)  # [F + 1, V]
    vocab = vec.get_feature_names_out()
    y, corpus = counts[:-1], counts[-1]  # [F, V], [V]
    n = y.sum(axis=1)  # [F] tokens per concept document
    # Informative Dirichlet prior: the corpus frequencies, worth about one average concept document.
    a0 = max(float(n.mean()) if f else 0.0, 1.0)
    alpha = a0 * corpus / max(corpus.sum(), 1.0)  # [V]
    alpha = np.maximum(alpha, 1e-3)
    a0 = alpha.sum()
    total = y.sum(axis=0)  # [V] counts over all concept documents
    terms, scores = [], []
    for j in range(f):
        yj, yr = y[j], total - y[j]  # this concept, the others (the corpus alone when F = 1)
        nj, nr = yj.sum(), yr.sum()
        if nr == 0:  # one concept: contrast with the corpus
            yr, nr = corpus, corpus.sum()
        delta = (np.log((yj + alpha) / (nj + a0 - yj - alpha))
                 - np.log((yr + alpha) / (nr + a0 - yr - alpha)))  # [V]
        z = delta / np.sqrt(1.0 / (yj + alpha) + 1.0 / (yr + alpha))
        pos = np.nonzero((yj > 0) & (z > 0))[0]
        order = sorted(pos, key=lambda t: (-z[t], vocab[t]))[:top_k]
        terms.append([str(vocab[t]) for t in order])
        scores.append([float(z[t]) for t in order])
    return terms, scores


@dataclass
class TermOverlap(_Result):
    """How much the concepts' top terms overlap (issue 22): lower means concepts easier to tell apart."""

    jaccard: Optional[float]
    """Mean over concept pairs of |T_j & T_k| / |T_j | T_k|, T_j the concept's top ``top`` terms; pairs
    with two empty term lists are left out; None when no pair is left (fewer than two concepts)."""
    top: int
    """Terms per concept compared (10)."""
    n_pairs: int
    """Concept pairs averaged."""


def term_overlap(terms: Sequence[Sequence[str]], *, top: int = 10) -> TermOverlap:
    """Mean pairwise Jaccard of the concepts' top-``top`` term sets."""
    sets = [set(list(t)[:top]) for t in terms]
    vals = []
    for j in range(len(sets)):
        for k in range(j + 1, len(sets)):
            union = sets[j] | sets[k]
            if union:
                vals.append(len(sets[j] & sets[k]) / len(union))
    return TermOverlap(float(np.mean(vals)) if vals else None, top, len(vals))
