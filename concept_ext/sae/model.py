"""TopK sparse autoencoder and ClassifSAE (method.md sections 2.1-2.2).

The sparse code is always kept as ``(values [N, k], indices [N, k])``: encoding, decoding, the classifier
head and the losses work on it directly through the ``concept_ext`` ops, never on a dense ``[N, m]``
matrix. :func:`dense_code` builds the dense matrix for users who want it.

Inputs may have any leading shape ``[..., d]``; they are flattened internally and outputs get the same
leading shape back.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from concept_ext.config.sae import SAEConfig
from concept_ext.ops import sparse_decode, topk_encode

__all__ = ["SparseCode", "SAEOutput", "TopKSAE", "ClassifSAE", "build_sae", "dense_code"]


class SparseCode(NamedTuple):
    """Output of :meth:`TopKSAE.encode`."""

    values: Tensor
    """``[..., k]`` ReLU'd TopK activations, sorted descending (0 = inactive)."""
    indices: Tensor
    """``[..., k]`` int64 latent ids."""
    scale: Tensor
    """``[...]`` per-sample input rescale s = sqrt(d)/||h|| (ones when normalize='none')."""


class SAEOutput(NamedTuple):
    """Output of :meth:`TopKSAE.forward`."""

    h_hat: Tensor
    """``[..., d]`` reconstruction in the input's scale (x_hat / s)."""
    values: Tensor
    """``[..., k]`` activations of the sparse code."""
    indices: Tensor
    """``[..., k]`` latent ids of the sparse code."""
    scale: Tensor
    """``[...]`` the per-sample rescale s."""
    logits: Optional[Tensor]
    """``[..., C]`` classifier logits (ClassifSAE), else None."""


def dense_code(values: Tensor, indices: Tensor, m: int) -> Tensor:
    """The dense code ``z [..., m]`` of a sparse one (for analysis; the training path never builds it)."""
    z = values.new_zeros((*values.shape[:-1], m))
    return z.scatter_add(-1, indices.long(), values)


def _kaiming_uniform(shape: tuple[int, int], gen: torch.Generator) -> Tensor:
    # torch's kaiming_uniform_ defaults (a = 0, fan_in = shape[1], leaky_relu gain sqrt(2)):
    # U(-sqrt(6/fan_in), sqrt(6/fan_in)), method.md 2.2. Called exactly as the reference does, so that
    # the bound (and hence every drawn bit) is the same.
    return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.float32), generator=gen)


class TopKSAE(nn.Module):
    """Plain TopK SAE with the per-sample sqrt(d) input rescale (method.md 2.1).

    Parameters: ``W_enc [d, m]``, ``b_enc [m]``, ``W_dec [m, d]`` (unit-norm rows), ``b_dec [d]``.

    Optional pre-encoder centring (package decision, method.md 2.1): with a centre ``mu [d]`` set
    (:meth:`set_center`, done by the trainer from the training data when ``TrainConfig.center`` asks for
    it), the encoder reads ``pre = (x - mu) W_enc + b_enc``; decoding is unchanged (``x_hat = z W_dec +
    b_dec``, with b_dec initialised to mu). ``center`` is a buffer: saved in checkpoints, not trained.
    """

    center: Optional[Tensor]

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, m = cfg.d, cfg.m
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        # Draw order of method.md 2.2 (bit parity with the reference under its seed): b_enc zeros;
        # W_dec kaiming (m, d); W_enc kaiming (d, m), drawn and discarded; b_dec zeros; then the head.
        b_enc = torch.zeros(m)
        w_dec = _kaiming_uniform((m, d), gen)
        _kaiming_uniform((d, m), gen)  # discarded: W_enc is overwritten by W_dec^T
        w_enc = w_dec.t().clone()  # copied before the decoder rows are normalised
        b_dec = torch.zeros(d)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        dt = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(w_enc.to(dt))
        self.b_enc = nn.Parameter(b_enc.to(dt))
        self.W_dec = nn.Parameter(w_dec.to(dt))
        self.b_dec = nn.Parameter(b_dec.to(dt))
        self.register_buffer("center", None)  # [d] or None: pre-encoder centring off (the reference)
        self._init_head(gen)

    def _init_head(self, gen: torch.Generator) -> None:
        """No head on the plain SAE."""

    def set_center(self, mu: Optional[Tensor]) -> None:
        """Turn pre-encoder centring on with the centre ``mu [d]`` (in the rescaled input space x = s*h),
        or off with None. The trainer calls it once before the first step; checkpoints restore it."""
        if mu is None:
            self.center = None
            return
        if not isinstance(mu, Tensor) or mu.shape != (self.d,):
            got = tuple(mu.shape) if isinstance(mu, Tensor) else type(mu).__name__
            raise ValueError(f"center must be a tensor of shape [d = {self.d}], got {got}")
        if not bool(torch.isfinite(mu).all()):
            raise ValueError("center must be finite")
        self.center = mu.detach().to(self.W_dec.device, self.W_dec.dtype).clone()

    @torch.no_grad()
    def fit_center(self, h: Tensor, method: str = "mean", *, chunk: int = 65536) -> Tensor:
        """Set the centre from training activations ``h [N, d]`` (rescaled first, as :meth:`encode` does)
        and initialise b_dec to it; returns mu ``[d]``. ``method``: ``"mean"`` or ``"geometric_median"``
        (Weiszfeld iterations from the mean, 64 at most). Accumulates in float64, chunk by chunk."""
        flat, _ = self._flatten(h)
        if flat.shape[0] == 0:
            raise ValueError("fit_center needs at least one activation row")
        if method not in ("mean", "geometric_median"):
            raise ValueError(f"method must be 'mean' or 'geometric_median', got {method!r}")

        def rows():  # rescaled inputs x = s*h in float64, [<=chunk, d] at a time
            for i in range(0, flat.shape[0], chunk):
                part = flat[i:i + chunk].double()
                yield part if self.cfg.normalize == "none" else part * self.input_scale(part)[:, None]

        mu = sum(x.sum(0) for x in rows()) / flat.shape[0]  # [d]
        if method == "geometric_median":
            for _ in range(64):  # Weiszfeld: mu <- sum(x_i/|x_i-mu|) / sum(1/|x_i-mu|)
                num, den = torch.zeros_like(mu), mu.new_zeros(())
                for x in rows():
                    w = 1.0 / (x - mu).norm(dim=1).clamp_min(1e-12)  # [chunk]
                    num += (w[:, None] * x).sum(0)
                    den += w.sum()
                new = num / den
                done = float((new - mu).norm()) <= 1e-7 * max(float(mu.norm()), 1e-12)
                mu = new
                if done:
                    break
        self.set_center(mu)
        self.b_dec.copy_(mu.to(self.b_dec.dtype))
        return self.center

    def _centered(self, x: Tensor) -> Tensor:  # x: [N, d] rescaled inputs -> x - mu
        return x if self.center is None else x - self.center

    # ---------------------------------------------------------------------------------------------

    @property
    def d(self) -> int:
        return self.cfg.d

    @property
    def m(self) -> int:
        return self.cfg.m

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def n_concepts(self) -> int:
        """n: latents 0..n-1 form z_class."""
        return self.cfg.n_concepts

    def _flatten(self, h: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        if not isinstance(h, Tensor):
            raise TypeError(f"h must be a torch.Tensor, got {type(h).__name__}")
        if h.dim() < 1 or h.shape[-1] != self.d:
            raise ValueError(f"h must have shape [..., d] with d = {self.d}, got {tuple(h.shape)}")
        return h.reshape(-1, self.d), tuple(h.shape[:-1])

    def input_scale(self, h: Tensor) -> Tensor:  # h: [N, d] -> [N]
        """s = sqrt(d)/||h|| per row ("constant_norm_rescale"), or ones."""
        if self.cfg.normalize == "none":
            return h.new_ones(h.shape[0])
        return math.sqrt(self.d) / h.norm(dim=1).clamp_min(1e-12)  # an all-zero row stays 0

    def encode(self, h: Tensor) -> SparseCode:
        """Rescale ``h [..., d]`` and keep the top-k ReLU'd pre-activations: a :class:`SparseCode`."""
        flat, lead = self._flatten(h)
        s = self.input_scale(flat)
        # normalize='none': s is all ones, so skip the [N, d] multiply (one read and write of the batch).
        x = flat if self.cfg.normalize == "none" else flat * s[:, None]
        values, indices = topk_encode(self._centered(x), self.W_enc, self.b_enc, self.cfg.k)
        k = self.cfg.k
        return SparseCode(values.reshape(*lead, k), indices.reshape(*lead, k), s.reshape(lead))

    def preactivations(self, x: Tensor, latents: Optional[Tensor] = None) -> Tensor:
        """``pre[:, latents] = (x - mu) @ W_enc[:, latents] + b_enc[latents]`` for rescaled inputs ``x [N, d]``
        (mu: the centre, when set): ``[N, |latents|]``, or ``[N, m]`` for all latents when ``latents`` is
        None (the dead columns needed by ghost grads / AuxK; differentiable)."""
        x = self._centered(x)
        if latents is None:
            return torch.addmm(self.b_enc, x, self.W_enc)
        return torch.addmm(self.b_enc[latents], x, self.W_enc[:, latents])

    def decode(
        self,
        values: Tensor,  # [..., k]
        indices: Tensor,  # [..., k]
        scale: Optional[Tensor] = None,  # [...]
        *,
        stopgrad_class: bool = False,
    ) -> Tensor:
        """``h_hat [..., d] = (sum_j values_j W_dec[indices_j] + b_dec) / scale``.

        With ``stopgrad_class`` the z_class entries (indices < n_concepts) are detached first: the
        second-phase decoding of method.md 2.3 (W_dec still gets their reconstruction gradient).
        """
        lead = tuple(values.shape[:-1])
        v = values.reshape(-1, values.shape[-1])
        idx = indices.reshape(-1, indices.shape[-1])
        if stopgrad_class and self.cfg.n_concepts > 0:
            v = torch.where(idx < self.cfg.n_concepts, v.detach(), v)
        x_hat = sparse_decode(v, idx, self.W_dec, self.b_dec)  # [N, d]
        if scale is not None and self.cfg.normalize != "none":  # normalize='none': the scale is all ones
            x_hat = x_hat / scale.reshape(-1)[:, None]
        return x_hat.reshape(*lead, self.d)

    def classify(self, values: Tensor, indices: Tensor) -> Optional[Tensor]:
        """Classifier logits from the sparse code (None for the plain SAE)."""
        return None

    def z_class(self, values: Tensor, indices: Tensor) -> Tensor:
        """``[..., n]`` dense z_class (latents 0..n-1) from the sparse code, differentiable in ``values``."""
        n = self.cfg.n_concepts
        idx = indices.long()
        # Entries outside z_class go to a spare column n that is dropped (indices in a row are distinct).
        col = torch.where(idx < n, idx, torch.full_like(idx, n))
        z = values.new_zeros((*values.shape[:-1], n + 1)).scatter_add(-1, col, values)
        return z[..., :n]

    def forward(self, h: Tensor, *, stopgrad_class: bool = False) -> SAEOutput:
        """Encode, decode back to the input's scale and (ClassifSAE) classify. ``h``: ``[..., d]``."""
        code = self.encode(h)
        h_hat = self.decode(code.values, code.indices, code.scale, stopgrad_class=stopgrad_class)
        return SAEOutput(
            h_hat, code.values, code.indices, code.scale, self.classify(code.values, code.indices)
        )

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every row of W_dec to unit norm (step (1) of method.md 2.4)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from grad W_dec its component parallel to each (unit-norm) row (step (4))."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        g.sub_((g * w).sum(1, keepdim=True) * w)


class ClassifSAE(TopKSAE):
    """TopK SAE plus a linear head on z_class = the first n latents (method.md 2.1 step 6).

    Extra parameters: ``W_c [C, n]``, ``b_c [C]``. ``logits = z_class W_c^T + b_c``.
    """

    def _init_head(self, gen: torch.Generator) -> None:
        cfg = self.cfg
        dt = getattr(torch, cfg.dtype)
        self.W_c = nn.Parameter(_kaiming_uniform((cfg.n_classes, cfg.n_concepts), gen).to(dt))
        self.b_c = nn.Parameter(torch.zeros(cfg.n_classes, dtype=dt))

    def classify(self, values: Tensor, indices: Tensor) -> Tensor:
        """``[..., C]`` logits from the post-TopK z_class (b_c when no z_class latent fires)."""
        return nn.functional.linear(self.z_class(values, indices), self.W_c, self.b_c)


def build_sae(cfg: SAEConfig) -> TopKSAE:
    """The module for ``cfg.architecture``: :class:`ClassifSAE` or :class:`TopKSAE`."""
    return ClassifSAE(cfg) if cfg.architecture == "classif_topk" else TopKSAE(cfg)
