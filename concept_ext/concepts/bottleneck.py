"""The concept bottleneck shared by ConceptSHAP and HI-Concept (method.md 4.2-4.3), and its training loop.

Parameters, all U(-0.5, 0.5): ``C_vec [d, n]`` (concept vectors as columns), ``W1 [n, hidden]``,
``W2 [hidden, d]``; the reconstruction network is ``g(p) = ReLU(p W1) W2``. Subclasses define the
concept scores and the loss; this module owns the parameters, the epoch/batch loop (Adam, batches of
``batch_size`` from a fresh seeded permutation each epoch, partial last batch dropped), the interface
methods and the checkpoint state.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from concept_ext.concepts.base import ConceptModel, Tail, check_activations, check_labels, n_batches
from concept_ext.config.baselines import BottleneckConfig
from concept_ext.config.build import build_config

logger = logging.getLogger("concept_ext")

__all__ = ["BottleneckNet", "BottleneckConcepts", "Scores", "sim_loss_v2", "far_loss_v2"]


class BottleneckNet(nn.Module):
    """Concept vectors plus the two-layer reconstruction network g."""

    def __init__(self, d: int, n_concepts: int, hidden: int, *, init_range: float = 0.5,
                 generator: Optional[torch.Generator] = None, centred: bool = False) -> None:
        super().__init__()

        def u(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape).uniform_(-init_range, init_range, generator=generator))

        self.C_vec = u(d, n_concepts)  # [d, n]
        self.W1 = u(n_concepts, hidden)  # [n, hidden]
        self.W2 = u(hidden, d)  # [hidden, d]
        # The train mean mu [d] of a centred bottleneck (ConceptSHAP's `center`): scores read h - mu, and
        # g(p) adds mu back. Absent (and absent from the state dict) otherwise.
        self.register_buffer("mu", torch.zeros(d) if centred else None)

    def unit_concepts(self) -> Tensor:  # [d, n]
        """c~: the concept columns normalised to unit L2 norm."""
        return F.normalize(self.C_vec, dim=0)

    def g(self, p: Tensor) -> Tensor:  # [B, n] -> [B, d]
        """Reconstruction network ReLU(p W1) W2 (+ mu when centred)."""
        out = F.relu(p @ self.W1) @ self.W2
        return out if self.mu is None else out + self.mu

    def centred(self, h: Tensor) -> Tensor:  # [B, d] -> [B, d]
        """h - mu for a centred bottleneck, else h."""
        return h if self.mu is None else h - self.mu


class Scores(dict):
    """Per-batch scores: ``S`` raw projections [B, n], ``Sn`` normalised scores [B, n], ``mask`` [B, n]
    bool, ``p`` concept activations [B, n]."""


def sim_loss_v2(sn: Tensor) -> Tensor:  # sn [B, n]
    """-mean of the top-floor(B/4) values of each column of Sn over the batch (method.md 4.2)."""
    k = max(sn.shape[0] // 4, 1)  # floor(B/4); at least one row for tiny test batches
    return -sn.topk(k, dim=0).values.mean()


def far_loss_v2(c_unit: Tensor) -> Tensor:  # c_unit [d, n]
    """mean over all n x n entries of (c~^T c~ - I), signed and unsquared as in the reference (4.2)."""
    gram = c_unit.T @ c_unit
    return (gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)).mean()


def _ratio(masked_s: Tensor, eps: float) -> Tensor:
    # p = (M*S) / (sum_row(M*S) + eps): the reference's normalisation, eps = 1e-3 (method.md 4.2).
    return masked_s / (masked_s.sum(dim=1, keepdim=True) + eps)


class BottleneckConcepts(ConceptModel):
    """Base of the two bottlenecks; ``encode`` gives p, ``reconstruct`` gives g(p) (fed to the tail
    without norm rescale during training), ``directions`` gives the unit concept vectors c~."""

    config_cls: type = BottleneckConfig

    def __init__(self, config: Optional[BottleneckConfig] = None, *, device: Optional[str] = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise TypeError(f"config must be a {self.config_cls.__name__}, got {type(self.config).__name__}")
        self.device = torch.device(device) if device is not None else None
        self.net: Optional[BottleneckNet] = None

    # -- subclass hooks ----------------------------------------------------------------------------

    @abc.abstractmethod
    def scores(self, h: Tensor) -> Scores:  # h [B, d] on the net's device
        """Raw projections, normalised scores, the mask and p for a batch."""

    @abc.abstractmethod
    def batch_loss(self, hb: Tensor, yb: Tensor, tail: Tail, epoch: int,
                   gen: torch.Generator, h_all: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Training loss of one batch and its named parts."""

    # -- interface ---------------------------------------------------------------------------------

    @property
    def n_concepts(self) -> int:
        return self.config.n_concepts

    def _dev(self) -> torch.device:
        return self.net.C_vec.device

    def fit(self, h: Tensor, *, labels: Optional[Tensor] = None, tail: Optional[Tail] = None
            ) -> "BottleneckConcepts":
        """Train on ``h [N, d]`` against ``labels [N]`` (LLM-predicted) through the frozen ``tail``.

        The tail's own parameters should have ``requires_grad=False``; only the bottleneck is optimised.
        """
        cfg = self.config
        if tail is None or not callable(tail):
            raise ValueError("tail must be a callable [P, d] -> [P, C]")
        h = check_activations(h, name="h", min_rows=cfg.batch_size)
        labels = check_labels(labels, h.shape[0], name="labels")
        device = self.device or h.device
        torch.manual_seed(cfg.seed)  # covers any randomness inside a user tail
        gen = torch.Generator().manual_seed(cfg.seed)
        self.d = int(h.shape[1])
        self.net = BottleneckNet(self.d, cfg.n_concepts, cfg.hidden, init_range=cfg.init_range,
                                 generator=gen, centred=cfg.center).to(device)
        self._init_from_data(h, gen)
        with torch.no_grad():
            probe_logits = tail(h[:2].to(device, torch.float32))
        if probe_logits.dim() != 2 or probe_logits.shape[0] != 2:
            raise ValueError(f"tail must map [P, d] -> [P, C]; got {tuple(probe_logits.shape)} for P=2")
        check_labels(labels, h.shape[0], name="labels", n_classes=probe_logits.shape[1])
        x_all = h.to(device, torch.float32)
        y_all = labels.to(device)
        opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        nb = n_batches(x_all.shape[0], cfg.batch_size, quirk=cfg.batches_quirk)
        history: list[dict[str, float]] = []
        bar = tqdm(range(cfg.epochs), desc=self.method, disable=not cfg.progress, leave=False)
        for epoch in bar:
            perm = torch.randperm(x_all.shape[0], generator=gen).to(device)
            sums: dict[str, float] = {}
            for b in range(nb):
                idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                loss, parts = self.batch_loss(x_all[idx], y_all[idx], tail, epoch, gen, x_all)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{self.method}: non-finite loss at epoch {epoch}, batch {b}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for key, val in parts.items():
                    sums[key] = sums.get(key, 0.0) + val
            means = {key: val / max(nb, 1) for key, val in sums.items()}
            history.append(means)
            if means:
                bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}")
        self.selected = list(range(cfg.n_concepts))
        self.info = {"n_train": int(x_all.shape[0]), "batches_per_epoch": nb, "history": history}
        logger.info("%s trained: %d epochs x %d batches", self.method, cfg.epochs, nb)
        return self

    @torch.no_grad()
    def _init_from_data(self, h: Tensor, gen: torch.Generator) -> None:  # h [N, d]
        """The package's options on the start (method.md 4.2 decision): mu for a centred bottleneck, and
        concept columns drawn from the (centred) training rows for ``init="data"``."""
        cfg, net = self.config, self.net
        if net.mu is not None:
            net.mu.copy_(h.double().mean(0).to(net.mu))
        if cfg.init != "data":
            return
        if h.shape[0] < cfg.n_concepts:
            raise ValueError(f"init='data' needs at least n_concepts = {cfg.n_concepts} rows, got {h.shape[0]}")
        rows = torch.randperm(h.shape[0], generator=gen)[: cfg.n_concepts]
        start = net.centred(h[rows].to(net.C_vec)).T  # [d, n]
        # The uniform draw's expected column norm, so that Adam's steps are as large relative to it.
        norm = cfg.init_range * (self.d / 3.0) ** 0.5
        net.C_vec.copy_(F.normalize(start, dim=0) * norm)

    @torch.no_grad()
    def encode(self, h: Tensor) -> Tensor:  # [N, d] -> [N, n] p
        """Concept activations p."""
        self._require_fitted()
        h = check_activations(h, name="h", d=self.d)
        return self.scores(h.to(self._dev(), torch.float32))["p"].to(h.device, h.dtype)

    @torch.no_grad()
    def reconstruct(self, acts: Tensor) -> Tensor:  # [N, n] -> [N, d]
        """g(acts)."""
        self._require_fitted()
        self._check_acts(acts)
        return self.net.g(acts.to(self._dev(), torch.float32)).to(acts.device, acts.dtype)

    @torch.no_grad()
    def directions(self) -> Tensor:  # [n, d]
        """Unit concept vectors c~ as rows (g is nonlinear, so these are the concepts' own vectors)."""
        self._require_fitted()
        return self.net.unit_concepts().T.contiguous().cpu()

    def to(self, device: str | torch.device) -> "BottleneckConcepts":
        """Move the parameters (and future training) to ``device``."""
        self.device = torch.device(device)
        if self.net is not None:
            self.net.to(self.device)
        return self

    def _config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def _state_tensors(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.net.state_dict().items()}

    @classmethod
    def _from_state(cls, config: dict[str, Any], tensors: dict[str, Tensor], **kwargs: Any
                    ) -> "BottleneckConcepts":
        model = cls(build_config(cls.config_cls, config), device=kwargs.get("device"))
        if "C_vec" not in tensors:
            raise ValueError(f"{cls.method} checkpoint lacks tensor 'C_vec'")
        d, n = tensors["C_vec"].shape
        model.net = BottleneckNet(d, n, tensors["W1"].shape[1], centred="mu" in tensors)
        model.net.load_state_dict(tensors)
        if model.device is not None:
            model.net.to(model.device)
        return model
