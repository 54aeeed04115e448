"""The tiny ClassifSAE trainer that the trainer tests share (test_train.py, test_train_graph.py).

40 rows of d = 8 and two classes; m = 64, k = 2, n = 3; B = 16 for 12 steps with a dead window of 2.
With N_train = 40, ghost grads (most of the 64 latents go dead) and the stop-gradient switch both happen
within the 12 steps.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from concept_ext.config.sae import SAEConfig, TrainConfig
from concept_ext.sae.model import build_sae
from concept_ext.sae.trainer import Trainer


def tiny_data(n: int = 40, seed: int = 1) -> tuple[Tensor, Tensor]:
    """``h [n, 8]`` and labels ``[n]`` in {0, 1}."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=gen) + 0.5, torch.randint(0, 2, (n,), generator=gen)


def tiny_trainer(h: Tensor, y: Optional[Tensor], out_dir: Any = None, **train: Any) -> Trainer:
    """A :class:`Trainer` of the tiny ClassifSAE on ``h``, ``y``; ``train`` overrides TrainConfig fields."""
    scfg = SAEConfig(d=8, m=64, k=2, n_concepts=3, n_classes=2)
    vals: dict[str, Any] = dict(total_samples=16 * 12, batch_size=16, lr=1e-2, dead_window=2, progress=False,
                                device="cpu", log_every=3)
    vals.update(train)
    return Trainer(build_sae(scfg), TrainConfig(**vals), h, y, out_dir=out_dir, metadata={"model_id": "tiny"})
