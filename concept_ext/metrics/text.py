"""TF-IDF top terms per concept (method.md 6.7, the word-cloud input), with scikit-learn.

One document per concept from its <= 100 top-activating sentences inside A_j, plus one whole-corpus
document (it stabilises the IDF and is dropped afterwards); ``TfidfVectorizer(sublinear_tf=True,
min_df=2)``; the top 20 terms per concept.

Cleaning follows the reference: lower-cased regex words ``[a-zA-Z]+``, bigram then trigram phrases
(gensim ``Phrases``, min_count 5, thresholds 15 and 10; phrases of more than three words split back),
English stop-words removed, length >= 3, WordNet lemmas. gensim and NLTK are optional: without gensim no
phrases are mined; without NLTK (or its corpora) scikit-learn's English stop-word list is used and words
are not lemmatised. The result records which path ran.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from torch import Tensor

from concept_ext.metrics.interpret import _Result, top_activating

__all__ = ["TfidfTerms", "clean_texts", "tfidf_top_terms"]

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
    """Top TF-IDF terms of each concept (method.md 6.7)."""

    terms: list[list[str]]
    """Per concept, up to ``top_k`` terms with a positive score, best first (ties: alphabetical)."""
    scores: list[list[float]]
    """The matching TF-IDF scores."""
    n_documents_sentences: list[int]
    """Sentences in each concept's document (<= ``max_sentences``, inside A_j)."""
    preprocessing: dict[str, str] = field(default_factory=dict)
    """Which cleaning path ran: phrases (gensim|none), stopwords (nltk|sklearn), lemmatizer (wordnet|none)."""


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
) -> TfidfTerms:
    """TF-IDF top terms per concept from its top-activating sentences inside A_j."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(texts) != acts.shape[0]:
        raise ValueError(f"texts has {len(texts)} entries, expected {acts.shape[0]} (one per row of acts)")
    info: dict[str, str] = {}
    if cleaned is None:
        cleaned, info = clean_texts(texts, phrases=phrases)
    top = top_activating(acts, mask, k=max_sentences)
    docs = [" ".join(" ".join(cleaned[i]) for i in idx) for idx in top.indices]
    docs.append(" ".join(" ".join(toks) for toks in cleaned))  # whole-corpus document
    vec = TfidfVectorizer(
        tokenizer=str.split, preprocessor=None, lowercase=False, token_pattern=None,
        sublinear_tf=True, min_df=min_df,
    )
    f = acts.shape[1]
    try:
        x = vec.fit_transform(docs)[:-1].toarray()  # [F, V]; the corpus row dropped
    except ValueError:  # empty vocabulary after min_df
        logger.warning("tfidf_top_terms: empty vocabulary (min_df=%d)", min_df)
        return TfidfTerms([[] for _ in range(f)], [[] for _ in range(f)], [len(i) for i in top.indices], info)
    vocab = vec.get_feature_names_out()
    terms, scores = [], []
    for row in x:
        pos = np.nonzero(row > 0)[0]
        order = sorted(pos, key=lambda j: (-row[j], vocab[j]))[:top_k]
        terms.append([str(vocab[j]) for j in order])
        scores.append([float(row[j]) for j in order])
    return TfidfTerms(terms, scores, [len(i) for i in top.indices], info)
