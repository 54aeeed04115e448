"""Evaluation metrics (method.md section 6).

* ``jenks``: exact two-class Jenks breaks, vectorised over concepts (:func:`jenks2_breaks`);
* ``interpret``: ConceptSim, SentenceSim(k), Jaccard/redundancy/coverage, top-activating sentences and
  the dataset-wide cosine baseline, from activations [N, F] and sentence embeddings [N, e];
* ``text``: TF-IDF top terms per concept (scikit-learn; imported on use);
* ``readout``: the readout protocols (single-token tail, in-context) and shared encode/decode helpers;
* ``completeness``: RAcc with its tail(h) ceiling, accuracy/CE, per-class scores, activation rates;
* ``causality``: conditional single-concept ablation and global segment ablation.

Every metric returns a dataclass of plain numbers with ``to_dict()`` (JSON-serialisable).
"""
from __future__ import annotations

from concept_ext.metrics.interpret import (
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
from concept_ext.metrics.causality import (
    ConceptAblation,
    ConditionalAblationResult,
    SegmentAblation,
    SegmentAblationResult,
    SegmentFractionMean,
    conditional_ablation,
    segment_ablation,
)
from concept_ext.metrics.completeness import ClassScores, CompletenessResult, activation_rates, completeness
from concept_ext.metrics.jenks import Jenks2Split, jenks2_breaks
from concept_ext.metrics.readout import ContextReadout, Readout, SelectedCode, TailReadout, encode_selected, rescale_to

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
    "ConceptAblation",
    "ConditionalAblationResult",
    "SegmentAblation",
    "SegmentAblationResult",
    "SegmentFractionMean",
    "conditional_ablation",
    "segment_ablation",
    "ClassScores",
    "CompletenessResult",
    "activation_rates",
    "completeness",
    "Readout",
    "TailReadout",
    "ContextReadout",
    "SelectedCode",
    "encode_selected",
    "rescale_to",
]
