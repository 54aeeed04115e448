"""Pre-encoder centring (package decision, method.md 2.1): pre = (x - mu) W_enc + b_enc.

The headline check trains ClassifSAE at the ``quick`` preset on an anisotropic synthetic set (a large
shared mean plus a small class signal, the shape of real classifier caches: ||mean h|| ~ ||h||) and asks
that the class latents stay alive and the head recover the planted classes; without centring the same run
loses most class latents (the control), which is why the package turns centring on by default.
"""
from __future__ import annotations

import os

import pytest
import torch

from concept_ext.config.sae import SAEConfig, TrainConfig
from concept_ext.sae.checkpoint import load_checkpoint, save_checkpoint
from concept_ext.sae.model import build_sae, dense_code
from concept_ext.sae.trainer import Trainer, train_sae

SEED = int(os.environ.get("CONCEPT_EXT_TEST_SEED", "0"))


def anisotropic(n: int = 3000, d: int = 64, c: int = 3, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``h [n, d]``: a shared mean of norm 10, class prototypes of norm 0.4, within-class noise 0.05/dim."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g)
    mean = mean / mean.norm() * 10.0
    protos = torch.randn(c, d, generator=g)
    protos = protos / protos.norm(dim=1, keepdim=True) * 0.4
    y = torch.randint(0, c, (n,), generator=g)
    return mean + protos[y] + 0.05 * torch.randn(n, d, generator=g), y


def _fit(center: str, h, y, steps: int = 150):
    cfg = SAEConfig(d=h.shape[1], n_classes=3)
    tc = TrainConfig.preset("quick", total_samples=256 * steps, progress=False, center=center, device="cpu")
    sae = train_sae(h, y, cfg, tc).sae
    code = sae.encode(h)
    rate = (dense_code(code.values, code.indices, cfg.m) > 0).float().mean(0)  # [m]
    live_class = int((rate[: cfg.n_concepts] > 1e-6).sum())
    acc = float((sae.classify(code.values, code.indices).argmax(1) == y).float().mean())
    return sae, live_class, acc, rate


@pytest.mark.slow
def test_centring_keeps_the_class_latents_alive_at_quick():
    h, y = anisotropic()
    _, live, acc, rate = _fit("mean", h, y)
    msg = f"seed {SEED}: live class latents {live}/20, head accuracy {acc:.3f}"
    assert live >= 18, msg
    assert acc >= 0.95, msg
    assert int((rate >= 0.99).sum()) == 0, msg + ": always-on latents"
    # Control: the same run without centring collapses (what the default used to do).
    _, live0, acc0, _ = _fit("none", h, y)
    assert live0 < 18 and acc0 < 0.9, f"seed {SEED}: uncentred run kept {live0}/20 (acc {acc0:.3f})"


def _manual_code(sae, h):
    x = h * (h.shape[1] ** 0.5 / h.norm(dim=1, keepdim=True))
    pre = (x - sae.center) @ sae.W_enc + sae.b_enc  # [N, m]
    top = pre.topk(sae.k, dim=1)
    return top.values.clamp_min(0), top.indices


def test_encode_and_preactivations_subtract_the_centre():
    h, _ = anisotropic(n=64, d=16)
    sae = build_sae(SAEConfig(d=16, m=64, k=4, n_concepts=3, n_classes=3, seed=SEED))
    with torch.no_grad():
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(SEED))
    mu = sae.fit_center(h, "mean")
    vals, idx = _manual_code(sae, h)
    code = sae.encode(h)
    assert torch.allclose(code.values, vals, atol=1e-5), f"seed {SEED}"
    assert torch.equal(code.indices.sort(1).values, idx.sort(1).values), f"seed {SEED}"
    x = h * (16 ** 0.5 / h.norm(dim=1, keepdim=True))
    pre = sae.preactivations(x)  # the dead-latent terms' pre-activations
    assert torch.allclose(pre, (x - mu) @ sae.W_enc + sae.b_enc, atol=1e-5), f"seed {SEED}"
    cols = torch.tensor([0, 5, 63])
    assert torch.allclose(sae.preactivations(x, cols), pre[:, cols], atol=1e-6)


def test_fit_center_mean_median_and_b_dec():
    h, _ = anisotropic(n=500, d=8)
    h[:20] += 50.0  # outliers pull the mean, not the median
    sae = build_sae(SAEConfig(d=8, m=16, k=2, n_concepts=2, n_classes=2))
    x = (h * (8 ** 0.5 / h.norm(dim=1, keepdim=True))).double()
    mu = sae.fit_center(h, "mean")
    assert torch.allclose(mu.double(), x.mean(0), atol=1e-6)
    assert torch.equal(sae.b_dec.detach(), mu), "b_dec starts at the centre"
    med = sae.fit_center(h, "geometric_median").double()
    # Weiszfeld fixed point: the unit vectors from the median to the points sum to ~0 (the subgradient).
    u = (x - med) / (x - med).norm(dim=1, keepdim=True)
    assert float(u.sum(0).norm()) < 1e-2 * len(x), float(u.sum(0).norm())
    assert float((med - x.mean(0)).norm()) > 1e-3, "the median should differ from the mean here"
    with pytest.raises(ValueError, match="center must be a tensor of shape"):
        sae.set_center(torch.zeros(3))
    with pytest.raises(ValueError, match="method must be"):
        sae.fit_center(h, "median")


def test_presets_turn_centring_on_only_outside_paper_parity():
    assert TrainConfig.preset("quick").center == "mean"
    assert TrainConfig.preset("default").center == "mean"
    assert TrainConfig.preset("paper-v2").center == "none"
    assert TrainConfig.preset("v1").center == "none"
    assert TrainConfig().center == "none"
    with pytest.raises(ValueError, match="TrainConfig.center"):
        TrainConfig(center="median")


def test_checkpoint_keeps_the_centre_and_resume_does_not_refit_it(tmp_path):
    h, y = anisotropic(n=200, d=16)
    cfg = SAEConfig(d=16, m=32, k=2, n_concepts=3, n_classes=3)
    tc = TrainConfig(total_samples=32 * 6, batch_size=32, lr=1e-3, progress=False, device="cpu", center="mean")
    t = Trainer(build_sae(cfg), tc, h, y, out_dir=tmp_path)
    mu = t.sae.center.clone()
    t.train(steps=3)
    path = t.save(tmp_path / "mid")
    ck = load_checkpoint(path, load_trainer_state=True)
    assert torch.equal(ck.sae.center, mu)
    assert torch.equal(ck.sae.encode(h).indices, t.sae.encode(h).indices)
    # A resume on shifted activations keeps the stored centre (it is part of the trained model).
    resumed = Trainer.resume(path, h + 1.0, y)
    assert torch.equal(resumed.sae.center, mu)
    # Uncentred checkpoints have no centre; a cfg.json / tensor mismatch is refused with the file named.
    plain = build_sae(cfg)
    p2 = save_checkpoint(tmp_path / "plain", plain)
    assert load_checkpoint(p2).sae.center is None
    import json
    doc = json.loads((p2 / "cfg.json").read_text())
    doc["center"] = True
    (p2 / "cfg.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="lacks a 'center' tensor"):
        load_checkpoint(p2)
