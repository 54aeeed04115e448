"""Training-state helpers of the SAE trainer: lr schedule, firing counters, data order, epoch counter.

Each is a small object whose whole state is a few integers or tensors, so that a checkpoint can restore
it exactly (method.md sections 2.3-2.5).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from concept_ext.sae.checkpoint import FiringStats
from concept_ext.config.sae import TrainConfig

__all__ = ["lr_at", "FiringTracker", "DataOrder", "EpochCounter"]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based ``step`` (method.md 2.4).

    ``"paper"``: cosine from lr to lr_end over the first T - decay_steps steps, then a linear tail
    lr_end * (1 - i/decay_steps) (oddity 10: with T steps and decay_steps = 2 this gives lr_end at
    T-2 and lr_end/2 at T-1). ``"cosine"``: lr_end + (lr - lr_end)(1 + cos(pi t / T))/2.
    """
    T = cfg.total_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return cfg.lr_end + (cfg.lr - cfg.lr_end) * (1 + math.cos(math.pi * step / T)) / 2
    tail = min(cfg.decay_steps, T - 1)
    main = T - tail
    if step < main:
        return cfg.lr_end + (cfg.lr - cfg.lr_end) * (1 + math.cos(math.pi * step / main)) / 2
    return cfg.lr_end * (1 - (step - main) / tail)


class FiringTracker:
    """Per-latent firing counts and steps-since-fired, updated from the sparse code (O(B k))."""

    def __init__(self, m: int, device: Union[str, torch.device]) -> None:
        self.counts = torch.zeros(m, dtype=torch.int64, device=device)  # [m]
        self.steps_since = torch.zeros(m, dtype=torch.int64, device=device)  # [m]
        self.samples_seen = 0

    def dead_mask(self, window: int) -> Tensor:
        """``[m]`` bool: latents that have not fired for more than ``window`` steps."""
        return self.steps_since > window

    def update(self, values: Tensor, indices: Tensor) -> None:
        """Count positive entries of the code ``values/indices [B, k]`` (inactive when <= 0)."""
        self.count(values, indices)
        self.samples_seen += values.shape[0]

    def count(self, values: Tensor, indices: Tensor) -> None:
        """The device half of :meth:`update` (no ``samples_seen``): fixed shapes and no host
        synchronisation, so a CUDA graph can hold it (``bincount`` and boolean indexing would sync)."""
        fired = (values > 0).reshape(-1).to(self.counts.dtype)  # [B k]
        batch = torch.zeros_like(self.counts).index_add_(0, indices.reshape(-1).long(), fired)  # [m]
        self.counts += batch
        self.steps_since.add_(1).masked_fill_(batch > 0, 0)

    def stats(self) -> FiringStats:
        return FiringStats(self.counts.clone(), self.steps_since.clone(), self.samples_seen)

    def rates(self) -> Tensor:
        """``[m]`` per-latent activation rate over the training sentences seen."""
        return self.counts.double() / max(self.samples_seen, 1)


class DataOrder:
    """Batches of row ids from a fresh seeded permutation per pass, wrapping across passes (method.md 2.5).

    The permutation of pass p is drawn from its own generator seeded from (seed, p), so the state is just
    (pass, position).
    """

    def __init__(self, n: int, seed: int, device: Union[str, torch.device]) -> None:
        self.n, self.seed, self.device = n, seed, device
        self.pass_idx, self.pos = 0, 0
        self._perm: Optional[Tensor] = None

    def _permutation(self) -> Tensor:
        if self._perm is None:
            gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.pass_idx)
            self._perm = torch.randperm(self.n, generator=gen).to(self.device)
        return self._perm

    def next(self, rows: int) -> Tensor:
        """The next ``rows`` row ids ``[rows]``."""
        parts = []
        while rows > 0:
            perm = self._permutation()
            take = min(rows, self.n - self.pos)
            parts.append(perm[self.pos : self.pos + take])
            self.pos += take
            rows -= take
            if self.pos == self.n:
                self.pass_idx, self.pos, self._perm = self.pass_idx + 1, 0, None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state(self) -> dict[str, int]:
        return {"pass": self.pass_idx, "pos": self.pos}

    def load(self, state: dict[str, int]) -> None:
        self.pass_idx, self.pos, self._perm = int(state["pass"]), int(state["pos"]), None


class EpochCounter:
    """The epoch counter of method.md 2.3: before each step add B; on reaching N_train, subtract it and
    count an epoch. It decides the two-phase switch (and v1's decay)."""

    def __init__(self, n_train: int) -> None:
        self.n_train = n_train
        self.count, self.epoch = 0, 0

    def advance(self, batch_size: int) -> int:
        """Account for one step of ``batch_size`` samples; returns the epoch for that step."""
        self.count += batch_size
        while self.count >= self.n_train:
            self.count -= self.n_train
            self.epoch += 1
        return self.epoch
