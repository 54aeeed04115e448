"""What the eager training step and the CUDA-graph step share (method.md 2.4).

:class:`StepPlan` is the host-side decision of one step, made by :meth:`Trainer.begin_step
<concept_ext.sae.trainer.Trainer.begin_step>` before either path runs: the batch ids, the stop-gradient
phase, v1's loss weight and the scheduled learning rate. :func:`update_weights` is steps (3)-(6), which
both paths run (the graph step inside its captured work). Neither path writes the trainer's bookkeeping
itself: the trainer closes every step with :meth:`~concept_ext.sae.trainer.Trainer.end_step`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from concept_ext.config.sae import TrainConfig
from concept_ext.sae.model import TopKSAE

__all__ = ["StepPlan", "update_weights"]


class StepPlan(NamedTuple):
    """One step's host-side decisions (the same for the eager and the graph path)."""

    idx: Tensor
    """``[rows]`` global batch ids (the same on every rank; rows = B, or B/2 on oddity 19's odd steps)."""
    stopgrad: bool
    """Whether this step decodes from [sg(z_class), z_ctx] (v2 second phase)."""
    weight: float
    """v1's decay weight w(e) of the ClassifSAE's non-classifier terms (1 otherwise)."""
    lr: float
    """The scheduled learning rate of this step."""


def update_weights(sae: TopKSAE, opt: torch.optim.Optimizer, cfg: TrainConfig, loss: Tensor) -> None:
    """Steps (3)-(6) of method.md 2.4: backward, project grad W_dec off the decoder rows, clip the gradient
    norm, Adam (the eager step and the CUDA-graph step alike)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()  # (3)
    if cfg.project_decoder_grad:
        sae.project_decoder_grad()  # (4)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)  # (5)
    opt.step()  # (6)
