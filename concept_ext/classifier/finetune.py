"""Fine-tuning the classifier: C-way cross-entropy on the restricted label logits (method.md 1.3-1.4).

Decoders train on the label-token logits at the last prompt position, encoders on their [CLS] head.
Batches are length-bucketed; mixed precision only on CUDA; AdamW (bitsandbytes 8-bit when asked and
available, else torch AdamW with the substitution recorded); linear warmup then cosine to 0 over the
configured ratio (method.md 9 oddity 20); atomic, resumable checkpoints under ``out_dir``.

Under torchrun the model is wrapped in ``DistributedDataParallel``. Every rank draws the same global batch
of ``batch_size`` rows and keeps its contiguous slice (``distributed.shard_range``); the loss of a rank
is its share of the global mean (sum over its rows / batch_size), so the all-reduced gradient, the
effective batch and the learning-rate schedule are those of the single-process recipe. Rank 0 writes the
checkpoints and the final model; every rank resumes from the same ``latest.json``.

With ``config.parallel == "fsdp"`` a copy of the model is fully sharded instead (FSDP2, one unit per block;
see finetune_fsdp.py): the same batch split, loss shares and schedule, checkpoints gathered and written by
rank 0 in the single-process format, and ``clf.model`` receives the full trained weights at the end.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from concept_ext import distributed

from concept_ext.classifier import finetune_fsdp
from concept_ext.classifier.model import Classifier
from concept_ext.config.clf import FineTuneConfig
from concept_ext.text.data import TextDataset

logger = logging.getLogger("concept_ext")

__all__ = ["finetune", "FineTuneResult", "accuracy", "batch_order", "load_trainer_state"]


@dataclass
class FineTuneResult:
    """Outcome of :func:`finetune`."""

    steps: int
    """Optimiser steps done in total (including resumed ones)."""
    losses: list[float] = field(default_factory=list)
    """Training loss per step."""
    train_acc: float | None = None
    """Accuracy on (up to ``max_eval_rows`` of) the train split after training."""
    test_acc: float | None = None
    """Accuracy on the test split, when one was given."""
    optimizer_used: str = ""
    """Optimiser that ran (records the 8-bit -> torch AdamW fallback)."""
    resumed_from: int | None = None
    """Step of the checkpoint training resumed from, if any."""
    model_dir: str | None = None
    """Folder with the final ``save_pretrained`` model + tokenizer (loadable by ``load_backbone``)."""


def batch_order(lengths: list[int], batch_size: int, *, seed: int, bucket_factor: int) -> Iterator[list[int]]:
    """Endless stream of batches: per epoch a seeded shuffle, chunks of ``batch_size * bucket_factor``
    sorted by length and cut into batches, batches shuffled. Deterministic given the seed."""
    epoch = 0
    n = len(lengths)
    while True:
        rng = np.random.default_rng([seed, epoch])
        perm = rng.permutation(n)
        batches = []
        span = batch_size * max(1, bucket_factor)
        for s in range(0, n, span):
            chunk = sorted(perm[s:s + span].tolist(), key=lambda i: lengths[i])
            batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        for k in rng.permutation(len(batches)):
            yield batches[k]
        epoch += 1


def accuracy(clf: Classifier, ds: TextDataset, *, batch_size: int = 32, max_rows: int | None = None) -> float:
    """Share of rows whose predicted label equals the ground truth."""
    ds = ds.subset(max_rows)
    pred = clf.predict(ds.texts, batch_size=batch_size, hidden=False).pred.numpy()
    return float((pred == ds.labels).mean())


def _optimizer(params_decay, params_no_decay, cfg: FineTuneConfig, device: torch.device):
    groups = [{"params": params_decay, "weight_decay": cfg.weight_decay},
              {"params": params_no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw8bit":
        reason = "no CUDA device" if device.type != "cuda" else ""
        if not reason:
            try:
                import bitsandbytes as bnb  # optional

                return bnb.optim.AdamW8bit(groups, lr=cfg.lr), "bitsandbytes.optim.AdamW8bit"
            except Exception as exc:  # noqa: BLE001 - missing or broken bitsandbytes
                reason = f"bitsandbytes unavailable ({exc.__class__.__name__})"
        logger.warning("adamw8bit requested; using torch.optim.AdamW instead: %s", reason)
        return torch.optim.AdamW(groups, lr=cfg.lr), f"torch.optim.AdamW (fallback from adamw8bit: {reason})"
    return torch.optim.AdamW(groups, lr=cfg.lr), "torch.optim.AdamW"


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)  # linear warmup (HF convention: 0 at step 0 is skipped)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _save_checkpoint(out: Path, step: int, model, opt, sched, scaler, losses, cfg) -> None:
    final = out / f"ckpt-{step:08d}"
    tmp = out / f".ckpt-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "losses": losses,
                "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
    (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = out / f".latest.json.tmp-{os.getpid()}"
    latest_tmp.write_text(json.dumps({"checkpoint": final.name, "step": step}))
    os.replace(latest_tmp, out / "latest.json")  # commit point
    for old in out.glob("ckpt-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)


def _share_loss(_model, b: dict, y: torch.Tensor, weight: float, *, clf: Classifier,
                amp_dtype) -> torch.Tensor:
    """Distributed: ``weight`` (1 / global batch) times the summed cross-entropies of this rank's rows."""
    dev = clf.device
    with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return F.cross_entropy(clf.forward_batch(b, hidden=False).logits, y, reduction="sum") * weight


def _precision(cfg: FineTuneConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``mixed_precision`` resolved (``auto`` -> fp16 on CUDA); None (fp32) off CUDA."""
    amp = cfg.mixed_precision
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else "no"
    if device.type != "cuda":
        amp = "no"  # mixed precision on GPU only
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)


def load_trainer_state(path: Path) -> dict:
    """A checkpoint's ``trainer_state.pt``, loaded with ``weights_only=True``: tensors, numbers, strings and
    containers only. A file that holds anything else (a pickled callable or class) is refused with a
    ValueError naming it, before any of it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: refusing to load a fine-tuning trainer state that holds more than tensors and "
                         f"plain data (weights_only=True): {str(exc).splitlines()[0]}. Delete the checkpoint "
                         "folder to restart fine-tuning from the backbone.") from None


def _resume_weights(model, out: Path | None, device: torch.device, resume: bool) -> tuple[dict | None, Path | None]:
    """With a ``latest.json`` under ``out`` (and ``resume``): load its weights into ``model`` and return its
    trainer state and folder; else ``(None, None)``. Weights first: FSDP shards a copy of the loaded model."""
    if out is None:
        return None, None
    out.mkdir(parents=True, exist_ok=True)
    latest = out / "latest.json"
    if not (resume and latest.is_file()):
        return None, None
    ck = out / json.loads(latest.read_text())["checkpoint"]
    load_model(model, str(ck / "model.safetensors"), device=str(device))
    return load_trainer_state(ck / "trainer_state.pt"), ck


@dataclass
class _Parallel:
    """How the model trains: alone, DDP-wrapped or FSDP-sharded (under torchrun)."""

    train_model: torch.nn.Module
    """The module whose parameters the optimizer steps (the sharded copy under FSDP)."""
    loss_module: torch.nn.Module | None
    """Under torchrun: the module whose forward is this rank's share of the batch loss (DDP or FSDP root)."""
    batcher: Classifier
    """The classifier that builds batches (on the training device)."""
    fsdp: finetune_fsdp.Sharded | None = None
    """The FSDP-sharded copy, when ``parallel == "fsdp"``."""


def _parallel(clf: Classifier, cfg: FineTuneConfig, amp_dtype) -> _Parallel:
    """Shard (FSDP) or wrap (DDP) the model under torchrun; single-process, the model as it is."""
    if distributed.enabled() and cfg.parallel == "fsdp":  # the optimizer must see the sharded parameters
        fsdp = finetune_fsdp.shard_classifier(clf, functools.partial(_share_loss, amp_dtype=amp_dtype))
        return _Parallel(fsdp.model, fsdp.root, fsdp.clf, fsdp)
    if distributed.enabled():  # DDP over a module whose forward is this rank's share of the batch loss
        share_fn = functools.partial(_share_loss, clf=clf, amp_dtype=amp_dtype)
        return _Parallel(clf.model, distributed.wrap_ddp(distributed.LossModule(clf.model, share_fn)), clf)
    return _Parallel(clf.model, None, clf)


def _restore(st: dict, par: _Parallel, opt, sched, scaler, res: FineTuneResult) -> int:
    """Load a resumed trainer state into the optimizer, scheduler, scaler, RNG and ``res``; its step."""
    if par.fsdp is not None:
        finetune_fsdp.load_optimizer_state(par.fsdp.model, opt, st["optimizer"])
    else:
        opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    if scaler is not None and st["scaler"] is not None:
        scaler.load_state_dict(st["scaler"])
    torch.set_rng_state(st["torch_rng"])
    res.losses, res.resumed_from = list(st["losses"]), st["step"]
    return int(st["step"])


def _batch_loss(clf: Classifier, par: _Parallel, ids: list, labels: torch.Tensor, idx: list[int],
                amp_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, backward)`` of the global batch ``idx``: the mean cross-entropy (the same on every rank) and
    the tensor to back-propagate (this rank's share, scaled for the gradient averaging of DDP/FSDP)."""
    if par.loss_module is None:
        b = clf.batch([ids[i] for i in idx])
        y = labels[idx].to(clf.device)
        with torch.autocast(clf.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(clf.forward_batch(b, hidden=False).logits, y)
        return loss, loss
    # This rank's rows of the global batch; a rank left without rows (a short last batch) runs one row
    # with weight 0 so that every rank takes part in the gradient all-reduce.
    lo, hi = distributed.shard_range(len(idx))
    mine, weight = (idx[lo:hi], 1.0 / len(idx)) if hi > lo else (idx[:1], 0.0)
    b, y = par.batcher.batch([ids[i] for i in mine]), labels[mine].to(par.batcher.device)
    share = par.loss_module(b, y, weight)
    # DDP averages gradients (FSDP's reduce-scatter too); the shares' gradients add up
    backward = share * distributed.world_size()
    loss = share.detach().clone()
    torch.distributed.all_reduce(loss)  # the global mean loss, the same on every rank
    return loss, backward


def _update(backward: torch.Tensor, par: _Parallel, opt, sched, scaler, cfg: FineTuneConfig) -> None:
    """Backward (scaled under fp16), clip the global gradient norm, optimizer and scheduler steps."""
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(backward).backward()
        scaler.unscale_(opt)
    else:
        backward.backward()
    torch.nn.utils.clip_grad_norm_(par.train_model.parameters(), cfg.max_grad_norm)  # FSDP: global norm
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    sched.step()


def _checkpoint(out: Path, done: int, model, par: _Parallel, opt, sched, scaler, res: FineTuneResult,
                cfg: FineTuneConfig) -> None:
    """A mid-run checkpoint: under FSDP the shards are gathered (collectives on every rank); rank 0 writes."""
    m_state, o_state = model, opt
    if par.fsdp is not None:
        m_state = finetune_fsdp.StateDictView(finetune_fsdp.full_model_state(par.fsdp.model))
        o_state = finetune_fsdp.StateDictView(finetune_fsdp.full_optimizer_state(par.fsdp.model, opt))
    if distributed.is_main():  # the ranks hold the same state (or its shards); one writes it
        _save_checkpoint(out, done, m_state, o_state, sched, scaler, res.losses, cfg)
    distributed.barrier()


def _save_final(clf: Classifier, out: Path, o_state, s_state, scaler, res: FineTuneResult,
                cfg: FineTuneConfig) -> None:
    """The last checkpoint and the final HF model folder ``out/model`` (rank 0 writes, every rank waits)."""
    mdir = out / "model"
    if distributed.is_main():  # rank 0 only (distributed); the others wait below
        _save_checkpoint(out, cfg.steps, clf.model, o_state, s_state, scaler, res.losses, cfg)
        tmp = out / f".model.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        clf.model.save_pretrained(tmp)
        clf.tokenizer.save_pretrained(tmp)
        shutil.rmtree(mdir, ignore_errors=True)
        os.replace(tmp, mdir)
    distributed.barrier()
    res.model_dir = str(mdir)


def finetune(clf: Classifier, train: TextDataset, *, config: FineTuneConfig | None = None,
             test: TextDataset | None = None, out_dir: str | os.PathLike | None = None,
             progress: bool = False, resume: bool = True) -> FineTuneResult:
    """Fine-tune ``clf.model`` in place on ``train`` (C-way CE on the restricted logits / encoder head).

    With ``out_dir``: checkpoints every ``config.checkpoint_every`` steps and at the end, resumes from
    ``out_dir/latest.json`` when ``resume``, and writes the final model to ``out_dir/model``."""
    cfg = config if config is not None else FineTuneConfig()
    if list(train.class_names) != clf.class_names:
        raise ValueError(f"train class names {train.class_names} != classifier's {clf.class_names}")
    model = clf.model
    device = clf.device
    torch.manual_seed(cfg.seed)
    model.requires_grad_(True)
    amp_dtype = _precision(cfg, device)
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    out = Path(out_dir) if out_dir is not None else None
    st, ck = _resume_weights(model, out, device, resume)
    par = _parallel(clf, cfg, amp_dtype)
    named = [(n, p) for n, p in par.train_model.named_parameters() if p.requires_grad]
    # As the HF Trainer the paper used: no weight decay on biases and norm weights.
    opt, opt_name = _optimizer([p for n, p in named if p.ndim >= 2], [p for n, p in named if p.ndim < 2], cfg,
                               device)
    del named
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup(), cfg.steps))
    # FSDP too: with sharded (DTensor) gradients, DTensor's handler of the unscale op all-reduces the
    # "found inf" flag, so every rank skips the same steps (checked on 2 gloo ranks, one overflowing shard).
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    res = FineTuneResult(steps=0, optimizer_used=opt_name)
    start = 0
    if st is not None:
        start = _restore(st, par, opt, sched, scaler, res)
        logger.info("resumed fine-tuning from %s (step %d)", ck, start)
    enc = clf.encode(train.texts)
    order = batch_order([len(r) for r in enc.ids], cfg.batch_size, seed=cfg.seed, bucket_factor=cfg.bucket_factor)
    for _ in range(start):  # replay the deterministic data order up to the resumed step
        next(order)
    labels = torch.as_tensor(train.labels, dtype=torch.long)
    par.train_model.train()
    try:
        for step in tqdm(range(start, cfg.steps), disable=not progress or not distributed.is_main(),
                         desc="finetune", initial=start, total=cfg.steps):
            loss, backward = _batch_loss(clf, par, enc.ids, labels, next(order), amp_dtype)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss is {loss.item()} at step {step}")
            _update(backward, par, opt, sched, scaler, cfg)
            res.losses.append(float(loss.detach()))
            done = step + 1
            if out is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                _checkpoint(out, done, model, par, opt, sched, scaler, res, cfg)
    finally:
        par.train_model.eval()
        if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
    res.steps = cfg.steps
    o_state, s_state = opt, sched
    if par.fsdp is not None:  # clf.model gets the full trained weights on every rank (an ordinary module again)
        if out is not None:
            o_state = finetune_fsdp.StateDictView(finetune_fsdp.full_optimizer_state(par.fsdp.model, opt))
            s_state = finetune_fsdp.StateDictView(sched.state_dict())
        finetune_fsdp.restore(clf, par.fsdp)
        # Drop every reference to the shards before the full model goes back to the device.
        par = opt = sched = None
        model.to(device)
    if out is not None:
        _save_final(clf, out, o_state, s_state, scaler, res, cfg)
    res.train_acc = accuracy(clf, train, batch_size=cfg.eval_batch_size, max_rows=cfg.max_eval_rows)
    if test is not None:
        res.test_acc = accuracy(clf, test, batch_size=cfg.eval_batch_size, max_rows=cfg.max_eval_rows)
    logger.info("fine-tuned %d steps (%s): train acc %.3f, test acc %s", res.steps, opt_name, res.train_acc,
                res.test_acc)
    return res
