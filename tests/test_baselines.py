"""Baselines on planted synthetic problems: ICA recovery, bottleneck training through a planted tail,
formula checks of scores and losses, save/load round trips, Shapley estimator vs exact enumeration."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from concept_ext.concepts import (  # noqa: E402
    ConceptSHAPConcepts,
    HIConceptConcepts,
    ICAConcepts,
    completeness_score,
    make_concept_model,
    shapley_exact,
    shapley_permutation,
)
from concept_ext.concepts.bottleneck import far_loss_v2, sim_loss_v2  # noqa: E402
from concept_ext.concepts.conceptshap import gram_r2, knn_r1  # noqa: E402
from concept_ext.concepts.hiconcept import flip_loss  # noqa: E402
from concept_ext.concepts.shapley import subset_accuracy_fn  # noqa: E402
from concept_ext.concepts.base import load_concept_model, n_batches  # noqa: E402
from concept_ext.config.baselines import (  # noqa: E402
    BottleneckConfig,
    HIConceptConfig,
    ICAConfig,
    ShapleyConfig,
    baselines_preset,
)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# ICA
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ica_problem():
    n, d, N = 20, 40, 2000
    g = torch.Generator().manual_seed(1)
    sources = torch.distributions.Laplace(0.0, 1.0).sample((N, n))  # non-Gaussian, independent
    mixing = torch.randn(d, n, generator=g)
    h = (sources @ mixing.T + 3.0).float()
    with threadpool_limits(1):  # BLAS pool contention on a shared 2-core machine
        model = ICAConcepts().fit(h)
    return h, sources, mixing, model


def test_ica_recovers_planted_mixing(ica_problem):
    h, sources, mixing, model = ica_problem
    est = F.normalize(model.directions().double(), dim=1)  # [n, d]
    true = F.normalize(mixing.T.double(), dim=1)  # [n, d]
    best = (true @ est.T).abs().max(dim=1).values  # per planted component
    assert (best > 0.95).float().mean() >= 0.9, best
    # sources recovered up to sign, permutation and scale
    s = model.encode(h).double()
    corr = torch.corrcoef(torch.cat([s, sources.double()], 1).T)[: s.shape[1], s.shape[1]:].abs()
    assert (corr.max(dim=0).values > 0.95).float().mean() >= 0.9
    # signed dense activations, and a full-rank noise-free mixture is reconstructed exactly
    assert (s < 0).any() and (s.abs() > 1e-6).float().mean() > 0.99
    assert torch.allclose(model.reconstruct(model.encode(h)), h, atol=1e-3)
    assert model.selected == list(range(20)) and model.n_concepts == 20


def test_ica_reconstruction_through_mixing(ica_problem):
    h, _, mixing, model = ica_problem
    s = model.encode(h[:5])
    masked = model.masked(s, [3])
    expected = s[:, 3:4].double() * model.mixing[:, 3] + model.mean  # s_j mixing_[:, j] + mean_
    assert torch.allclose(model.reconstruct(masked).double(), expected, atol=1e-4)


def test_ica_save_load_roundtrip(ica_problem, tmp_path):
    h, _, _, model = ica_problem
    model.selected, model.segmentation = [0, 2, 5], [1, 0, 1]
    try:
        model.save(tmp_path / "ica")
        assert sorted(os.listdir(tmp_path / "ica")) == ["cfg.json", "concepts.safetensors"]
        cfg = json.loads((tmp_path / "ica" / "cfg.json").read_text())
        assert cfg["method"] == "ica" and cfg["config"]["whiten"] == "unit-variance"
        loaded = load_concept_model(tmp_path / "ica")
    finally:
        model.selected, model.segmentation = list(range(20)), None
    assert isinstance(loaded, ICAConcepts)
    assert torch.equal(loaded.encode(h[:50]), model.encode(h[:50]))
    assert torch.equal(loaded.directions(), model.directions())
    assert loaded.selected == [0, 2, 5] and loaded.segmentation == [1, 0, 1]


def test_ica_bad_input(ica_problem):
    h, _, _, model = ica_problem
    with pytest.raises(ValueError, match="at least 21"):
        ICAConcepts().fit(torch.randn(20, 40))
    bad = torch.randn(100, 40)
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ICAConcepts(ICAConfig(n_components=5)).fit(bad)
    with pytest.raises(ValueError, match="d=39"):
        model.encode(torch.randn(4, 39))
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        model.encode(torch.randn(2, 4, 40))
    with pytest.raises(ValueError, match=r"\[N, 20\]"):
        model.reconstruct(torch.randn(3, 19))
    with pytest.raises(RuntimeError, match="not fitted"):
        ICAConcepts().encode(h)


# ------------------------------------------------------------------------------------------------
# Bottlenecks through a planted tail
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    """h = common offset + class mean + noise; the tail reads the class-mean directions (fixed, linear)."""
    d, C, N = 16, 3, 2048
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(C, d, generator=g) * 2
    offset = F.normalize(torch.randn(d, generator=g), dim=0) * 6  # anisotropy, as in LLM states
    y = torch.randint(0, C, (N,), generator=g)
    h = offset + mu[y] + 0.7 * torch.randn(N, d, generator=g)
    W = F.normalize(mu, dim=1) * 8

    def tail(u):  # [P, d] -> [P, C]
        return u @ W.T

    yhat = tail(h).argmax(1)
    return h, yhat, tail


def _small(cfg):
    cfg.n_concepts, cfg.hidden, cfg.epochs, cfg.lr, cfg.progress = 8, 32, 30, 1e-2, False
    if isinstance(cfg, HIConceptConfig):
        cfg.flip_start_epoch = 10
    return cfg


def _racc(model, h, yhat, tail):
    return float((tail(model.reconstruct(model.encode(h))).argmax(1) == yhat).float().mean())


CASES = {
    "conceptshap_v2": lambda: ConceptSHAPConcepts(_small(BottleneckConfig())),
    "conceptshap_v1": lambda: ConceptSHAPConcepts(_small(baselines_preset("v1").conceptshap)),
    "hiconcept": lambda: HIConceptConcepts(_small(HIConceptConfig())),
    "hiconcept_consistent": lambda: HIConceptConcepts(_small(HIConceptConfig(consistent=True))),
}


@pytest.fixture(scope="module")
def trained(planted):
    h, yhat, tail = planted
    return {name: make().fit(h, labels=yhat, tail=tail) for name, make in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bottleneck_recovers_tail_predictions(trained, planted, name):
    h, yhat, tail = planted
    model = trained[name]
    assert _racc(model, h, yhat, tail) >= 0.9
    p = model.encode(h)
    assert p.shape == (h.shape[0], 8) and torch.isfinite(p).all()
    assert model.info["batches_per_epoch"] == 16 and len(model.info["history"]) == 30
    if name.startswith("hiconcept"):
        assert "flip" in model.info["history"][-1] and "flip" not in model.info["history"][9]


def test_untrained_bottleneck_is_worse(planted):
    h, yhat, tail = planted
    cfg = _small(BottleneckConfig())
    cfg.epochs = 0
    assert _racc(ConceptSHAPConcepts(cfg).fit(h, labels=yhat, tail=tail), h, yhat, tail) < 0.8


@pytest.mark.parametrize("name", ["conceptshap_v1", "hiconcept"])
def test_bottleneck_save_load_roundtrip(trained, planted, name, tmp_path):
    h = planted[0][:64]
    model = trained[name]
    model.save(tmp_path / name)
    loaded = load_concept_model(tmp_path / name)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert torch.equal(loaded.encode(h), model.encode(h))
    p = model.encode(h)
    assert torch.equal(loaded.reconstruct(p), model.reconstruct(p))
    assert torch.equal(loaded.directions(), model.directions())


def test_conceptshap_scores_match_formula(trained, planted):
    model, h = trained["conceptshap_v2"], planted[0][:40].double()
    C = model.net.C_vec.detach().double()
    c_unit = C / C.norm(dim=0)
    s = h @ c_unit
    cos = (h / h.norm(dim=1, keepdim=True)) @ c_unit
    m = (cos > 0.3).double() * s
    expected = m / (m.sum(1, keepdim=True) + 1e-3)
    assert torch.allclose(model.encode(h.float()).double(), expected, atol=1e-4)
    # v1: raw concept matrix in the projections, cosines unchanged
    v1 = trained["conceptshap_v1"]
    C1 = v1.net.C_vec.detach().double()
    cos1 = (h / h.norm(dim=1, keepdim=True)) @ (C1 / C1.norm(dim=0))
    m1 = (cos1 > v1.config.thres).double() * (h @ C1)
    assert torch.allclose(v1.encode(h.float()).double(), m1 / (m1.sum(1, keepdim=True) + 1e-3), atol=1e-4)


def test_hiconcept_scores_and_flip_mask(trained, planted):
    model, h = trained["hiconcept"], planted[0][:40]
    sc = model.scores(h)
    soft = ((F.normalize(h, dim=1)) @ model.net.unit_concepts()).softmax(1)
    assert torch.allclose(sc["Sn"], soft) and torch.equal(sc["mask"], soft > 1 / 8)
    keep = model.flip_keep(4000, torch.Generator().manual_seed(0))
    assert keep.shape == (4000, 8) and bool((keep[:, -1] == 1).all())
    assert abs(float(keep[:, :-1].mean()) - 0.8) < 0.02


def test_regularisers_match_hand_computation():
    g = torch.Generator().manual_seed(3)
    sn = torch.rand(12, 5, generator=g)
    top3 = np.sort(sn.numpy(), axis=0)[-3:]  # floor(12/4) = 3 rows per column
    assert math.isclose(float(sim_loss_v2(sn)), -top3.mean(), rel_tol=1e-6)
    c = F.normalize(torch.randn(7, 5, generator=g), dim=0)
    gram = c.numpy().T @ c.numpy()
    assert math.isclose(float(far_loss_v2(c)), (gram - np.eye(5)).mean(), rel_tol=1e-5, abs_tol=1e-7)
    raw = torch.randn(7, 5, generator=g) * 2
    gr = raw.numpy().T @ raw.numpy()
    off = gr[~np.eye(5, dtype=bool)]
    assert math.isclose(float(gram_r2(raw)), (off ** 2).mean(), rel_tol=1e-5)
    x = torch.randn(50, 7, generator=g)
    brute = []
    for j in range(5):
        dist = ((x - raw[:, j]) ** 2).sum(1)
        idx = torch.argsort(dist)[:4]
        brute.append(float((x[idx] @ raw[:, j]).mean()))
    assert math.isclose(float(knn_r1(raw, x, 4)), float(np.mean(brute)), rel_tol=1e-5)
    y, y2 = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    expected = -(y.softmax(1) - y2.softmax(1)).abs().sum(1).mean()
    assert torch.isclose(flip_loss(y, y2), expected)


def test_batch_count_and_quirk(planted):
    h, yhat, tail = planted
    assert n_batches(256, 128) == 2 and n_batches(256, 128, quirk=True) == 1
    assert n_batches(300, 128) == 2 and n_batches(300, 128, quirk=True) == 2
    cfg = _small(BottleneckConfig())
    cfg.epochs, cfg.batches_quirk = 1, True
    model = ConceptSHAPConcepts(cfg).fit(h[:256], labels=yhat[:256], tail=tail)
    assert model.info["batches_per_epoch"] == 1


def test_bottleneck_bad_input(planted):
    h, yhat, tail = planted
    model = ConceptSHAPConcepts(_small(BottleneckConfig()))
    with pytest.raises(ValueError, match="tail"):
        model.fit(h, labels=yhat, tail=None)
    with pytest.raises(ValueError, match="labels"):
        model.fit(h, labels=yhat[:10], tail=tail)
    with pytest.raises(ValueError, match="n_classes=3"):
        model.fit(h, labels=yhat + 5, tail=tail)
    with pytest.raises(ValueError, match="at least 128"):
        model.fit(h[:100], labels=yhat[:100], tail=tail)
    bad = h.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.fit(bad, labels=yhat, tail=tail)


# ------------------------------------------------------------------------------------------------
# ConceptSHAP quantities
# ------------------------------------------------------------------------------------------------


def test_shapley_exact_known_games():
    w = np.array([0.5, -1.0, 2.0, 0.25])
    additive = shapley_exact(lambda m: float(w[m].sum()), 4)
    assert np.allclose(additive.values, w) and additive.exact
    # glove game: players 0,1 hold left gloves, 2 a right glove; v = number of pairs
    glove = shapley_exact(lambda m: float(min(m[0] + m[1], m[2])), 3)
    assert np.allclose(glove.values, [1 / 6, 1 / 6, 2 / 3])


def test_shapley_permutation_matches_exact_on_random_game():
    rng = np.random.default_rng(7)
    n = 5
    table = rng.normal(size=1 << n)
    table[0] = 0.0

    def value(mask):
        return float(table[int((mask.astype(int) << np.arange(n)).sum())])

    exact = shapley_exact(value, n)
    est = shapley_permutation(value, n, n_permutations=400, seed=1)
    assert est.n_permutations == 400 and not est.exact and (est.stderr > 0).all()
    assert np.all(np.abs(est.values - exact.values) <= 3 * est.stderr + 1e-9)
    assert math.isclose(est.values.sum(), table[-1] - table[0], abs_tol=1e-9)  # efficiency per ordering


def test_conceptshap_shapley_on_trained_bottleneck(planted):
    h, yhat, tail = planted
    cfg = _small(BottleneckConfig())
    cfg.n_concepts, cfg.epochs = 4, 10
    model = ConceptSHAPConcepts(cfg).fit(h, labels=yhat, tail=tail)
    h_eval, y_eval = h[:512], yhat[:512]
    exact = model.shapley(h_eval, y_eval, tail)  # 4 <= exact_max: enumeration
    assert exact.exact and exact.n_evaluations == 16
    mc = model.shapley(h_eval, y_eval, tail, config=ShapleyConfig(n_permutations=300, exact_max=0, seed=2))
    assert not mc.exact
    assert np.all(np.abs(mc.values - exact.values) <= 3 * mc.stderr + 1e-6)
    # completeness of all concepts, computed independently
    acc_new = float((tail(model.reconstruct(model.encode(h_eval))).argmax(1) == y_eval).float().mean())
    acc_orig = float((tail(h_eval).argmax(1) == y_eval).float().mean())
    eta = (acc_new - 1 / 3) / (acc_orig - 1 / 3)
    assert math.isclose(model.completeness(h_eval, y_eval, tail), eta, rel_tol=1e-9)
    # efficiency: the values sum to eta(all) - eta(empty)
    fn = subset_accuracy_fn(model.encode(h_eval), model.reconstruct, tail, y_eval, n_classes=3,
                            n_correct_orig=int(round(acc_orig * 512)))
    assert math.isclose(exact.values.sum(), eta - fn(np.zeros(4, bool)), abs_tol=1e-9)


def test_completeness_forms():
    assert math.isclose(completeness_score(90, 100, 100, 2), (0.9 - 0.5) / (1.0 - 0.5))
    assert math.isclose(completeness_score(90, 100, 100, 2, form="count"), (90 - 0.5) / (100 - 0.5))
    assert math.isnan(completeness_score(10, 50, 100, 2))
    with pytest.raises(ValueError, match="form"):
        completeness_score(1, 2, 3, 2, form="bad")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [ConceptSHAPConcepts, HIConceptConcepts])
def test_bottleneck_device_agnostic(planted, device, cls, tmp_path):
    h, yhat, tail_cpu = planted
    W = tail_cpu(torch.eye(h.shape[1])).to(device)  # the linear tail's matrix, on the device

    def tail(u):
        return u @ W

    cfg = _small(cls.config_cls())
    cfg.epochs = 2
    if isinstance(cfg, HIConceptConfig):
        cfg.flip_start_epoch = 1
    model = cls(cfg).fit(h[:512].to(device), labels=yhat[:512].to(device), tail=tail)
    p = model.encode(h[:64].to(device))
    assert p.device.type == device and model.reconstruct(p).device.type == device
    model.save(tmp_path / "m")
    loaded = load_concept_model(tmp_path / "m")  # loads on CPU
    assert torch.allclose(loaded.encode(h[:64]), p.cpu(), atol=1e-5)
