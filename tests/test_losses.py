"""Loss terms vs dense formulas written out independently (method.md 2.3, 2.7), schedule and epoch switch."""

from __future__ import annotations

import math

import pytest
import torch

from concept_ext.config.sae import SAEConfig, TrainConfig
from concept_ext.sae.losses import sae_losses
from concept_ext.sae.model import ClassifSAE, TopKSAE
from concept_ext.sae.trainer import EpochCounter, lr_at

D, M, K, N_C, C, B = 6, 10, 3, 3, 2, 8


def _sae(arch: str = "classif_topk", dtype: str = "float64") -> TopKSAE:
    cfg = SAEConfig(d=D, m=M, k=K, n_concepts=N_C, n_classes=C, architecture=arch, dtype=dtype)
    sae = ClassifSAE(cfg) if arch == "classif_topk" else TopKSAE(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial biases so that every term is exercised
        sae.b_enc.copy_(0.3 * torch.randn(M, generator=gen, dtype=torch.float64))
        sae.b_dec.copy_(0.1 * torch.randn(D, generator=gen, dtype=torch.float64))
        sae.W_enc.mul_(2.0)
    return sae


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, D, generator=gen, dtype=torch.float64) * 3 + 1
    labels = torch.randint(0, C, (B,), generator=gen)
    return h, labels


def _dense_reference(sae, h, labels, cfg, dead, stopgrad):
    """Every term from the dense formulas of method.md 2.3, with plain torch ops and a dense z."""
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    s = math.sqrt(D) / h.norm(dim=1, keepdim=True)
    x = h * s
    pre = x @ W_enc + b_enc  # [B, M]
    kth = pre.topk(K, dim=1).values[:, -1:]
    z = torch.where(pre >= kth, pre.relu(), torch.zeros_like(pre))  # tie-free random inputs
    z_dec = torch.cat([z[:, :N_C].detach(), z[:, N_C:]], 1) if stopgrad else z
    h_hat = (z_dec @ W_dec + b_dec) / s
    hbar = h.mean(0)
    e = (h_hat - h) ** 2 / ((h - hbar).norm(dim=1, keepdim=True) + 1e-6)
    l_mse = e.sum() / B
    m_tau = int(math.floor(cfg.target_rate * B))
    l_ar = (z.sum() - z.topk(m_tau, dim=0).values.sum()) / B
    l_ce = torch.zeros((), dtype=h.dtype)
    if sae.cfg.architecture == "classif_topk":
        logits = z[:, :N_C] @ sae.W_c.T + sae.b_c
        l_ce = -torch.log_softmax(logits, 1)[torch.arange(B), labels].mean()
    l_ghost = torch.zeros((), dtype=h.dtype)
    if dead is not None and dead.any():
        r = (h - h_hat).detach()
        g = torch.exp(pre[:, dead]) @ W_dec[dead]
        g = g * (r.norm(dim=1, keepdim=True) / (2 * g.norm(dim=1, keepdim=True) + 1e-6)).detach()
        e_g = (g - r) ** 2 / ((r - r.mean(0)).norm(dim=1, keepdim=True) + 1e-6)
        l_ghost = ((e / (e_g + 1e-6)).detach() * e_g).sum() / (B * D)
    total = cfg.lambda_mse * (l_mse + l_ghost) + cfg.lambda_ar * l_ar + cfg.lambda_cls * l_ce
    return total, l_mse, l_ghost, l_ar, l_ce


CASES = [
    # (architecture, dead latents, stop-gradient)
    ("classif_topk", None, False),
    ("classif_topk", [1, 4, 7], False),
    ("classif_topk", [0, 5], True),
    ("topk", [2, 9], False),
]


@pytest.mark.parametrize("arch,dead_ids,stopgrad", CASES)
def test_terms_and_gradients_match_dense_formulas(arch, dead_ids, stopgrad):
    sae = _sae(arch)
    h, labels = _batch()
    cfg = TrainConfig(lambda_mse=0.7, lambda_ar=0.3, lambda_cls=1.3, target_rate=0.25, device="cpu")
    dead = None
    if dead_ids is not None:
        dead = torch.zeros(M, dtype=torch.bool)
        dead[dead_ids] = True
    out = sae_losses(sae, h, labels, cfg, dead_mask=dead, stopgrad_class=stopgrad)
    ref = _dense_reference(sae, h, labels, cfg, dead, stopgrad)
    names = ("total", "mse", "ghost", "ar", "ce")
    for name, want in zip(names, ref):
        got = getattr(out.terms, name)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (name, got, want)
    assert out.terms.ar > 0  # the batch is dense enough for L_ar to be active
    params = list(sae.parameters())
    g_ours = torch.autograd.grad(out.terms.total, params, allow_unused=True)
    g_ref = torch.autograd.grad(ref[0], params, allow_unused=True)
    for p_name, a, b in zip([n for n, _ in sae.named_parameters()], g_ours, g_ref):
        a = torch.zeros_like(params[0]) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10), p_name


def test_stopgrad_cuts_only_class_encoder_path():
    sae = _sae()
    h, labels = _batch(1)
    cfg = TrainConfig(lambda_mse=1.0, lambda_ar=0.0, lambda_cls=0.0, device="cpu")
    out = sae_losses(sae, h, labels, cfg, stopgrad_class=True)
    out.terms.total.backward()
    assert sae.W_enc.grad[:, :N_C].abs().max() == 0  # z_class columns get no reconstruction gradient
    assert sae.W_enc.grad[:, N_C:].abs().max() > 0
    active = out.indices[out.values > 0]
    # W_dec rows of z_class still learn from reconstruction: every z_class latent active in the batch gets a
    # gradient. The batch must activate some (else the check below would pass vacuously).
    class_active = active[active < N_C].unique()
    assert class_active.numel() > 0, "no z_class latent fires on this batch: the check would be vacuous"
    assert (sae.W_dec.grad[class_active].abs().amax(1) > 0).all()


def test_ghost_logs_zero_without_dead_latents_and_fvu_option():
    sae = _sae()
    h, labels = _batch(2)
    out = sae_losses(sae, h, labels, TrainConfig(device="cpu"), dead_mask=torch.zeros(M, dtype=torch.bool))
    assert out.terms.ghost == 0
    cfg = TrainConfig(mse_normalization="fvu", device="cpu")
    fvu = sae_losses(sae, h, labels, cfg).terms.mse
    want = ((out.h_hat - h) ** 2).sum() / ((h - h.mean(0)) ** 2).sum()
    assert torch.allclose(fvu, want, rtol=1e-10)


def test_auxk_matches_dense_formula():
    sae = _sae("topk")
    h, _ = _batch(4)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[[1, 3, 6, 8]] = True
    cfg = TrainConfig(dead_latents="auxk", lambda_mse=1.0, lambda_ar=0.0, lambda_cls=0.0, device="cpu")
    out = sae_losses(sae, h, None, cfg, dead_mask=dead)
    s = math.sqrt(D) / h.norm(dim=1, keepdim=True)
    x = h * s
    e = x - out.h_hat.detach() * s
    pre = (x @ sae.W_enc + sae.b_enc)[:, dead]
    k_aux = min(D // 2, 4)
    kth = pre.topk(k_aux, dim=1).values[:, -1:]
    z = torch.where(pre >= kth, pre.relu(), torch.zeros_like(pre))
    e_hat = z @ sae.W_dec[dead]
    want = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert torch.allclose(out.terms.auxk, want, rtol=1e-10)
    assert torch.allclose(out.terms.total, out.terms.mse + out.terms.auxk / 32 + 0 * out.terms.ar, rtol=1e-10)


def test_v1_noise_and_decay():
    sae = _sae()
    h, labels = _batch(5)
    cfg = TrainConfig.preset("v1", device="cpu")
    g1 = torch.Generator().manual_seed(0)
    g2 = torch.Generator().manual_seed(0)
    a = sae_losses(sae, h, labels, cfg, loss_weight=0.5, noise_gen=g1)
    b = sae_losses(sae, h, labels, cfg, loss_weight=0.5, noise_gen=g2)
    assert torch.equal(a.terms.total, b.terms.total)  # the noise comes from the given generator
    t = a.terms
    want = cfg.lambda_cls * t.ce + 0.5 * (cfg.lambda_mse * t.mse + cfg.lambda_ar * t.ar + t.ghost)
    assert torch.allclose(t.total, want)
    clean = sae_losses(sae, h, labels, TrainConfig(device="cpu"))
    assert not torch.equal(clean.values, a.values)  # the encoder saw noisy inputs


def test_paper_schedule_values():
    cfg = TrainConfig(total_samples=20_000 * 500, batch_size=500)
    T = cfg.total_steps
    assert T == 20_000
    assert lr_at(0, cfg) == pytest.approx(5e-5, rel=1e-12)
    for t in (1, 777, 10_000, T - 3):
        want = 5e-7 + (5e-5 - 5e-7) * (1 + math.cos(math.pi * t / (T - 2))) / 2
        assert lr_at(t, cfg) == pytest.approx(want, rel=1e-12)
    assert lr_at(T - 2, cfg) == pytest.approx(5e-7, rel=1e-12)
    assert lr_at(T - 1, cfg) == pytest.approx(2.5e-7, rel=1e-12)
    cos = TrainConfig(total_samples=1000, batch_size=10, schedule="cosine")
    assert lr_at(50, cos) == pytest.approx(5e-7 + (5e-5 - 5e-7) / 2)


@pytest.mark.parametrize(
    "n_train,batch,first_sg_step",
    [(120_000, 500, 9_840), (11_916, 2000, 2_497), (45_615, 1000, 4_973), (25_000, 500, 10_000)],
)
def test_epoch_switch_matches_table(n_train, batch, first_sg_step):
    # method.md 2.3 table: the first stop-gradient step (1-based) is ceil(e_s * N_train / B).
    e_total = 10_000_000 // n_train
    counter = EpochCounter(n_train)
    step = 0
    while True:
        step += 1
        if counter.advance(batch) >= e_total // 2:
            break
    assert step == first_sg_step
