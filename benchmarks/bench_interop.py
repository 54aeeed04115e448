"""The libraries' own training step with and without ``concept_ext.accelerate`` (issue 25, item 5).

One process, identical inputs: for each library, a module is built from the same weights
(``peers.make_weights``), deep-copied, and one copy is accelerated. The step is the library's own:

* sparsify 1.3.3: ``SparseCoder`` in its default autoencoder config (``x - b_dec`` pre-bias,
  ``normalize_decoder``): ``out = coder(x); out.fvu.backward()``;
* SAELens 6.54: ``TopKTrainingSAE`` in its default training config (``apply_b_dec_to_input``,
  ``rescale_acts_by_decoder_norm``, dense activations): ``training_forward_pass`` + ``loss.backward()``.

No optimiser (it is the same for both). Before timing, the accelerated step's loss and gradients are
checked against the stock step's. Sizes from ``conftest.py`` (smoke in CI; ``CONCEPT_EXT_BENCH_FULL=1``:
CS = N 2000, d 2048, m 4096, k 10 and S2 = N 4096, d 1024, m 16384, k 32, as in bench_peers.py). In full
mode each ``accelerated`` row also alternates stock and accelerated steps call by call
(``CONCEPT_EXT_BENCH_PAIRS``) and stores ``median(stock / accelerated)`` in extra_info: the ratio to
report on a shared machine.
"""
from __future__ import annotations

import copy
import importlib
import os
import statistics
import time

import pytest
import torch

import peers
from concept_ext import accelerate
from conftest import FULL, SIZES

ROUNDS = int(os.environ.get("CONCEPT_EXT_BENCH_ROUNDS", "3")) if FULL else 1
PAIRS = int(os.environ.get("CONCEPT_EXT_BENCH_PAIRS", "3" if FULL else "0"))


def _sparsify(w, k):
    sp = importlib.import_module("sparsify")
    d, m = w.W_enc.shape
    coder = sp.SparseCoder(d, sp.SparseCoderConfig(num_latents=m, k=k), device="cpu", dtype=w.W_enc.dtype)
    with torch.no_grad():
        coder.encoder.weight.copy_(w.W_enc.t())
        coder.encoder.bias.copy_(w.b_enc)
        coder.W_dec.copy_(w.W_dec)
        coder.b_dec.copy_(w.b_dec)
    return coder


def _sparsify_step(coder, x):
    out = coder(x)
    out.fvu.backward()
    return out.fvu.detach()


def _saelens(w, k):
    topk = importlib.import_module("sae_lens.saes.topk_sae")
    d, m = w.W_enc.shape
    sae = topk.TopKTrainingSAE(topk.TopKTrainingSAEConfig(d_in=d, d_sae=m, k=k, device="cpu"))
    with torch.no_grad():
        for name, t in zip(("W_enc", "b_enc", "W_dec", "b_dec"), w):
            getattr(sae, name).copy_(t)
    return sae


def _saelens_step(sae, x):
    step = importlib.import_module("sae_lens.saes.sae").TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
    out = sae.training_forward_pass(step)
    out.loss.backward()
    return out.loss.detach()


LIBS = {"sparsify": (_sparsify, _sparsify_step), "sae_lens": (_saelens, _saelens_step)}


def _grads(mod):
    return {n: p.grad.clone() for n, p in mod.named_parameters()}


@pytest.mark.parametrize("mode", ["stock", "accelerated"])
@pytest.mark.parametrize("lib", list(LIBS))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: s.name)
def test_library_train_step(benchmark, size, lib, mode):
    benchmark.group = f"interop-{lib}-{size.name}"
    peers.require(lib)
    build, step = LIBS[lib]
    w = peers.make_weights(size.d, size.m)
    x = torch.randn(size.n, size.d, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    stock = build(w, size.k)
    fast = copy.deepcopy(stock)
    accelerate(fast)
    module = fast if mode == "accelerated" else stock

    def run(mod=module):
        mod.zero_grad(set_to_none=True)
        return step(mod, x)

    # Correctness next to timing: the accelerated step against the stock one, same inputs.
    want, got = run(stock), run(fast)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    want_g, got_g = _grads(stock), _grads(fast)
    for name, g in want_g.items():
        scale = float(g.abs().max()) or 1.0
        torch.testing.assert_close(got_g[name] / scale, g / scale, rtol=1e-3, atol=1e-5, msg=f"grad {name}")
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1 if FULL else 0)
    if mode == "accelerated" and PAIRS:
        ratios = []
        for _ in range(PAIRS):
            t0 = time.perf_counter()
            run(stock)
            t1 = time.perf_counter()
            run(fast)
            t2 = time.perf_counter()
            ratios.append((t1 - t0) / (t2 - t1))
        benchmark.extra_info["interleaved_stock_over_accelerated_median"] = statistics.median(ratios)
        benchmark.extra_info["interleaved_ratios"] = ratios
