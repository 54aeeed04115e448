"""One concept-method registry (build and load go through it), one name per type (issue 23 item 5)."""
from __future__ import annotations

import pytest
import torch

from concept_ext import concepts
from concept_ext.concepts.base import ConceptModel, _REGISTRY, concept_class, load_concept_model, register_concept_model
from concept_ext.config.baselines import ICAConfig


def test_build_and_load_share_one_registry(tmp_path):
    """A class registered once is both buildable by name and loadable from its folder."""

    @register_concept_model
    class Scaled(concepts.ICAConcepts):
        method = "test-scaled-ica"

    try:
        model = concepts.make_concept_model("test-scaled-ica", ICAConfig(n_components=2, random_state=0))
        assert type(model) is Scaled
        model.fit(torch.randn(40, 4, generator=torch.Generator().manual_seed(0)))
        model.save(tmp_path / "m")
        assert type(load_concept_model(tmp_path / "m")) is Scaled
    finally:
        del _REGISTRY["test-scaled-ica"]
    with pytest.raises(ValueError, match="unknown concept method 'test-scaled-ica'; known: .*'ica'"):
        concepts.make_concept_model("test-scaled-ica")
    with pytest.raises(ValueError, match=r"cfg.json: unknown concept method"):
        load_concept_model(tmp_path / "m")


def test_every_method_is_registered():
    assert {"ica", "conceptshap", "hiconcept", "sae"} <= set(_REGISTRY)
    assert all(issubclass(concept_class(m), ConceptModel) for m in ("ica", "conceptshap", "hiconcept", "sae"))


def test_one_name_per_type():
    """The metrics' structural protocol is not called ConceptModel (that is the ABC); ops.check_finite is public."""
    import concept_ext.metrics.readout as readout
    from concept_ext import ops

    assert not hasattr(readout, "ConceptModel") and hasattr(readout, "ReadoutModel")
    assert "check_finite" in ops.__all__ and not hasattr(ops, "_finite")
    with pytest.raises(ValueError, match="acts contains NaN"):
        ops.check_finite(torch.tensor([[0.0], [float("nan")]]), "acts")
