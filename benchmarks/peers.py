"""Thin adapters around the peer libraries for the side-by-side benchmarks (issue 11).

Every adapter builds the peer's own module from the SAME weights as ours, so that every implementation in
a benchmark sees identical inputs:

* ours: ``W_enc [d, m]``, ``b_enc [m]``, ``W_dec [m, d]``, ``b_dec [d]`` (concept_ext.sae.model.TopKSAE);
* eai-sparsify 1.3.3 (import name ``sparsify``; never the unrelated PyPI package called ``sparsify``):
  ``SparseCoder`` with ``encoder.weight [m, d]`` (= W_enc^T), ``encoder.bias``, ``W_dec [m, d]``,
  ``b_dec``. ``transcode=True`` turns off its ``x - b_dec`` pre-bias so that the encoder input is the same
  as ours; its loss is the FVU, ``sum (x - x_hat)^2 / sum (x - mean x)^2``;
* SAELens 6.54 ``TopKTrainingSAE`` (dense default path): ``W_enc [d, m]``, ``W_dec [m, d]`` with
  ``apply_b_dec_to_input=False``, ``rescale_acts_by_decoder_norm=False``, no activation normalisation;
  its loss is ``sum (x - x_hat)^2 / B`` (= our FVU times ``sum (x - mean x)^2 / B``).

A peer that cannot be imported is reported by :func:`missing_reason`; the benchmarks skip it with that
reason in smoke mode and fail in full mode (``CONCEPT_EXT_BENCH_FULL=1``): a full run must measure them.
The peers are the optional ``peers`` extra (``pip install -e .[peers]``); none is a runtime dependency.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import io
import os
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["Weights", "PEERS", "missing_reason", "require", "peer_versions", "make_weights",
           "sparsify_coder", "sparsify_step", "sparsify_encode", "sparsify_decode",
           "saelens_sae", "saelens_step", "saelens_encode"]

#: peer name -> (import name, PyPI distribution, pinned requirement of the ``peers`` extra)
PEERS = {
    "sparsify": ("sparsify", "eai-sparsify", "eai-sparsify==1.3.3"),
    "sae_lens": ("sae_lens", "sae-lens", "sae-lens>=6.54,<7"),
    "jenkspy": ("jenkspy", "jenkspy", "jenkspy==0.4.1"),
}

FULL = os.environ.get("CONCEPT_EXT_BENCH_FULL", "0") == "1"


class Weights(NamedTuple):
    """One SAE's parameters in our layout (fp32 unless stated)."""

    W_enc: Tensor
    """``[d, m]`` encoder."""
    b_enc: Tensor
    """``[m]`` encoder bias."""
    W_dec: Tensor
    """``[m, d]`` decoder (unit-norm rows)."""
    b_dec: Tensor
    """``[d]`` decoder bias."""


def make_weights(d: int, m: int, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Weights:
    """Random SAE weights in the usual TopK-SAE init (W_enc = W_dec^T, unit-norm decoder rows)."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    b_enc = torch.randn(m, generator=g) * 0.05
    b_dec = torch.randn(d, generator=g) * 0.05
    return Weights(w_dec.t().contiguous().to(dtype), b_enc.to(dtype), w_dec.to(dtype), b_dec.to(dtype))


_STATE: dict[str, object] = {}


def _import(name: str):
    """Import a peer once, its import-time prints (sparsify's "Triton not installed ...") swallowed."""
    if name in _STATE:
        mod = _STATE[name]
        if isinstance(mod, Exception):
            raise mod
        return mod
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            mod = importlib.import_module(PEERS[name][0])
            if name == "sparsify":
                # The right package: eai-sparsify exposes SparseCoder and the fused encoder.
                importlib.import_module("sparsify.fused_encoder")
                getattr(mod, "SparseCoder")
            if name == "sae_lens":
                importlib.import_module("sae_lens.saes.topk_sae")
    except Exception as exc:  # ImportError, or an unrelated package under the same import name
        _STATE[name] = exc
        raise
    _STATE[name] = mod
    return mod


def missing_reason(name: str) -> Optional[str]:
    """None when the peer imports; else a one-line reason naming how to install it."""
    try:
        _import(name)
    except Exception as exc:
        return (f"peer {name!r} not importable ({type(exc).__name__}: {exc}); install the benchmark "
                f"extra: pip install '{PEERS[name][2]}'")
    return None


def require(name: str) -> None:
    """Skip (smoke mode) or fail (full mode) the calling test when the peer is missing."""
    import pytest

    reason = missing_reason(name)
    if reason is None:
        return
    if FULL:
        pytest.fail(f"CONCEPT_EXT_BENCH_FULL=1 needs every peer: {reason}")
    pytest.skip(reason)


def peer_versions() -> dict[str, Optional[str]]:
    """Installed versions of the peers (None when absent) plus torch."""
    out: dict[str, Optional[str]] = {"torch": torch.__version__}
    for _, (_, dist, _) in PEERS.items():
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


# ------------------------------------------------------------------------------------------ sparsify


def sparsify_coder(w: Weights, k: int):
    """eai-sparsify ``SparseCoder`` holding copies of ``w`` (no pre-bias: ``transcode=True``)."""
    sp = _import("sparsify")
    d, m = w.W_enc.shape
    cfg = sp.SparseCoderConfig(num_latents=m, k=k, transcode=True, normalize_decoder=False)
    coder = sp.SparseCoder(d, cfg, device="cpu", dtype=w.W_enc.dtype)
    with torch.no_grad():
        coder.encoder.weight.copy_(w.W_enc.t())
        coder.encoder.bias.copy_(w.b_enc)
        coder.W_dec.copy_(w.W_dec)
        coder.b_dec.copy_(w.b_dec)
    return coder


def sparsify_step(coder, x: Tensor) -> Tensor:
    """One sparsify training step without the optimiser: forward, FVU, backward. Returns the loss."""
    out = coder(x, x)
    out.fvu.backward()
    return out.fvu.detach()


def sparsify_grads(coder) -> dict[str, Tensor]:
    """The step's gradients in our layout (W_enc as [d, m])."""
    return {"W_enc": coder.encoder.weight.grad.t(), "b_enc": coder.encoder.bias.grad,
            "W_dec": coder.W_dec.grad, "b_dec": coder.b_dec.grad}


def sparsify_encode(coder, x: Tensor) -> tuple[Tensor, Tensor]:
    """Its fused encoder (``F.linear`` + ReLU + ``torch.topk``): values and indices, unsorted."""
    with torch.no_grad():
        out = coder.encode(x)
    return out.top_acts, out.top_indices


def sparsify_decode() -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``decoder_impl(indices, values, W_dec^T)``: Triton on GPU, ``F.embedding_bag`` on CPU."""
    _import("sparsify")
    return importlib.import_module("sparsify.utils").decoder_impl


# ------------------------------------------------------------------------------------------ SAELens


def saelens_sae(w: Weights, k: int):
    """SAELens ``TopKTrainingSAE`` (dense default path) holding copies of ``w``, in ``w``'s dtype."""
    _import("sae_lens")
    topk = importlib.import_module("sae_lens.saes.topk_sae")
    d, m = w.W_enc.shape
    cfg = topk.TopKTrainingSAEConfig(
        d_in=d, d_sae=m, k=k, dtype=str(w.W_enc.dtype).removeprefix("torch."), device="cpu",
        apply_b_dec_to_input=False,
        rescale_acts_by_decoder_norm=False, normalize_activations="none", decoder_init_norm=None,
    )
    sae = topk.TopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(w.W_enc)
        sae.b_enc.copy_(w.b_enc)
        sae.W_dec.copy_(w.W_dec)
        sae.b_dec.copy_(w.b_dec)
    return sae


def saelens_step(sae, x: Tensor) -> Tensor:
    """One SAELens training forward (``training_forward_pass``, no dead latents) and backward."""
    sae_mod = importlib.import_module("sae_lens.saes.sae")
    step = sae_mod.TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0,
                                  is_logging_step=False)
    out = sae.training_forward_pass(step)
    out.loss.backward()
    return out.loss.detach()


def saelens_grads(sae) -> dict[str, Tensor]:
    return {"W_enc": sae.W_enc.grad, "b_enc": sae.b_enc.grad, "W_dec": sae.W_dec.grad, "b_dec": sae.b_dec.grad}


def saelens_encode(sae, x: Tensor) -> Tensor:
    """SAELens' inference encode: the dense ``[N, m]`` code (topk scattered into zeros)."""
    with torch.no_grad():
        return sae.encode(x)
