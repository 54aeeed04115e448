"""ConceptSHAP's package options (method.md 4.2 decision): centred scores and concepts started from data.

On an anisotropic cache (a large shared mean, a small class signal) the reference's uniform start gives
cosines near 0 with every concept, the 0.3 threshold never fires and the bottleneck ends with (almost) no
live concept; with the centred scores and data start the concepts fire selectively and carry the decision.
"""
from __future__ import annotations

import pytest
import torch

from concept_ext.concepts import ConceptSHAPConcepts
from concept_ext.concepts.base import load_concept_model
from concept_ext.config.baselines import BottleneckConfig, HIConceptConfig
from test_centering import SEED, anisotropic


def _tail_for(h, y):
    mu = h.mean(0)
    protos = torch.stack([(h[y == c] - mu).mean(0) for c in range(int(y.max()) + 1)])  # [C, d]
    return lambda v: (v - mu) @ protos.T * 50  # a frozen linear readout of the class signal


def _fit(h, y, tail, **kw):
    cfg = BottleneckConfig(epochs=6, lr=1e-3, progress=False, seed=SEED, **kw)
    m = ConceptSHAPConcepts(cfg).fit(h, labels=y, tail=tail)
    p = m.encode(h)  # [N, n]
    rate = (p.abs() > 1e-6).float().mean(0)  # [n]
    acc = float((tail(m.reconstruct(p)).argmax(1) == y).float().mean())
    return m, int((rate > 1e-6).sum()), float(rate.mean()), acc


@pytest.mark.slow
def test_centred_data_start_keeps_concepts_live_and_selective(tmp_path):
    h, y = anisotropic(n=800, d=32)
    tail = _tail_for(h, y)
    m, live, rate, acc = _fit(h, y, tail, center=True, init="data")
    msg = f"seed {SEED}: live {live}/20, mean rate {rate:.3f}, acc {acc:.3f}"
    assert live >= 15 and 0.02 < rate < 0.9 and acc > 0.9, msg
    # Control: the reference start collapses on the same data.
    _, live0, _, acc0 = _fit(h, y, tail)
    assert live0 <= 5 and acc0 < 0.7, f"seed {SEED}: reference start kept {live0} concepts (acc {acc0:.3f})"
    # The centre is part of the saved model: a reload gives the same activations and reconstructions.
    m.save(tmp_path / "cs")
    back = load_concept_model(tmp_path / "cs")
    assert torch.equal(back.encode(h), m.encode(h))
    assert torch.allclose(back.reconstruct(m.encode(h)), m.reconstruct(m.encode(h)))


def test_data_start_and_centre_are_set_before_training():
    h, y = anisotropic(n=300, d=16)
    cfg = BottleneckConfig(epochs=0, center=True, init="data", progress=False, seed=SEED)
    m = ConceptSHAPConcepts(cfg).fit(h, labels=y, tail=_tail_for(h, y))
    assert torch.allclose(m.net.mu, h.mean(0), atol=1e-5)
    c = torch.nn.functional.normalize(m.net.C_vec, dim=0).T  # [n, d] unit concept starts
    rows = torch.nn.functional.normalize(h - h.mean(0), dim=1)  # [N, d]
    # every concept starts on one (centred) training row
    assert torch.allclose((c @ rows.T).max(1).values, torch.ones(20), atol=1e-5), f"seed {SEED}"
    assert torch.allclose(m.net.g(torch.zeros(1, 20))[0], h.mean(0), atol=1e-5), "g(0) = mu"
    with pytest.raises(ValueError, match="ConceptSHAP option"):
        HIConceptConfig(center=True)
    with pytest.raises(ValueError, match="init must be"):
        BottleneckConfig(init="kmeans")
