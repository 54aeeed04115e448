"""One ClassifSAE training step (encode + decode + losses + backward, no optimiser): ours vs dense PyTorch.

* ``concept_ext``: :func:`concept_ext.sae.losses.sae_losses` on the sparse code (``topk_encode``,
  ``sparse_decode``, ``activation_rate_loss``; the dense [B, m] code is never formed);
* ``dense``: the same objective written the way SAELens-style code does it: dense ``F.linear`` encoder,
  ``topk``, scatter into zeros ``[B, m]``, dense decode matmul, column top-k over ``[B, m]`` for L_ar,
  autograd through all of it.

Both compute L = lambda_mse L_mse + lambda_ar L_ar + lambda_cls L_CE (method.md 2.3, no dead latents) and
their gradients are asserted equal. Sizes come from ``conftest.py`` (smoke unless
``CONCEPT_EXT_BENCH_FULL=1``: CS = paper scale B=2000 d=2048 m=4096 k=10; S2 = B=4096 d=1024 m=16384
k=32). Which kernel serves each op is stored in ``extra_info`` (``concept_ext.info.kernel_for``).
Compare ratios within one run: ``--benchmark-group-by=group``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from concept_ext.config.sae import SAEConfig, TrainConfig
from concept_ext.info import kernel_for
from concept_ext.sae.losses import sae_losses
from concept_ext.sae.model import ClassifSAE

from conftest import FULL, SIZES

N_CONCEPTS, N_CLASSES = 20, 4
CFG = TrainConfig(lambda_mse=0.02, lambda_ar=0.02, lambda_cls=1.0, target_rate=0.1, device="cpu")


def _problem(size, device):
    sae = ClassifSAE(SAEConfig(d=size.d, m=size.m, k=size.k, n_concepts=N_CONCEPTS, n_classes=N_CLASSES)).to(
        device
    )
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(size.n, size.d, generator=gen) * 2 + 0.3).to(device)
    y = torch.randint(0, N_CLASSES, (size.n,), generator=gen).to(device)
    with torch.no_grad():  # make L_ar active: a few latents fire on many rows of the batch
        sae.b_enc[:64] += 1.5
    return sae, h, y


def ours_step(sae, h, y):
    out = sae_losses(sae, h, y, CFG)
    out.terms.total.backward()
    return out.terms.total


def dense_step(sae, h, y):
    W_enc, b_enc, W_dec, b_dec, W_c, b_c = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.W_c, sae.b_c
    n, d = h.shape
    s = math.sqrt(d) / h.norm(dim=1, keepdim=True)
    pre = F.linear(h * s, W_enc.t(), b_enc)  # [B, m]
    top = pre.topk(sae.cfg.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())  # [B, m]
    h_hat = (z @ W_dec + b_dec) / s
    e = (h_hat - h).pow(2) / ((h - h.mean(0)).norm(dim=1, keepdim=True) + 1e-6)
    l_mse = e.sum(1).mean()
    m_tau = int(math.floor(CFG.target_rate * n + 1e-9))
    l_ar = (z.sum() - z.topk(m_tau, dim=0).values.sum()) / n  # column top-k over [B, m]
    l_ce = F.cross_entropy(F.linear(z[:, :N_CONCEPTS], W_c, b_c), y)
    total = CFG.lambda_mse * l_mse + CFG.lambda_ar * l_ar + CFG.lambda_cls * l_ce
    total.backward()
    return total


IMPLS = {"concept_ext": ours_step, "dense": dense_step}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: s.name)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_train_step(benchmark, size, impl):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sae, h, y = _problem(size, device)
    fn = IMPLS[impl]

    def zero():
        sae.zero_grad(set_to_none=True)

    def run():
        loss = fn(sae, h, y)
        _sync(device)
        return loss

    benchmark.group = f"train_step {size.name} B={size.n} d={size.d} m={size.m} k={size.k} {device}"
    benchmark.extra_info.update(
        {op: kernel_for(op, device) for op in ("topk_encode", "sparse_decode", "activation_rate_loss")}
    )
    rounds = (5 if size.m <= 4096 else 3) if FULL else 2
    loss = benchmark.pedantic(run, setup=zero, rounds=rounds, warmup_rounds=1)
    # Agreement with the other implementation (same loss, same gradients).
    grads = [p.grad.clone() for p in sae.parameters()]
    other = IMPLS["dense" if impl == "concept_ext" else "concept_ext"]
    zero()
    loss_other = other(sae, h, y)
    torch.testing.assert_close(loss, loss_other, rtol=1e-4, atol=1e-6)
    for (name, p), g in zip(sae.named_parameters(), grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
