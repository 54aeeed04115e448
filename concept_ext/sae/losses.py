"""Training losses of ClassifSAE and the plain TopK SAE (method.md sections 2.3, 2.7 and 8).

v2:  L = lambda_mse * (L_mse + L_ghost [+ alpha * L_aux]) + lambda_ar * L_ar + lambda_cls * L_CE
v1:  L = lambda_cls * L_CE + w(e) * (lambda_mse * L_mse + lambda_ar * L_ar + L_ghost'), with input noise
     and the ghost ratio computed from lambda_mse * e (L_ghost' = lambda_mse * L_ghost up to the 1e-6).

Every term is returned separately in :class:`LossTerms`. Everything works on the sparse code
``(values, indices)``; only the |D| dead columns of the pre-activations are ever formed densely (all m
of them, with the live ones masked, in the fixed-shape ``static=True`` form that a CUDA graph holds).

Distributed (torchrun, ``group``: a :class:`distributed.BatchGroup`): each rank holds a slice of the
global batch. Every batch statistic (centring means, normalisers, the L_ar top sets, v1's noise scale) is
taken over the global batch through all-reduce / all-gather, and each term is this rank's *share*: the
shares sum over ranks to the single-process value on the concatenated batch and their gradients sum to
its gradient. With ``group=None`` the code below is exactly the single-process one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, Union

import torch
from torch import Tensor

from concept_ext.config.sae import TrainConfig
from concept_ext.ops import activation_rate_loss, sparse_decode
from concept_ext.sae.model import TopKSAE

if TYPE_CHECKING:
    from concept_ext.distributed import BatchGroup

__all__ = [
    "LossTerms",
    "LossOutput",
    "reconstruction_error",
    "mse_loss",
    "weighted_mse",
    "classifier_loss",
    "ghost_grad_loss",
    "auxk_loss",
    "sae_losses",
]

#: Added to the dense-batch normaliser and to the ghost-grad ratios (SAELens 3.13, method.md 2.3).
EPS = 1e-6


class LossTerms(NamedTuple):
    """Loss terms of one batch (0-dim tensors). ``total`` is the weighted objective that is minimised."""

    total: Tensor
    """The weighted sum actually back-propagated."""
    mse: Tensor
    """L_mse, unweighted."""
    ghost: Tensor
    """L_ghost, unweighted (0 when no latent is dead or ghost grads are off)."""
    auxk: Tensor
    """L_aux of AuxK, unweighted (0 unless ``dead_latents='auxk'`` and some latent is dead)."""
    ar: Tensor
    """L_ar, unweighted."""
    ce: Tensor
    """L_CE on the LLM-predicted labels, unweighted (0 for the plain SAE)."""


class LossOutput(NamedTuple):
    """Losses and the forward results the trainer needs for its statistics."""

    terms: LossTerms
    """The loss terms."""
    h_hat: Tensor
    """``[B, d]`` reconstruction (original scale)."""
    values: Tensor
    """``[B, k]`` sparse code values."""
    indices: Tensor
    """``[B, k]`` sparse code latent ids."""
    logits: Optional[Tensor]
    """``[B, C]`` classifier logits, or None."""


def reconstruction_error(pred: Tensor, target: Tensor, *, normalization: str = "dense_batch",
                         group: "Optional[BatchGroup]" = None) -> Tensor:
    """Element-wise normalised squared error ``e [B, d]``; the loss is ``e.sum(1).mean()``.

    ``"dense_batch"``: ``(pred - target)^2 / (||target_i - mean(target)|| + 1e-6)`` (un-squared norm,
    oddity 9). ``"fvu"``: ``(pred - target)^2 / mean_i ||target_i - mean(target)||^2``, so the loss is the
    fraction of variance unexplained. With ``group`` the means are over the global batch.
    """
    mean = target.mean(0) if group is None else group.mean_rows(target)  # distributed: global mean
    centred = (target - mean).detach()  # the target carries no gradient in any use here
    if normalization == "dense_batch":
        denom = centred.norm(dim=1, keepdim=True) + EPS  # [B, 1]
    elif normalization == "fvu":
        ss = centred.pow(2).sum(1)  # [B]
        denom = (ss.mean() if group is None else group.mean_rows(ss)).clamp_min(EPS)
    else:
        raise ValueError(f"normalization must be 'dense_batch' or 'fvu', got {normalization!r}")
    return (pred - target).pow(2) / denom


def _error_weights(target: Tensor, normalization: str) -> Tensor:
    """``1 / denominator`` of :func:`reconstruction_error`: ``[B]`` per-row weights ("dense_batch") or a
    0-dim weight ("fvu"); no gradient."""
    if normalization not in ("dense_batch", "fvu"):
        raise ValueError(f"normalization must be 'dense_batch' or 'fvu', got {normalization!r}")
    centred = target.detach() - target.detach().mean(0)  # [B, d]
    # Row sums of squares as row dot products: no squared [B, d] temporary (torch's column-wise
    # var(0) took 29-38 ms at B 2000, d 2048 on the 2-core CPU, this 11 ms; torch.profiler).
    sq = torch.einsum("ij,ij->i", centred, centred)  # [B]
    if normalization == "dense_batch":
        return 1.0 / (sq.sqrt() + EPS)
    # mean_i ||t_i - mean||^2, summed in float64 (B terms).
    return (1.0 / (sq.double().mean()).clamp_min(EPS)).to(target.dtype)


class _WeightedSquaredError(torch.autograd.Function):
    """``(1/B) sum_i w_i ||pred_i - target_i||^2`` (= ``mse_loss(reconstruction_error(...))``) in three
    passes over ``[B, d]`` (difference, row dot products, and the scaled difference as the gradient)
    instead of the ~10 of the element-wise form; gradient for ``pred`` only."""

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:
        diff = pred - target  # [B, d]
        sq = torch.einsum("ij,ij->i", diff, diff)  # [B] row sums of squares, no [B, d] temporary
        ctx.save_for_backward(diff, weights)
        return (sq * weights).sum() / pred.shape[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        diff, weights = ctx.saved_tensors
        scale = (2.0 / diff.shape[0]) * grad * weights  # [B] or 0-dim
        # diff is not needed again: scale it in place into the gradient of pred.
        g = diff.mul_(scale[:, None] if scale.dim() else scale)
        return g, None, None


def weighted_mse(pred: Tensor, target: Tensor, *, normalization: str = "dense_batch") -> Tensor:
    """``mse_loss(reconstruction_error(pred, target, normalization=...))`` computed without the
    element-wise ``[B, d]`` errors (for when they are not needed, i.e. no ghost grads)."""
    return _WeightedSquaredError.apply(pred, target.detach(), _error_weights(target, normalization))


def mse_loss(e: Tensor, group: "Optional[BatchGroup]" = None) -> Tensor:
    """L_mse = (1/B) sum_ij e_ij for the element-wise errors ``e [B, d]`` (with ``group``: this rank's
    share)."""
    return e.sum(1).mean() if group is None else e.sum() / group.rows


def classifier_loss(logits: Tensor, labels: Tensor, group: "Optional[BatchGroup]" = None) -> Tensor:
    """L_CE: mean cross-entropy of ``logits [B, C]`` against the LLM-predicted ``labels [B]`` (this rank's
    share of the global mean with ``group``)."""
    if group is None:
        return torch.nn.functional.cross_entropy(logits, labels.long())
    return torch.nn.functional.cross_entropy(logits, labels.long(), reduction="sum") / group.rows


def ghost_grad_loss(
    pre_dead: Tensor,  # [B, |D|] pre-activations of the dead latents (not detached)
    W_dec_dead: Tensor,  # [|D|, d]
    residual: Tensor,  # [B, d] r = h - h_hat
    e: Tensor,  # [B, d] element-wise reconstruction errors of the main term
    *,
    normalization: str = "dense_batch",
    ratio_scale: float = 1.0,
    group: "Optional[BatchGroup]" = None,
) -> Tensor:
    """Ghost-grad loss, SAELens 3.13 form (method.md 2.3).

    ``g = exp(pre_dead) W_dec[D]``, rescaled (without gradient) to half the residual's norm; its
    element-wise error against ``sg(r)`` is weighted by ``sg(ratio_scale * e / (e_g + 1e-6))`` and
    averaged over the ``B*d`` elements. exp is not clamped (oddity 14).
    """
    r = residual.detach()
    g = torch.exp(pre_dead) @ W_dec_dead  # [B, d]
    g = g * (r.norm(dim=1) / (2 * g.norm(dim=1) + EPS)).detach()[:, None]
    e_g = reconstruction_error(g, r, normalization=normalization, group=group)
    ratio = (ratio_scale * e.detach() / (e_g + EPS)).detach()
    if group is not None:  # share of the mean over the global B*d elements
        return (ratio * e_g).sum() / (group.rows * e_g.shape[1])
    return (ratio * e_g).mean()


def auxk_loss(
    pre_dead: Tensor,  # [B, |D|]
    dead_idx: Tensor,  # [|D|] latent ids
    W_dec: Tensor,  # [m, d]
    err: Tensor,  # [B, d] e = x - x_hat in the normalised space
    k_aux: int,
    group: "Optional[BatchGroup]" = None,
) -> Tensor:
    """AuxK (method.md 2.7): reconstruct ``sg(e)`` from the top-``k_aux`` dead pre-activations (ReLU,
    no b_dec); ``||e - e_hat||^2 / ||e - mean(e)||^2`` over the batch."""
    e = err.detach()
    top, pos = pre_dead.topk(k_aux, dim=1)  # [B, k_aux]
    e_hat = sparse_decode(top.relu(), dead_idx[pos], W_dec, W_dec.new_zeros(W_dec.shape[1]))
    if group is not None:  # share: local numerator over the global denominator
        den = group.sum((e - group.mean_rows(e)).pow(2).sum()).clamp_min(EPS)
        return (e - e_hat).pow(2).sum() / den
    return (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(EPS)


def _add_noise(h: Tensor, frac: float, gen: Optional[torch.Generator],
               group: "Optional[BatchGroup]" = None, noise: Optional[Tensor] = None) -> Tensor:
    # v1 input noise (method.md 8): N(0, (frac * sigma)^2) per dimension, sigma = biased batch std >= 1e-3.
    # ``noise``: the standard-normal draw [B, d], made beforehand (the trainer's static step draws it
    # outside its CUDA graph, with the same generator calls, so the numbers are the eager step's).
    if group is None:
        sigma = h.std(0, unbiased=False).clamp_min(1e-3)
        if noise is None:
            noise = torch.randn(h.shape, generator=gen, device=h.device, dtype=h.dtype)
        return h + noise * (frac * sigma)
    # Distributed: the global batch's std, and this rank's rows of the global [B, d] draw (every rank
    # advances its generator by the same B*d numbers, as the single process does).
    mean = group.mean_rows(h)
    sigma = group.mean_rows((h - mean).pow(2)).sqrt().clamp_min(1e-3)
    noise = torch.randn((group.rows, h.shape[1]), generator=gen, device=h.device, dtype=h.dtype)
    return h + noise[group.offset: group.offset + group.local] * (frac * sigma)


def _dead_terms(
    sae: TopKSAE,
    cfg: TrainConfig,
    h: Tensor,  # [B, d] clean batch
    h_hat: Tensor,  # [B, d]
    e: Optional[Tensor],  # [B, d] element-wise errors (ghost grads), else None
    s_clean: Tensor,  # [B] input rescale of the clean batch
    dead_mask: Tensor,  # [m] bool, at least one True unless ``static``
    *,
    static: bool,
    group: "Optional[BatchGroup]" = None,
) -> tuple[Tensor, Tensor]:
    """(L_ghost, L_aux) of the dead set D, from the clean input's pre-activations (the first pass's
    values, method.md 2.3).

    Eager: the |D| dead columns, gathered with ``nonzero`` (a data-dependent shape). ``static`` (what a
    CUDA graph holds): all m columns with the live ones set to -inf, so that they drop out exactly:
    exp(-inf) = 0 in the ghost sum, and relu(-inf) = 0 for the AuxK picks beyond |D| (k_aux = min(d/2, m)
    then picks every dead latent the eager min(d/2, |D|) picks); their gradients are 0. The term is then
    zeroed on the device when no latent is dead, as the eager path skips it. That costs a dense
    ``[B, d] x [d, m]`` product (and its backward) where the eager one is ``[B, |D|]``.
    """
    x_clean = h * s_clean[:, None]  # [B, d]
    if static:
        dead_idx = torch.arange(sae.m, device=h.device)
        pre_dead = sae.preactivations(x_clean).masked_fill(~dead_mask, float("-inf"))  # [B, m]
    else:
        dead_idx = torch.nonzero(dead_mask).squeeze(1)  # [|D|]
        pre_dead = sae.preactivations(x_clean, dead_idx)  # [B, |D|]
    zero = h.new_zeros(())
    if cfg.dead_latents == "ghost":
        assert e is not None
        scale = cfg.lambda_mse if cfg.loss_version == "v1" else 1.0
        w_dead = sae.W_dec if static else sae.W_dec[dead_idx]
        l_ghost = ghost_grad_loss(pre_dead, w_dead, h - h_hat, e, normalization=cfg.mse_normalization,
                                  ratio_scale=scale, group=group)
        return (torch.where(dead_mask.any(), l_ghost, zero) if static else l_ghost), zero
    x_hat = h_hat * s_clean[:, None]  # back to the normalised space
    k_aux = min(sae.d // 2, dead_idx.numel())
    l_aux = auxk_loss(pre_dead, dead_idx, sae.W_dec, x_clean - x_hat, k_aux, group=group)
    return zero, (torch.where(dead_mask.any(), l_aux, zero) if static else l_aux)


def sae_losses(
    sae: TopKSAE,
    h: Tensor,  # [B, d] cached hidden states
    labels: Optional[Tensor],  # [B] LLM-predicted labels (ClassifSAE)
    cfg: TrainConfig,
    *,
    dead_mask: Optional[Tensor] = None,  # [m] bool, dead set D before this step's update
    stopgrad_class: bool = False,
    loss_weight: Union[float, Tensor] = 1.0,
    noise_gen: Optional[torch.Generator] = None,
    group: "Optional[BatchGroup]" = None,
    static: bool = False,
    noise: Optional[Tensor] = None,
) -> LossOutput:
    """Forward pass and every loss term of one batch.

    ``loss_weight`` is v1's decay w(e) (1 in v2). ``stopgrad_class`` selects the second-phase decoding.
    ``group``: distributed step, ``h`` is this rank's slice of the global batch and every term is this
    rank's share (module docstring).
    ``static``: fixed shapes and no host synchronisation (what a CUDA graph can hold): the dead-latent
    terms are formed over all m latents with the live ones masked out (:func:`_dead_terms`), and
    ``loss_weight`` may be a 0-dim tensor. Same values as the eager path up to rounding.
    ``noise``: the v1 input noise's standard-normal draw ``[B, d]`` (drawn here from ``noise_gen`` when
    None).
    """
    if static and group is not None:
        raise ValueError("sae_losses: static=True is single-process only (group must be None)")
    classif = sae.cfg.architecture == "classif_topk"
    h_in = _add_noise(h, cfg.input_noise, noise_gen, group, noise) if cfg.input_noise > 0 else h
    code = sae.encode(h_in)
    h_hat = sae.decode(code.values, code.indices, code.scale, stopgrad_class=stopgrad_class)
    # static: the dead set's size is not looked at (a host synchronisation); the terms handle |D| = 0.
    dead = dead_mask is not None and cfg.dead_latents != "none" and (static or bool(dead_mask.any()))
    if (dead and cfg.dead_latents == "ghost") or group is not None:
        # Ghost grads weight by the element-wise errors e [B, d]; a distributed step needs the global
        # batch's mean for the normaliser, which only the element-wise form takes.
        e = reconstruction_error(h_hat, h, normalization=cfg.mse_normalization, group=group)
        l_mse = mse_loss(e, group)
    else:
        l_mse = weighted_mse(h_hat, h, normalization=cfg.mse_normalization)
    zero = h.new_zeros(())
    l_ghost, l_aux = zero, zero
    if dead:
        s_clean = code.scale if h_in is h else sae.input_scale(h)  # [B]
        l_ghost, l_aux = _dead_terms(sae, cfg, h, h_hat, e if cfg.dead_latents == "ghost" else None, s_clean,
                                     dead_mask, static=static, group=group)
    ar_values = code.values if cfg.lambda_ar != 0 else code.values.detach()
    if group is None:
        l_ar = activation_rate_loss(ar_values, code.indices, sae.m, cfg.target_rate)
    else:
        # Exact global L_ar: the top sets T_j are over the global batch, so every rank evaluates the op on
        # the all-gathered code [B, k] in which only its own rows carry gradient; its share is 1/world of
        # that value with the full gradient for its rows.
        g_values = group.splice(group.gather_rows(ar_values), ar_values)
        g_indices = group.gather_rows(code.indices)
        l_ar = group.share(activation_rate_loss(g_values, g_indices, sae.m, cfg.target_rate))
    logits = sae.classify(code.values, code.indices)
    if classif:
        if labels is None:
            raise ValueError("labels (LLM-predicted classes) are required to train a ClassifSAE")
        l_ce = classifier_loss(logits, labels, group)
    else:
        l_ce = zero
    recon = cfg.lambda_mse * (l_mse + cfg.auxk_alpha * l_aux)
    if cfg.loss_version == "v1":
        total = cfg.lambda_cls * l_ce + loss_weight * (recon + cfg.lambda_ar * l_ar + l_ghost)
    else:
        total = recon + cfg.lambda_mse * l_ghost + cfg.lambda_ar * l_ar + cfg.lambda_cls * l_ce
    return LossOutput(
        LossTerms(total, l_mse, l_ghost, l_aux, l_ar, l_ce), h_hat, code.values, code.indices, logits
    )
