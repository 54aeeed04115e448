"""Evaluation metrics (method.md section 6).

* ``jenks``: exact two-class Jenks breaks, vectorised over concepts (:func:`jenks2_breaks`);
* ``interpret``: ConceptSim, SentenceSim(k), Jaccard/redundancy/coverage, top-activating sentences and
  the dataset-wide cosine baseline, from activations [N, F] and sentence embeddings [N, e];
* ``text``: TF-IDF top terms per concept (scikit-learn; imported on use).

Every metric returns a dataclass of plain numbers with ``to_dict()`` (JSON-serialisable).
"""
from __future__ import annotations

from .interpret import (
    ActivatingSets,
    ConceptSimResult,
    CosineBaseline,
    SentenceSimResult,
    SetOverlap,
    TopActivating,
    activating_sets,
    concept_sim,
    mean_pairwise_cosine,
    sentence_sim,
    set_overlap,
    top_activating,
    top_concept_mask,
)
from .jenks import Jenks2Split, jenks2_breaks

__all__ = [
    "Jenks2Split",
    "jenks2_breaks",
    "ActivatingSets",
    "ConceptSimResult",
    "CosineBaseline",
    "SentenceSimResult",
    "SetOverlap",
    "TopActivating",
    "activating_sets",
    "concept_sim",
    "mean_pairwise_cosine",
    "sentence_sim",
    "set_overlap",
    "top_activating",
    "top_concept_mask",
]
