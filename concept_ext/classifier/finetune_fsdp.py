"""Fully sharded fine-tuning (``FineTuneConfig.parallel = "fsdp"``) with PyTorch's FSDP2 ``fully_shard``.

For a classifier whose parameters fit one device but whose training state (gradients + AdamW moments,
3x the parameters) does not: each rank holds 1/N of the parameters, gradients and optimizer state, and a
block's full parameters exist only while that block runs.

* Sharding: a **copy** of the model is sharded, one FSDP unit per transformer block (``resolved.layers``)
  and a root unit that owns the rest (embeddings, final norm, head). ``clf.model`` itself stays a plain
  module (moved to the CPU during training when it sat on a GPU) and receives the gathered full weights at
  the end, so everything after fine-tuning (evaluation, caching, rank-0 saving) sees an ordinary model.
  FSDP2 offers no "un-shard for good"; a copy avoids relying on its private state.
* The root unit is a :class:`~concept_ext.distributed.LossModule` whose forward is the whole loss share.
  ``Classifier.forward_batch`` calls ``model.base_model(...)`` and reads the label rows of the head weight
  directly, never the HF model's own forward. FSDP2 all-gathers a unit's parameters in a pre-forward hook
  of the module it wraps, so the root must be a module whose forward *is* called around those reads:
  wrapping the HF model would leave the embeddings, final norm and head sharded during ``base_model(...)``
  and ``label_head()``. The block units are called by ``base_model``'s own forward and gather themselves.
* Checkpoints: full (unsharded) model and optimizer state dicts are gathered with
  ``torch.distributed.checkpoint.state_dict`` on every rank (collectives) and written by rank 0 in the
  single-process format (``model.safetensors`` as ``safetensors.save_model`` writes it; the optimizer
  state keyed by parameter index as ``Optimizer.state_dict()``), so a checkpoint resumes under any mode.
"""
from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from concept_ext import distributed
from concept_ext.classifier.backbones import Backbone, resolve
from concept_ext.classifier.model import Classifier

logger = logging.getLogger("concept_ext")

__all__ = ["Sharded", "shard_classifier", "StateDictView", "full_model_state", "full_optimizer_state",
           "load_optimizer_state", "restore"]


class StateDictView:
    """An object whose ``state_dict()`` returns a given dict: lets the single-process writers
    (``safetensors.torch.save_model``, ``_save_checkpoint``) write gathered state unchanged."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return dict(self.state)


class Sharded(NamedTuple):
    """The sharded training copy of a classifier."""

    root: nn.Module
    """The root FSDP unit: ``root(batch, labels, weight)`` = this rank's share of the batch loss."""
    model: nn.Module
    """The sharded copy of ``clf.model`` (parameters are DTensor shards), same parameter names."""
    clf: Classifier
    """A classifier over the copy (its batches land on the training device)."""


def shard_classifier(clf: Classifier, loss_fn: Callable[..., torch.Tensor]) -> Sharded:
    """Copy ``clf.model`` and ``fully_shard`` the copy: one unit per block, then the root loss module.

    ``loss_fn(model, batch, labels, weight, *, clf)`` computes the loss share; ``clf`` is the classifier
    over the copy. When ``clf.model`` is on a GPU it is moved to the CPU so that the device holds only
    shards (``finetune`` moves it back after :func:`restore`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ctx = distributed.context()
    dev = torch.device(ctx.device)
    if clf.device.type != "cpu":
        clf.model.to("cpu")  # the copy is made on the CPU; fully_shard moves each unit's shard to `dev`
    work = copy.deepcopy(clf.model)
    work.requires_grad_(True)
    mesh = init_device_mesh(dev.type, (ctx.world_size,))
    resolved = resolve(work)
    for block in resolved.layers:  # one all-gather per block: at most one block is unsharded at a time
        fully_shard(block, mesh=mesh)
    view = Classifier(Backbone(work, clf.tokenizer, clf.backbone.model_id, resolved), clf.class_names,
                      layer=clf.layer, prompt=clf.prompt)
    root = distributed.LossModule(work, functools.partial(loss_fn, clf=view))
    fully_shard(root, mesh=mesh)
    logger.info("FSDP: %d block units + root on a %d-rank %s mesh", len(resolved.layers), ctx.world_size,
                dev.type)
    return Sharded(root, work, view)


def _options(*, everywhere: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload=True keeps the gathered tensors on rank 0 only (the other ranks get an empty dict).
    return StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)


def full_model_state(model: nn.Module, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of the sharded ``model``, keyed as ``model.state_dict()``.

    Collective: every rank must call it. ``everywhere=False``: CPU tensors on rank 0, ``{}`` elsewhere;
    ``everywhere=True``: full tensors on every rank (on the training device)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(everywhere=everywhere))
    # Tied parameters (one Parameter under two names) come back as one tensor under both names, so that
    # safetensors' save_model drops the duplicate exactly as it does for the single-process model.
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in state:
            state[name] = state[first.setdefault(id(p), name)]
    return state


def _param_names(opt: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """Names of the optimizer's parameters in index order (the ids of ``Optimizer.state_dict()``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` as a single process would have it (full moments, integer parameter ids).

    Collective; the result is complete on rank 0 and empty elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, opt, options=_options(everywhere=False))
    if not full:
        return {}
    index = {n: i for i, n in enumerate(_param_names(opt, model))}
    groups = [{**g, "params": sorted(index[n] for n in g["params"])} for g in full["param_groups"]]
    return {"state": {index[n]: v for n, v in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a single-process ``opt.state_dict()`` (integer ids) into the sharded optimizer (every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(opt, model)
    full = {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, opt, full, options=StateDictOptions(full_state_dict=True))


def restore(clf: Classifier, sharded: Sharded) -> None:
    """Gather the trained weights into ``clf.model`` on every rank (collective); the caller then drops
    the sharded copy and moves ``clf.model`` back to its device."""
    state = full_model_state(sharded.model, everywhere=True)
    with torch.no_grad():
        clf.model.load_state_dict(state, strict=True)  # copies into clf.model's own (CPU or device) tensors
