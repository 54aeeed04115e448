"""Baseline concept extractors behind the :class:`~concept_ext.concepts.base.ConceptModel` interface.

* :class:`ICAConcepts`: FastICA (method.md 4.1);
* :class:`ConceptSHAPConcepts`: ConceptSHAP bottleneck (4.2, v1 in 8) + completeness and Shapley values;
* :class:`HIConceptConcepts`: HI-Concept (4.3) with the flagged ``consistent`` variant;
* :class:`SAEConcepts`: any TopK SAE / ClassifSAE with truncation or L1-probe selection (4.4-4.5);
* :func:`fit_probe`, :func:`rank_scores`: the probe itself;
* :func:`shapley_exact`, :func:`shapley_permutation`, :func:`completeness_score`: ConceptSHAP quantities.
"""
from __future__ import annotations

from concept_ext.concepts.base import concept_class
from concept_ext.concepts.conceptshap import ConceptSHAPConcepts
from concept_ext.concepts.hiconcept import HIConceptConcepts
from concept_ext.concepts.ica import ICAConcepts
from concept_ext.concepts.probe import ProbeResult, fit_probe, rank_scores
from concept_ext.concepts.sae_adapter import SAEConcepts, SparseSAE
from concept_ext.concepts.shapley import ShapleyResult, completeness_score, shapley_exact, shapley_permutation

__all__ = [
    "ICAConcepts",
    "ConceptSHAPConcepts",
    "HIConceptConcepts",
    "SAEConcepts",
    "SparseSAE",
    "ProbeResult",
    "fit_probe",
    "rank_scores",
    "ShapleyResult",
    "shapley_exact",
    "shapley_permutation",
    "completeness_score",
    "make_concept_model",
]


def make_concept_model(method: str, config=None, **kwargs):
    """Build an unfitted concept model by its registered name (:func:`~concept_ext.concepts.base.concept_class`):
    ``"ica"``, ``"conceptshap"``, ``"hiconcept"`` with their config, or ``"sae"`` with the SAE module."""
    return concept_class(method)(config, **kwargs)
