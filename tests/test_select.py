"""Selection and post-processing: dead drop, per-class segmentation, probe ranking and fitting, the SAE
adapter (truncation and probe selection), presets and config round trips."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings

import numpy as np
import pytest
import torch

from concept_ext.concepts import SAEConcepts, fit_probe, rank_scores
from concept_ext.concepts.base import load_concept_model
from concept_ext.config.baselines import (
    BaselinesConfig,
    ProbeConfig,
    SelectConfig,
    baselines_preset,
)
from concept_ext.config.build import build_config
from concept_ext.concepts.select import apply_selection, drop_dead, segment, selection_data, truncation


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# Dead drop and segmentation
# ------------------------------------------------------------------------------------------------


def test_drop_dead_thresholds():
    acts = torch.zeros(4, 5, dtype=torch.float64)
    acts[:, 1] = 1e-7  # dead under v2 (<= 1e-6)
    acts[:, 2] = torch.tensor([1e-5, -1e-5, 1e-5, -1e-5])  # mean |a| = 1e-5: alive v2, dead v1 (<=)
    acts[:, 3] = -2.0  # signed but alive
    acts[0, 4] = 4e-6  # mean |a| = 1e-6 exactly: dead under v2
    v2 = drop_dead(acts, [0, 1, 2, 3, 4], threshold=1e-6)
    assert v2.kept == [2, 3] and v2.dropped == [0, 1, 4]
    v1 = drop_dead(acts, [3, 2, 1], threshold=1e-5)
    assert v1.kept == [3] and v1.dropped == [2, 1]
    assert torch.allclose(v1.mean_abs, torch.tensor([2.0, 1e-5, 1e-7], dtype=torch.float64))
    with pytest.raises(ValueError, match="selected"):
        drop_dead(acts, [7])


def test_segment_mean_vs_sum_ties_and_order():
    # class 0 has 3 rows, class 1 one row
    labels = torch.tensor([0, 0, 0, 1])
    acts = torch.tensor([
        [1.0, 0.0, 0.0, 2.0],
        [1.0, 0.0, 0.0, 2.0],
        [1.0, 0.0, 0.0, 2.0],
        [2.0, 0.0, 6.0, 2.0],
    ])
    mean = segment(acts, [0, 1, 2, 3], labels, 2, mode="mean")
    # f0: means (1, 2) -> class 1; f1: all zero -> uniform tie -> class 0; f2 -> class 1;
    # f3: means (2, 2) -> tie -> class 0
    assert mean.classes == [1, 0, 1, 0]
    assert torch.allclose(mean.shares[:, 0], torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    assert torch.allclose(mean.shares[:, 1], torch.tensor([0.5, 0.5], dtype=torch.float64))
    # inside each segment, most active (mean |a| over all rows) first
    assert mean.segments == [[3, 1], [2, 0]]
    summed = segment(acts, [0, 1, 2, 3], labels, 2, mode="sum")
    assert summed.classes == [0, 0, 1, 0]  # f0: sums (3, 2) -> class 0 under v1


def test_segment_empty_class_and_mixed_sign_warning(caplog):
    labels = torch.tensor([0, 0, 2, 2])  # class 1 has no rows: mean 0
    acts = torch.tensor([[1.0, -3.0], [1.0, -3.0], [-1.0, 1.0], [-1.0, 1.0]])
    with caplog.at_level(logging.WARNING, logger="concept_ext"):
        seg = segment(acts, [0, 1], labels, 3)
    assert seg.mixed_sign == [0, 1] and "mixed sign" in caplog.text
    # f0: means (1, 0, -1), sum 0 -> uniform -> class 0; f1: (-3, 0, 1) / -2 -> (1.5, 0, -0.5) -> class 0
    assert seg.classes == [0, 0]
    with pytest.raises(ValueError, match="n_classes=3"):
        segment(acts, [0], torch.tensor([0, 3, 0, 0]), 3)


class _Identity:
    """Minimal stand-in for a ConceptModel: concepts are the coordinates."""

    def __init__(self, n):
        self.selected, self.dropped, self.segmentation, self.n = list(range(n)), [], None, n

    def encode(self, h):
        return h


def test_apply_selection_and_split_switch():
    g = torch.Generator().manual_seed(0)
    h_test = torch.randn(30, 4, generator=g).abs()
    h_test[:, 2] = 0.0  # dead on test
    labels = (h_test[:, 0] > h_test[:, 0].median()).long()
    model = _Identity(4)
    res = apply_selection(model, h_test, seg_h=h_test, seg_labels=labels, n_classes=2)
    assert res.selected == [0, 1, 3] and res.dropped == [2]
    assert model.selected == [0, 1, 3] and len(model.segmentation) == 3
    assert model.segmentation[0] == 1  # feature 0 is larger on class 1
    train, test = (torch.zeros(1, 4), torch.tensor([0])), (h_test, labels)
    assert selection_data(SelectConfig(), train=train, test=test) is train
    paper = baselines_preset("v2", reference_quirks=True).select
    assert selection_data(paper, train=train, test=test) is test
    assert truncation(3) == [0, 1, 2]


# ------------------------------------------------------------------------------------------------
# Probe
# ------------------------------------------------------------------------------------------------


def test_rank_scores_tie_rules():
    scores = np.array([0.0, 2.0, 0.0, 2.0, 1.0, 0.0])
    assert rank_scores(scores, 4, tie_rule="lower") == [1, 3, 4, 0]
    assert rank_scores(scores, 4, tie_rule="higher") == [3, 1, 4, 5]
    assert rank_scores(scores, 6, tie_rule="numpy_reverse") == list(np.argsort(scores)[::-1])
    with pytest.raises(ValueError, match="tie_rule"):
        rank_scores(scores, 2, tie_rule="random")


@pytest.fixture(scope="module")
def sparse_latents():
    """Sparse non-negative codes over 30 latents; the class is decided by latents 3 and 7."""
    rng = np.random.default_rng(0)
    n, m = 600, 30
    acts = rng.exponential(size=(n, m)) * (rng.random((n, m)) < 0.3)
    labels = (acts[:, 3] > acts[:, 7]).astype(np.int64)
    return torch.tensor(acts), torch.tensor(labels)


@pytest.mark.parametrize("preset", ["v2", "v1"])
def test_probe_finds_planted_latents(sparse_latents, preset):
    acts, labels = sparse_latents
    cfg = dataclasses.replace(baselines_preset(preset).probe, n_select=2, max_iter=300)
    res = fit_probe(acts, labels, config=cfg)
    assert sorted(res.selected) == [3, 7]
    assert res.scores.shape == (30,) and res.best_C in cfg.Cs and res.n_rows == 600
    # cv_accuracy is the mean held-out-fold accuracy at the chosen C: recomputed here with plain
    # cross_val_score on the same folds (exact for the grid search; the LogisticRegressionCV path warm-starts
    # along C, which may move a fold's accuracy by a row or two).
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    assert math.isfinite(res.cv_accuracy) and res.cv_accuracy > 0.8, res.cv_accuracy
    folds = StratifiedKFold(cfg.n_folds, shuffle=cfg.shuffle, random_state=cfg.random_state if cfg.shuffle else None)
    lr = LogisticRegression(C=res.best_C, l1_ratio=1.0, solver="saga", class_weight=cfg.class_weight, tol=cfg.tol,
                            max_iter=cfg.max_iter, random_state=cfg.random_state)
    pipe = make_pipeline(*([StandardScaler()] if cfg.standardize else []), lr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(converge|max_iter).*")
        scores = cross_val_score(pipe, acts.double().numpy(), labels.numpy(), cv=folds, scoring="accuracy")
    want = float(scores.mean())
    assert res.cv_accuracy == pytest.approx(want, abs=1e-12 if cfg.search == "grid" else 0.01), (cfg.search, want)


def test_probe_bad_input(sparse_latents):
    acts, labels = sparse_latents
    with pytest.raises(ValueError, match="two classes"):
        fit_probe(acts, torch.zeros_like(labels))
    with pytest.raises(ValueError, match="n_select"):
        fit_probe(acts, labels, config=ProbeConfig(n_select=31))
    with pytest.raises(ValueError, match="labels"):
        fit_probe(acts, labels[:5])


# ------------------------------------------------------------------------------------------------
# SAE adapter
# ------------------------------------------------------------------------------------------------


class TinyTopKSAE:
    """A hand-written TopK SAE with the constant-norm input rescale (method.md 2.1)."""

    def __init__(self, d=12, m=30, k=4, seed=0, n_concepts=5):
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.randn(d, m, generator=g)
        self.b_enc = torch.zeros(m)
        self.W_dec = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
        self.b_dec = torch.randn(d, generator=g) * 0.1
        self.k, self.d, self.n_concepts = k, d, n_concepts

    def encode(self, h):
        x = h * (self.d ** 0.5) / h.norm(dim=1, keepdim=True)
        top = (x @ self.W_enc + self.b_enc).topk(self.k, dim=1)
        return top.values.relu(), top.indices

    def decode(self, values, indices):
        return (values.unsqueeze(-1) * self.W_dec[indices]).sum(1) + self.b_dec


def test_sae_adapter_encode_reconstruct_truncation(tmp_path):
    sae = TinyTopKSAE()
    h = torch.randn(40, 12, generator=torch.Generator().manual_seed(1)) * 3
    model = SAEConcepts(sae)
    assert model.selected == [0, 1, 2, 3, 4] and model.n_concepts == 30
    z = model.encode(h)
    values, indices = sae.encode(h)
    manual = torch.zeros(40, 30)
    for i in range(40):
        manual[i, indices[i]] = values[i]
    assert torch.equal(z, manual)
    x_hat = sae.decode(values, indices)
    assert torch.allclose(model.reconstruct(z), x_hat, atol=1e-6)
    scale = (12 ** 0.5) / h.norm(dim=1, keepdim=True)
    assert torch.allclose(model.reconstruct(z, h=h), x_hat / scale, atol=1e-5)
    masked = model.masked(z)
    assert torch.equal(masked[:, 5:], torch.zeros(40, 25)) and torch.equal(masked[:, :5], z[:, :5])
    assert torch.equal(model.directions(), sae.W_dec)
    model.save(tmp_path / "sae")
    with pytest.raises(ValueError, match="sae="):
        load_concept_model(tmp_path / "sae")
    loaded = load_concept_model(tmp_path / "sae", sae=sae)
    assert loaded.selected == model.selected and torch.equal(loaded.encode(h), z)
    with pytest.raises(TypeError, match="decode"):
        SAEConcepts(object())


def test_sae_adapter_probe_selection(tmp_path):
    sae = TinyTopKSAE(seed=3)
    h = torch.randn(600, 12, generator=torch.Generator().manual_seed(2))
    z = SAEConcepts(sae).encode(h)
    live = torch.nonzero(z.abs().sum(0) > 0).flatten().tolist()
    a, b = live[0], live[-1]
    labels = (z[:, a] > z[:, b]).long()
    probe = ProbeConfig(max_iter=300)
    model = SAEConcepts(sae, selection="probe", n_select=2, probe=probe).fit(h, labels=labels)
    assert sorted(model.selected) == sorted([a, b])
    assert model.info["probe_n_nonzero"] >= 2
    model.save(tmp_path / "probe")
    loaded = load_concept_model(tmp_path / "probe", sae=sae)
    assert loaded.selected == model.selected and torch.equal(loaded.probe_scores, model.probe_scores)


# ------------------------------------------------------------------------------------------------
# Presets and configs
# ------------------------------------------------------------------------------------------------


def test_presets_and_quirks():
    v2 = baselines_preset("paper")
    assert v2.preset == "v2" and v2.select.dead_threshold == 1e-6 and v2.probe.tie_rule == "lower"
    assert v2.select.selection_split == "train" and v2.conceptshap.lr == 3e-4
    assert v2.hiconcept.flip_start_epoch == 50 and not v2.hiconcept.consistent
    q = baselines_preset("v2", reference_quirks=True)
    assert q.probe.tie_rule == "higher" and q.conceptshap.batches_quirk and q.hiconcept.batches_quirk
    assert (q.select.selection_split, q.select.selection_labels) == ("test", "ground_truth")
    assert q.shapley.completeness_form == "count"
    v1 = baselines_preset("v1", model="pythia-410m", dataset="ag_news")
    cs = v1.conceptshap
    assert (cs.thres, cs.lr, cs.epochs, cs.reg_start_epoch, cs.regularizer) == (0.1, 1e-3, 30, 2, "v1")
    assert v1.select.segmentation == "sum" and v1.select.dead_threshold == 1e-5
    assert v1.probe.search == "lrcv" and v1.probe.class_weight is None and not v1.probe.shuffle
    assert baselines_preset("v1", reference_quirks=True).probe.tie_rule == "numpy_reverse"
    with pytest.raises(ValueError, match="v1 ConceptSHAP"):
        baselines_preset("v1", model="pythia-14m", dataset="ag_news")
    with pytest.raises(ValueError, match="name"):
        baselines_preset("v3")


def test_config_json_round_trip():
    cfg = baselines_preset("v1", reference_quirks=True)
    data = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert build_config(BaselinesConfig, data) == cfg  # nested sections rebuilt, JSON lists back to tuples
    data["probe"]["tie_rul"] = "lower"
    with pytest.raises(ValueError, match=r"unknown config key 'probe.tie_rul' \(did you mean 'probe.tie_rule'\?\)"):
        build_config(BaselinesConfig, data)
    with pytest.raises(ValueError, match="segmentation"):
        SelectConfig(segmentation="median")
