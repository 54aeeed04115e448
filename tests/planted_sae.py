"""Planted synthetic SAE problem shared by the SAE tests (not a test module)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Planted(NamedTuple):
    """Data = sparse non-negative combinations of known unit directions + noise; labels from a few."""

    h: Tensor  # [N, d]
    labels: Tensor  # [N]
    directions: Tensor  # [n_dirs, d] unit rows
    label_dirs: Tensor  # [C] direction id that decides each class


def planted(
    n: int = 4000,
    d: int = 32,
    n_dirs: int = 48,
    active: int = 3,
    n_classes: int = 3,
    noise: float = 0.02,
    seed: int = 0,
) -> Planted:
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d, generator=gen)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    label_dirs = torch.arange(n_classes)  # directions 0..C-1 carry the label
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    # Each row: its class direction plus `active - 1` others drawn from the non-label directions.
    others = torch.rand(n, n_dirs - n_classes, generator=gen).argsort(1)[:, : active - 1] + n_classes
    idx = torch.cat([label_dirs[labels][:, None], others], 1)  # [N, active]
    coef = 0.5 + torch.rand(n, active, generator=gen)  # non-negative, bounded away from 0
    h = torch.zeros(n, n_dirs).index_put_(
        (torch.arange(n)[:, None].expand_as(idx), idx), coef, accumulate=True
    )
    h = h @ dirs + noise * torch.randn(n, d, generator=gen)
    return Planted(h, labels, dirs, label_dirs)
