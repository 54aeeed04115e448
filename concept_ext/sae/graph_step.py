"""The SAE training step as one CUDA graph replay (``TrainConfig.cuda_graph``; issue 8 item 4).

At the paper's sizes (d 512-2048, m = 2d, B 500-2000) a training step is a few hundred small kernels and
its time is mostly launch overhead and host synchronisations. :class:`GraphStep` runs the step of
:meth:`concept_ext.sae.trainer.Trainer.train_step` with everything that changes between steps kept out of the
captured work or held in device tensors:

* host side, per step: the batch ids (``DataOrder``), the copy of the batch into a static ``[B, d]``
  buffer, v1's noise draw into a static buffer (same generator calls as the eager step), the learning
  rate and v1's decay weight written into 0-dim device tensors;
* captured: renormalise W_dec, the losses with fixed-shape dead-latent terms
  (``sae_losses(static=True)``), the firing counters, backward, the W_dec gradient projection, clipping
  and a capturable Adam step, plus a record of the first step whose loss is not finite.

The graph step only captures and replays: the trainer plans each step (:class:`~concept_ext.sae.step.StepPlan`:
batch ids, phase, weight, learning rate) and closes it (step count, last batch) exactly as for the eager
step; :class:`GraphStep` holds no reference to the trainer and writes none of its state.

So a replayed step makes no host synchronisation; :meth:`GraphStep.check` (one synchronisation) runs at
log steps, before every checkpoint and at the end, and raises ``FloatingPointError`` naming the first
bad step. Each (batch rows, stop-gradient phase) pair gets its own graph: oddity 19's alternating
half batches and the two-phase switch give at most four. A graph is captured after ``WARMUP_STEPS``
eager steps of its shape on a side stream (lazy cuBLAS and optimiser state), and those steps count as
training steps. On a CPU device the same step runs eagerly, which is how CI tests it.

A graph holds the addresses of the parameters, the optimiser state and the firing counters: change
them in place (``copy_``), or call :meth:`GraphStep.reset` after replacing them
(:meth:`Trainer.load_state_dict` does). Each graph allocates its own gradients, so ``p.grad`` shows the
gradients of the graph captured last, not necessarily of the last step. The first phase's graphs are
freed at the stop-gradient switch. The dead-latent terms cost a dense ``[B, d] x [d, m]`` product
every step, where the eager step's costs ``[B, |D|]`` and only when some latent is dead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from concept_ext import ops
from concept_ext.config.sae import TrainConfig
from concept_ext.sae.losses import LossOutput, LossTerms, sae_losses
from concept_ext.sae.model import TopKSAE
from concept_ext.sae.state import FiringTracker
from concept_ext.sae.step import StepPlan, update_weights

__all__ = ["GraphStep", "WARMUP_STEPS"]

#: Eager steps of each batch shape before its graph is captured.
WARMUP_STEPS = 2


@dataclass
class _Slot:
    """Static buffers and the graph of one (rows, stop-gradient phase) shape."""

    h: Tensor
    """``[rows, d]`` the batch."""
    labels: Optional[Tensor]
    """``[rows]`` its LLM-predicted labels (None for a plain SAE without labels)."""
    noise: Optional[Tensor]
    """``[rows, d]`` v1's standard-normal input-noise draw (None without input noise)."""
    stopgrad: bool
    """Whether this shape decodes from [sg(z_class), z_ctx]."""
    graph: Optional["torch.cuda.CUDAGraph"] = None
    """The captured step (CUDA, after warm-up)."""
    warm: int = 0
    """Eager steps run so far with this shape."""
    out: Optional[LossOutput] = None
    """The step's outputs (static tensors when captured: valid until the next step of this shape)."""


class GraphStep:
    """Runs training steps as CUDA graph replays (eagerly, with the same code, on CPU).

    Args:
        sae: the module being trained (its parameters are the graph's).
        opt: its Adam optimiser (capturable on CUDA: see ``Trainer``).
        cfg: the recipe.
        firing: the firing counters, updated inside the step.
        with_labels: whether batches carry labels (a ClassifSAE, or a plain SAE given labels).
    """

    def __init__(self, sae: TopKSAE, opt: torch.optim.Optimizer, cfg: TrainConfig, firing: FiringTracker, *,
                 with_labels: bool) -> None:
        self.sae, self.opt, self.cfg, self.firing = sae, opt, cfg, firing
        self.with_labels = with_labels
        dev, dt = sae.W_enc.device, sae.W_enc.dtype
        self.device = dev
        self.capture = dev.type == "cuda"
        #: The step's learning rate, read by the capturable Adam on CUDA (0-dim, the parameters' dtype).
        self.lr = torch.tensor(cfg.lr, dtype=dt, device=dev)
        #: v1's decay weight w(e) of the step (0-dim).
        self.weight = torch.ones((), dtype=dt, device=dev)
        #: The trainer's step count, advanced inside the step (0-dim int64).
        self.step_t = torch.zeros((), dtype=torch.int64, device=dev)
        #: First step whose total loss was not finite (-1: none yet), and its loss terms ``[6]``.
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=dev)
        self.bad_terms = torch.zeros(len(LossTerms._fields), dtype=torch.float32, device=dev)
        self.slots: dict[tuple[int, bool], _Slot] = {}

    def reset(self, step: int) -> None:
        """Forget the captured graphs (after the optimiser state or the weights were replaced), set the
        device step count to ``step`` (the trainer's) and clear the non-finite record (a reloaded state is
        clean)."""
        self.slots.clear()
        self.step_t.fill_(step)
        self.bad_step.fill_(-1)

    # ---------------------------------------------------------------------------------------------

    def _slot(self, rows: int, stopgrad: bool) -> _Slot:
        key = (rows, stopgrad)
        if stopgrad:  # the phase switch is for good (the epoch only grows): free the first phase's graphs
            for old in [kk for kk in self.slots if not kk[1]]:
                del self.slots[old]
        if key not in self.slots:
            d, dev, dt = self.sae.d, self.device, self.sae.W_enc.dtype  # the trainer holds h in this dtype
            self.slots[key] = _Slot(
                h=torch.empty((rows, d), dtype=dt, device=dev),
                labels=torch.empty(rows, dtype=torch.long, device=dev) if self.with_labels else None,
                noise=torch.empty((rows, d), dtype=dt, device=dev) if self.cfg.input_noise > 0 else None,
                stopgrad=stopgrad,
            )
        return self.slots[key]

    def _body(self, slot: _Slot) -> None:
        """Steps (1)-(6) of method.md 2.4 on the slot's buffers: what the graph holds."""
        cfg, sae = self.cfg, self.sae
        with ops.unchecked():  # validated activations, ids from topk_encode: no per-call host checks
            sae.normalize_decoder()  # (1)
            dead = self.firing.dead_mask(cfg.dead_window) if cfg.dead_latents != "none" else None
            out = sae_losses(sae, slot.h, slot.labels, cfg, dead_mask=dead, stopgrad_class=slot.stopgrad,
                             loss_weight=self.weight, static=True, noise=slot.noise)  # (2)
            with torch.no_grad():
                self.firing.count(out.values, out.indices)
                terms = torch.stack([v.detach().float() for v in out.terms])  # [6]
                first = ~torch.isfinite(terms[0]) & (self.bad_step < 0)
                self.bad_step.copy_(torch.where(first, self.step_t, self.bad_step))
                self.bad_terms.copy_(torch.where(first, terms, self.bad_terms))
                self.step_t.add_(1)
            update_weights(sae, self.opt, cfg, out.terms.total)  # (3)-(6)
        slot.out = LossOutput(LossTerms(*(v.detach() for v in out.terms)), out.h_hat.detach(),
                              out.values.detach(), out.indices.detach(),
                              None if out.logits is None else out.logits.detach())

    def _run_cuda(self, slot: _Slot) -> None:
        # Called inside torch.cuda.device(the trainer's device): "current" below is that device's.
        dev = self.device
        if slot.graph is not None:
            slot.graph.replay()
            return
        if slot.warm < WARMUP_STEPS:
            # Warm-up on a side stream, as torch.cuda.graphs asks: cuBLAS workspaces, the allocator,
            # Adam's lazily created state. These are real training steps.
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            try:
                with torch.cuda.stream(side):
                    self._body(slot)
            finally:  # also on an error: a later check() must not read the record before the step wrote it
                torch.cuda.current_stream(dev).wait_stream(side)
            slot.warm += 1
            return
        graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)  # the gradients are allocated inside the graph
        try:
            # An explicit capture stream on the trainer's device: torch.cuda.graph's default one is made
            # once, on whichever device was current the first time.
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device=dev)):  # records the step ...
                self._body(slot)
        except RuntimeError as exc:
            raise RuntimeError(
                f"cuda_graph: capturing the training step (batch {tuple(slot.h.shape)}, stop-gradient "
                f"{slot.stopgrad}) failed: {exc}. Train with TrainConfig.cuda_graph=False"
            ) from exc
        slot.graph = graph
        graph.replay()  # ... which runs it

    def run(self, plan: StepPlan, h: Tensor, labels: Optional[Tensor],
            noise_gen: torch.Generator) -> tuple[LossOutput, Tensor, Optional[Tensor]]:
        """One training step as planned: copy the batch rows ``plan.idx`` of ``h [N, d]`` (and ``labels [N]``)
        into the static buffers, draw v1's noise with ``noise_gen`` (the eager step's draw), write the
        learning rate and the loss weight into their device tensors, then replay (or warm up, or capture).

        Returns the step's outputs and the batch ``([rows, d], [rows])`` it ran on (static buffers:
        overwritten by the next step of the same shape)."""
        rows = int(plan.idx.numel())
        slot = self._slot(rows, plan.stopgrad)
        torch.index_select(h, 0, plan.idx, out=slot.h)
        if slot.labels is not None:
            torch.index_select(labels, 0, plan.idx, out=slot.labels)
        if slot.noise is not None:  # the eager step's torch.randn(..., generator) draw
            slot.noise.normal_(generator=noise_gen)
        if self.capture:  # the capturable Adam reads it (eagerly, the trainer sets the parameter groups)
            self.lr.fill_(plan.lr)
        self.weight.fill_(plan.weight)
        if self.capture:
            with torch.cuda.device(self.device):  # the trainer's GPU, whichever is current
                self._run_cuda(slot)
        else:
            self._body(slot)
        assert slot.out is not None
        return slot.out, slot.h, slot.labels

    def check(self, steps_done: int, cause: Optional[BaseException] = None) -> None:
        """Raise ``FloatingPointError`` if some step's loss was not finite (one host synchronisation);
        ``steps_done``: the trainer's step count, for the message; ``cause``: the error that made us look,
        chained to it."""
        bad = int(self.bad_step)
        if bad >= 0:
            vals = dict(zip(LossTerms._fields, self.bad_terms.tolist()))
            raise FloatingPointError(
                f"non-finite loss at step {bad} (0-based): {vals}; found after {steps_done} steps "
                "(cuda_graph checks at log steps and checkpoints): the weights after step "
                f"{bad} are not usable, resume from the last checkpoint"
            ) from cause
