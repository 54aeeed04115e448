"""SAE trainer (method.md sections 2.3-2.5): schedule, step order, data order, epoch switch, resume.

Each step: (1) renormalise the decoder rows; (2) forward and losses, firing counters; (3) backward;
(4) project grad W_dec orthogonally to the rows; (5) clip the gradient norm; (6) Adam step with the
scheduled learning rate. Same seed => same weights on CPU; a resumed run equals an uninterrupted one.

Under torchrun (``distributed.enabled()``) the step is data-parallel over the *global* batch: every rank
draws the same global batch ids, keeps its contiguous slice (``distributed.shard_range``), and the losses
take their batch statistics over the global batch (``losses`` with a ``BatchGroup``; L_ar on the
all-gathered code). ``DistributedDataParallel`` all-reduces the gradients, so (2)-(6) see the gradient of
the single-process loss on the concatenated batch and every rank holds the same weights; the firing
counters are updated from the all-gathered code. Only rank 0 writes checkpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from concept_ext import distributed, ops
from concept_ext.sae.checkpoint import FiringStats, checkpoint_name, load_checkpoint, save_checkpoint
from concept_ext.config.sae import SAEConfig, TrainConfig, resolve_device
from concept_ext.sae.losses import LossOutput, sae_losses
from concept_ext.sae.model import TopKSAE, build_sae
from concept_ext.sae.graph_step import GraphStep
from concept_ext.sae.state import DataOrder, EpochCounter, FiringTracker, lr_at
from concept_ext.sae.step import StepPlan, update_weights

logger = logging.getLogger("concept_ext")

__all__ = ["lr_at", "FiringTracker", "DataOrder", "EpochCounter", "TrainResult", "Trainer", "train_sae"]


class TrainResult(NamedTuple):
    """Output of :meth:`Trainer.train`."""

    sae: TopKSAE
    """The trained module."""
    history: list[dict[str, float]]
    """Logged metrics, one dict per log step (loss terms, L0, explained variance, dead fraction, lr)."""
    firing: FiringStats
    """Firing statistics at the end."""
    checkpoint: Optional[Path]
    """The last checkpoint written, if any."""
    steps: int
    """Steps done so far (out of cfg.total_steps)."""


class Trainer:
    """Trains a :class:`TopKSAE`/:class:`ClassifSAE` on cached activations held on the device.

    Args:
        sae: the module (its config decides ClassifSAE vs plain SAE).
        cfg: the recipe.
        activations: ``[N, d]`` cached hidden states.
        labels: ``[N]`` LLM-predicted labels (required for a ClassifSAE).
        out_dir: where checkpoints go (none are written without it).
        metadata: provenance recorded in checkpoints (model_id, hook_layer, class_names, ...).
    """

    def __init__(
        self,
        sae: TopKSAE,
        cfg: TrainConfig,
        activations: Tensor,
        labels: Optional[Tensor] = None,
        *,
        out_dir: Optional[Union[str, Path]] = None,
        metadata: Optional[dict[str, Any]] = None,
    ) -> None:
        if activations.dim() != 2 or activations.shape[1] != sae.d:
            raise ValueError(f"activations must have shape [N, d = {sae.d}], got {tuple(activations.shape)}")
        if sae.cfg.architecture == "classif_topk":
            if labels is None:
                raise ValueError(
                    "labels (LLM-predicted classes, shape [N]) are required to train a ClassifSAE"
                )
        if labels is not None:
            if labels.shape != (activations.shape[0],):
                raise ValueError(
                    f"labels must have shape [N = {activations.shape[0]}], got {tuple(labels.shape)}"
                )
            if (
                sae.cfg.architecture == "classif_topk"
                and labels.numel()
                and (int(labels.min()) < 0 or int(labels.max()) >= sae.cfg.n_classes)
            ):
                raise ValueError(f"labels must lie in [0, n_classes = {sae.cfg.n_classes})")
        self.cfg = cfg
        self.device = torch.device(resolve_device(cfg.device))
        self.sae = sae.to(self.device)
        self.h = activations.to(self.device, sae.W_enc.dtype)  # [N, d], held on the device
        # Validated once here, so that the steps can run the ops without their per-call data checks
        # (each one a host synchronisation on CUDA); a non-finite weight still shows up as a non-finite
        # loss, which every step checks.
        ops.check_finite(self.h, "activations")
        self.labels = labels.to(self.device).long() if labels is not None else None  # [N]
        if cfg.center != "none" and sae.center is None:
            # Pre-encoder centring (method.md 2.1, package decision): mu from the whole training set, set
            # once before the first step (every rank holds the same activations, so the same mu); a resumed
            # or pre-centred SAE keeps the centre it has.
            sae.fit_center(self.h, cfg.center)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.metadata = dict(metadata or {})
        if cfg.cuda_graph and distributed.enabled():
            raise ValueError("TrainConfig.cuda_graph is single-process only: turn it off under torchrun")
        self._graph: Optional[GraphStep] = None
        self.opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        self.firing = FiringTracker(sae.m, self.device)
        self.order = DataOrder(self.n_train, cfg.seed, self.device)
        self.step = 0
        self.epochs = EpochCounter(self.n_train)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.history: list[dict[str, float]] = []
        self._last_batch: tuple[Tensor, Optional[Tensor]] = (self.h[:0], None)
        self.last_checkpoint: Optional[Path] = None
        # Distributed: DDP over a module whose forward is sae_losses (broadcasts rank 0's weights now).
        self._group: Optional[distributed.BatchGroup] = None
        self._ddp = distributed.wrap_ddp(distributed.LossModule(self.sae, sae_losses)) if (
            distributed.enabled()) else None
        if cfg.cuda_graph:
            self._graph = GraphStep(self.sae, self.opt, cfg, self.firing, with_labels=self.labels is not None)
            self._fit_optimizer_state()

    # --------------------------------------------------------------------------------------------

    @property
    def n_train(self) -> int:
        return self.h.shape[0]

    @property
    def e_total(self) -> int:
        """E_total = floor(total_samples / N_train) (at least 1)."""
        return max(1, self.cfg.total_samples // self.n_train)

    @property
    def epoch(self) -> int:
        """Current value of the epoch counter."""
        return self.epochs.epoch

    @property
    def stopgrad_active(self) -> bool:
        """Whether this step decodes from [sg(z_class), z_ctx] (v2 second phase)."""
        c = self.cfg
        applies = self.sae.cfg.architecture == "classif_topk" or c.stopgrad_plain_sae
        return c.loss_version == "v2" and c.stopgrad_class and applies and self.epoch >= self.e_total // 2

    def _rows(self) -> int:
        if self.cfg.alternate_half_batches and self.step % 2 == 1:
            return self.cfg.batch_size // 2  # oddity 19: 2000- and 1000-row batches alternate
        return self.cfg.batch_size

    def _loss_weight(self) -> float:
        """v1's linear decay w(e) of the ClassifSAE's non-classifier terms (1 otherwise)."""
        if self.cfg.loss_version == "v1" and self.sae.cfg.architecture == "classif_topk":
            return max(0.0, 1.0 - self.epoch / self.e_total)
        return 1.0

    def check_finite(self) -> None:
        """With ``cuda_graph``: raise ``FloatingPointError`` if a step since the start had a non-finite loss
        (the eager step checks every step itself, so this does nothing there)."""
        if self._graph is not None:
            self._graph.check(self.step)

    def begin_step(self) -> StepPlan:
        """The host-side start of every step, eager or graph: count the epoch, draw the batch ids, decide
        the phase and the loss weight, and set the scheduled learning rate."""
        self.epochs.advance(self.cfg.batch_size)  # counts B per step (nominal under oddity 19)
        idx = self.order.next(self._rows())  # [B] global batch ids (the same on every rank)
        plan = StepPlan(idx, self.stopgrad_active, self._loss_weight(), lr_at(self.step, self.cfg))
        if not self._capturable:  # the graph step writes it into the device tensor that Adam reads
            for group in self.opt.param_groups:
                group["lr"] = plan.lr
        return plan

    def end_step(self, h: Tensor, labels: Optional[Tensor]) -> None:
        """The end of every step, eager or graph: remember its batch ``h [rows, d]``, ``labels [rows]`` (for
        the metrics of log steps) and count it."""
        self._last_batch = (h, labels)
        self.step += 1

    def train_step(self) -> LossOutput:
        """One optimisation step (method.md 2.4 order). Raises FloatingPointError on a non-finite loss
        (with ``cuda_graph``, at the next :meth:`check_finite` instead: log steps, checkpoints, the end).
        With ``cuda_graph`` the returned tensors are overwritten by a later step of the same shape."""
        plan = self.begin_step()
        if self._graph is not None:
            try:
                out, h, labels = self._graph.run(plan, self.h, self.labels, self.noise_gen)
            except RuntimeError as exc:  # e.g. the CPU encoder's NaN check, after an unchecked bad step
                self._graph.check(self.step, cause=exc)
                raise
            self.firing.samples_seen += h.shape[0]  # the graph counts firings on the device only
            self.end_step(h, labels)
            return out
        cfg, sae = self.cfg, self.sae
        sae.normalize_decoder()  # (1)
        idx = plan.idx
        group = None
        if self._ddp is not None:  # distributed: this rank's contiguous slice of the global batch
            group = self._group = distributed.BatchGroup(idx.numel())
            idx = idx[group.offset: group.offset + group.local]
        h = self.h[idx]
        labels = self.labels[idx] if self.labels is not None else None
        dead = self.firing.dead_mask(cfg.dead_window) if cfg.dead_latents != "none" else None
        opts = dict(dead_mask=dead, stopgrad_class=plan.stopgrad, loss_weight=plan.weight,
                    noise_gen=self.noise_gen)
        with ops.unchecked():  # the codes come from topk_encode on validated activations
            if group is None:
                out = sae_losses(sae, h, labels, cfg, **opts)  # (2)
            else:  # through DDP, whose forward is sae_losses(sae, ...)
                out = self._ddp(h, labels, cfg, group=group, **opts)  # (2)
        backward = out.terms.total
        if group is not None:
            # The terms are this rank's shares: report the global values (the same on every rank, so a
            # non-finite loss stops every rank at once). DDP averages gradients over ranks, and the shares'
            # gradients must be summed: hence the factor world.
            backward = out.terms.total * group.world
            terms = out.terms._make(group.sum(torch.stack([t.detach() for t in out.terms])).unbind())
            out = out._replace(terms=terms)
        if not bool(torch.isfinite(out.terms.total)):
            vals = {k: float(v.detach()) for k, v in out.terms._asdict().items()}
            raise FloatingPointError(f"non-finite loss at step {self.step} (0-based): {vals}")
        with torch.no_grad():
            if group is None:
                self.firing.update(out.values, out.indices)
            else:  # the counters (and so the dead set) follow the global batch on every rank
                self.firing.update(group.gather_rows(out.values), group.gather_rows(out.indices))
        update_weights(sae, self.opt, cfg, backward)  # (3)-(6)
        self.end_step(h, labels)
        return out

    @property
    def _capturable(self) -> bool:
        """cuda_graph on CUDA: Adam is capturable and reads the learning rate from the graph's device tensor."""
        return self._graph is not None and self._graph.capture

    @torch.no_grad()
    def _metrics(self, out: LossOutput) -> dict[str, float]:
        h, labels = self._last_batch
        m = {f"loss/{k}": float(v) for k, v in out.terms._asdict().items()}
        g = self._group
        if g is not None:  # distributed: the same statistics over the global batch
            resid = g.sum((h - out.h_hat).pow(2).sum())
            var = g.sum((h - g.mean_rows(h)).pow(2).sum())
            m["explained_variance"] = float(1 - resid / var.clamp_min(1e-12))
            m["l0"] = float(g.sum((out.values > 0).sum().float()) / g.rows)
        else:
            resid = (h - out.h_hat).pow(2).sum()
            m["explained_variance"] = float(1 - resid / (h - h.mean(0)).pow(2).sum().clamp_min(1e-12))
            m["l0"] = float((out.values > 0).sum(1).float().mean())
        dead = self.firing.dead_mask(self.cfg.dead_window)  # [m] bool
        m["dead_fraction"] = float(dead.float().mean())
        if self.sae.cfg.architecture == "classif_topk":  # z_class survival over time (issue 21: no silent collapse)
            m["live_class"] = float((~dead[: self.sae.n_concepts]).sum())
        m["lr"] = lr_at(self.step - 1, self.cfg)
        m.update(step=float(self.step), epoch=float(self.epoch), stopgrad=float(self.stopgrad_active))
        if out.logits is not None and labels is not None:
            if g is not None:
                m["head_acc"] = float(g.sum((out.logits.argmax(1) == labels).sum().float()) / g.rows)
            else:
                m["head_acc"] = float((out.logits.argmax(1) == labels).float().mean())
        return m

    def train(self, *, steps: Optional[int] = None) -> TrainResult:
        """Run until cfg.total_steps (or ``steps`` more steps), logging and checkpointing on the way."""
        cfg = self.cfg
        stop = cfg.total_steps if steps is None else min(cfg.total_steps, self.step + steps)
        run = self._wandb()
        bar = tqdm(
            total=cfg.total_steps, initial=self.step, disable=not cfg.progress, desc="SAE", unit="step"
        )
        self.sae.train()
        try:
            while self.step < stop:
                out = self.train_step()
                if self.step % cfg.log_every == 0 or self.step == stop:
                    self.check_finite()
                    metrics = self._metrics(out)
                    self.history.append(metrics)
                    bar.set_postfix(
                        loss=f"{metrics['loss/total']:.4g}",
                        ev=f"{metrics['explained_variance']:.3f}",
                        dead=f"{metrics['dead_fraction']:.3f}",
                    )
                    logger.debug("step %d: %s", self.step, metrics)
                    if run is not None:
                        run.log(metrics, step=self.step)
                bar.update(1)
                every = cfg.checkpoint_every
                done = self.step * cfg.batch_size
                if (
                    self.out_dir is not None
                    and every > 0
                    and done // every > (done - cfg.batch_size) // every
                ):
                    self.save(self.out_dir / checkpoint_name(done))
            final = (
                None if self.out_dir is None else self.out_dir / checkpoint_name(self.step * cfg.batch_size)
            )
            if final is not None and self.step == cfg.total_steps and self.last_checkpoint != final:
                self.save(final)
        finally:
            bar.close()
            if run is not None:
                run.finish()
        return TrainResult(self.sae, self.history, self.firing.stats(), self.last_checkpoint, self.step)

    def _wandb(self) -> Any:
        if not self.cfg.wandb:
            return None
        try:
            import dataclasses

            import wandb  # optional dependency

            return wandb.init(
                project=self.cfg.wandb_project,
                config={"train": dataclasses.asdict(self.cfg), "sae": dataclasses.asdict(self.sae.cfg)},
            )
        except Exception as exc:  # noqa: BLE001 - wandb problems must never stop training
            logger.warning("wandb logging disabled: %s", exc)
            return None

    # --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything beyond the weights needed for an exact resume."""
        state = {
            "step": self.step,
            "epoch": self.epochs.epoch,
            "sample_count": self.epochs.count,
            "order": self.order.state(),
            "optimizer": self._portable_optimizer_state(),
            "noise_rng": self.noise_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "samples_seen": self.firing.samples_seen,
            "counts": self.firing.counts.cpu(),
            "steps_since": self.firing.steps_since.cpu(),
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epochs.epoch, self.epochs.count = int(state["epoch"]), int(state["sample_count"])
        self.order.load(state["order"])
        self.opt.load_state_dict(state["optimizer"])
        self._fit_optimizer_state()
        self.noise_gen.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.firing.counts.copy_(state["counts"])
        self.firing.steps_since.copy_(state["steps_since"])
        self.firing.samples_seen = int(state["samples_seen"])
        if self._graph is not None:  # the optimiser's state tensors were replaced: capture again
            self._graph.reset(self.step)

    def _portable_optimizer_state(self) -> dict[str, Any]:
        """The optimiser's state_dict in the eager trainer's form (float lr, step counts on the CPU, not
        capturable), whichever mode saved it, so that a checkpoint resumes in either mode."""
        sd = self.opt.state_dict()
        groups = [dict(g, lr=float(g["lr"]), capturable=False) for g in sd["param_groups"]]
        state = {i: {k: (v.detach().cpu() if k == "step" and isinstance(v, Tensor) else v) for k, v in st.items()}
                 for i, st in sd["state"].items()}
        return {"state": state, "param_groups": groups}

    def _fit_optimizer_state(self) -> None:
        """This trainer's optimiser mode, at construction and after a load. cuda_graph on CUDA: Adam is
        capturable (its step count on the device) and reads the learning rate from a device tensor, so
        that a graph replay advances both; otherwise the plain Adam with a float learning rate."""
        capturable = self._capturable
        if capturable:  # its warning about capturable steps run uncaptured is about the warm-up: on purpose
            self.opt._warned_capturable_if_run_uncaptured = True
        for group in self.opt.param_groups:
            group["capturable"] = capturable
            group["lr"] = self._graph.lr if capturable else float(group["lr"])
            group["foreach"] = True if capturable else group.get("foreach")
            for p in group["params"]:
                st = self.opt.state.get(p, {})
                if isinstance(st.get("step"), Tensor):
                    st["step"] = (st["step"].to(p.device, torch.float32) if capturable
                                  else st["step"].detach().cpu())

    def save(self, path: Union[str, Path]) -> Path:
        """Write a checkpoint (with trainer state when cfg.save_trainer_state)."""
        self.check_finite()  # never write weights that a non-finite step has touched
        state = self.state_dict() if self.cfg.save_trainer_state else None
        if distributed.is_main():  # every rank holds the same state; rank 0 writes it (atomically)
            self.last_checkpoint = save_checkpoint(
                path,
                self.sae,
                train_cfg=self.cfg,
                firing=self.firing.stats(),
                metadata=self.metadata,
                trainer_state=state,
            )
            logger.info("saved checkpoint %s (step %d)", self.last_checkpoint, self.step)
        distributed.barrier()  # nobody reads the checkpoint before it exists
        self.last_checkpoint = distributed.broadcast_object(self.last_checkpoint)
        return self.last_checkpoint

    @classmethod
    def resume(
        cls,
        path: Union[str, Path],
        activations: Tensor,
        labels: Optional[Tensor] = None,
        *,
        out_dir: Optional[Union[str, Path]] = None,
        cfg: Optional[TrainConfig] = None,
    ) -> "Trainer":
        """A trainer restored from a checkpoint saved with trainer state; ``cfg`` defaults to the saved one
        and ``out_dir`` to the checkpoint's parent folder."""
        ck = load_checkpoint(path, expected_d=activations.shape[-1], load_trainer_state=True)
        train_cfg = cfg or ck.train_cfg
        if train_cfg is None:
            raise ValueError(f"checkpoint {str(path)!r} has no TrainConfig; pass cfg=")
        out = Path(path).parent if out_dir is None else out_dir
        trainer = cls(ck.sae, train_cfg, activations, labels, out_dir=out, metadata=ck.metadata)
        trainer.load_state_dict(ck.trainer_state)
        return trainer


def train_sae(
    activations: Tensor,
    labels: Optional[Tensor],
    sae_cfg: SAEConfig,
    cfg: TrainConfig,
    *,
    out_dir: Optional[Union[str, Path]] = None,
    metadata: Optional[dict[str, Any]] = None,
) -> TrainResult:
    """Build the SAE of ``sae_cfg`` and train it on ``activations [N, d]`` (and ``labels [N]``)."""
    trainer = Trainer(build_sae(sae_cfg), cfg, activations, labels, out_dir=out_dir, metadata=metadata)
    return trainer.train()
