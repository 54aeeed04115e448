"""SAE checkpoints: one folder per checkpoint (design.md section 9).

Layout of ``<dir>/`` (named by samples seen, e.g. ``ckpt_000010000000``):

* ``cfg.json``: ``format_version``, ``architecture``, d, m, k, n_concepts, n_classes, the normalisation,
  ``center`` (whether the SAE centres its inputs before encoding; absent means false), the full :class:`SAEConfig` and :class:`TrainConfig`, and the provenance metadata (model id, hook
  layer, class names, ...);
* ``sae.safetensors``: ``W_enc [d, m]``, ``b_enc [m]``, ``W_dec [m, d]``, ``b_dec [d]`` and, for a
  ClassifSAE, ``W_c [C, n]``, ``b_c [C]``; with centring, ``center [d]`` (the fixed pre-encoder centre);
* ``firing.safetensors``: ``counts [m]`` (sentences on which each latent fired) and
  ``steps_since_fired [m]``;
* optional ``trainer_state.pt``: optimiser state, step, epoch counter, data position, RNG states.

Writes are atomic: everything goes into a hidden temporary folder that is renamed into place at the
end, so an interrupted save never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from concept_ext.config.build import build_config
from concept_ext.config.sae import SAEConfig, TrainConfig
from concept_ext.sae.model import TopKSAE, build_sae

__all__ = [
    "FORMAT_VERSION",
    "FiringStats",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_name",
]

#: Version of the checkpoint layout; loading rejects any other value.
FORMAT_VERSION = 1
_ARCHS = ("classif_topk", "topk")
PathLike = Union[str, os.PathLike]


class FiringStats(NamedTuple):
    """Per-latent firing statistics, from the sparse code (method.md 2.7)."""

    counts: Tensor
    """``[m]`` int64: number of training sentences on which each latent was positive."""
    steps_since_fired: Tensor
    """``[m]`` int64: training steps since each latent last fired."""
    samples_seen: int
    """Training sentences seen when these were recorded (denominator of activation rates)."""

    def rates(self) -> Tensor:
        """``[m]`` float64 per-latent activation rate over the training sentences seen."""
        return self.counts.double() / max(self.samples_seen, 1)


class Checkpoint(NamedTuple):
    """A loaded checkpoint."""

    sae: TopKSAE
    """The module (ClassifSAE or TopKSAE), weights loaded."""
    sae_cfg: SAEConfig
    """Its configuration."""
    train_cfg: Optional[TrainConfig]
    """The training configuration, when one was saved."""
    firing: Optional[FiringStats]
    """Firing statistics, when saved."""
    metadata: dict[str, Any]
    """Provenance: model id, hook layer, class names, and anything else given at save time."""
    trainer_state: Optional[dict[str, Any]]
    """Trainer state for resuming (only with ``load_trainer_state=True``)."""
    path: Path
    """The checkpoint folder."""


def checkpoint_name(samples_seen: int) -> str:
    """Folder name of the checkpoint taken after ``samples_seen`` training sentences."""
    return f"ckpt_{samples_seen:012d}"


def _expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"W_enc": (cfg.d, cfg.m), "b_enc": (cfg.m,), "W_dec": (cfg.m, cfg.d), "b_dec": (cfg.d,)}
    if cfg.architecture == "classif_topk":
        shapes.update(W_c=(cfg.n_classes, cfg.n_concepts), b_c=(cfg.n_classes,))
    return shapes


def save_checkpoint(
    path: PathLike,
    sae: TopKSAE,
    *,
    train_cfg: Optional[TrainConfig] = None,
    firing: Optional[FiringStats] = None,
    metadata: Optional[dict[str, Any]] = None,
    trainer_state: Optional[dict[str, Any]] = None,
    model_id: Optional[str] = None,
    hook_layer: Optional[int] = None,
    class_names: Optional[list[str]] = None,
) -> Path:
    """Write a checkpoint folder at ``path`` atomically (replacing an existing one). Returns the path.

    ``model_id``, ``hook_layer`` and ``class_names`` record where the activations came from (top level
    of cfg.json; they may also be given as keys of ``metadata``); ``metadata`` holds any other
    JSON-serialisable provenance.
    """
    path = Path(path)
    cfg = sae.cfg
    meta = dict(metadata or {})
    for key, val in (("model_id", model_id), ("hook_layer", hook_layer), ("class_names", class_names)):
        if val is not None:
            meta[key] = list(val) if key == "class_names" else val
    doc = {
        "format_version": FORMAT_VERSION,
        "architecture": cfg.architecture,
        "d": cfg.d,
        "m": cfg.m,
        "k": cfg.k,
        "n_concepts": cfg.n_concepts,
        "n_classes": cfg.n_classes if cfg.architecture == "classif_topk" else None,
        "normalization": cfg.normalize,
        "center": sae.center is not None,
        "class_names": meta.pop("class_names", None),
        "hook_layer": meta.pop("hook_layer", None),
        "model_id": meta.pop("model_id", None),
        "sae": dataclasses.asdict(cfg),
        "train": dataclasses.asdict(train_cfg) if train_cfg is not None else None,
        "samples_seen": firing.samples_seen if firing is not None else None,
        "metadata": meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with open(tmp / "cfg.json", "w") as f:
            json.dump(doc, f, indent=2)
        tensors = {n: p.detach().cpu().contiguous() for n, p in sae.named_parameters()}
        if sae.center is not None:  # the pre-encoder centre mu [d] (a buffer, not a parameter)
            tensors["center"] = sae.center.detach().cpu().contiguous()
        save_file(tensors, str(tmp / "sae.safetensors"), metadata={"format_version": str(FORMAT_VERSION)})
        if firing is not None:
            save_file(
                {
                    "counts": firing.counts.detach().cpu().long().contiguous(),
                    "steps_since_fired": firing.steps_since_fired.detach().cpu().long().contiguous(),
                },
                str(tmp / "firing.safetensors"),
                metadata={"format_version": str(FORMAT_VERSION), "samples_seen": str(firing.samples_seen)},
            )
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _read_cfg(path: Path) -> dict[str, Any]:
    f = path / "cfg.json"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} does not exist (no fallback is attempted)")
    if not f.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} has no cfg.json: not a concept_ext checkpoint")
    with open(f) as fh:
        doc = json.load(fh)
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format_version {version!r}; "
            f"this concept_ext reads {FORMAT_VERSION}"
        )
    if doc.get("architecture") not in _ARCHS:
        raise ValueError(f"checkpoint {str(path)!r} has unknown architecture {doc.get('architecture')!r}")
    return doc


def _config(path: Path, cls: type, data: dict, where: str) -> Any:
    """A config section of ``path/cfg.json`` (the one builder's rule: an unknown key names the file)."""
    try:
        return build_config(cls, dict(data), where=where)
    except ValueError as exc:
        raise ValueError(f"checkpoint {str(path)!r}: cfg.json: {exc}") from None


def load_checkpoint(
    path: PathLike,
    *,
    device: Union[str, torch.device] = "cpu",
    expected_d: Optional[int] = None,
    load_trainer_state: bool = False,
) -> Checkpoint:
    """Load and validate a checkpoint folder written by :func:`save_checkpoint`.

    Raises ``FileNotFoundError`` for a missing folder or file and ``ValueError`` for an unknown
    ``format_version``, a config that disagrees with the stored tensors, or ``expected_d`` (the width of
    the activations it will be applied to) different from the checkpoint's d.
    """
    path = Path(path)
    doc = _read_cfg(path)
    cfg = _config(path, SAEConfig, doc["sae"], "sae.")
    for key in ("d", "m", "k", "n_concepts", "architecture"):
        if doc.get(key) != getattr(cfg, key):
            raise ValueError(
                f"checkpoint {str(path)!r}: cfg.json field {key} = {doc.get(key)!r} "
                f"disagrees with its SAE config "
                f"({getattr(cfg, key)!r})"
            )
    if expected_d is not None and expected_d != cfg.d:
        raise ValueError(f"checkpoint {str(path)!r} has d = {cfg.d} but expected_d = {expected_d}")
    weights_file = path / "sae.safetensors"
    if not weights_file.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} has no sae.safetensors")
    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ValueError(f"checkpoint {str(path)!r}: {weights_file} is not a readable safetensors file "
                         f"({exc}): corrupted or half-written") from exc
    shapes = _expected_shapes(cfg)
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint {str(path)!r}: sae.safetensors lacks {missing}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"checkpoint {str(path)!r}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                f"from cfg.json (d={cfg.d}, m={cfg.m}, n_concepts={cfg.n_concepts}, "
                f"n_classes={cfg.n_classes})"
            )
    centred = bool(doc.get("center", False))  # absent in checkpoints written before centring existed
    if centred != ("center" in tensors):
        raise ValueError(
            f"checkpoint {str(path)!r}: cfg.json says center = {centred} but sae.safetensors "
            f"{'lacks' if centred else 'holds'} a 'center' tensor"
        )
    if centred and tuple(tensors["center"].shape) != (cfg.d,):
        raise ValueError(
            f"checkpoint {str(path)!r}: center has shape {tuple(tensors['center'].shape)}, expected ({cfg.d},)"
        )
    sae = build_sae(cfg)
    sae.load_state_dict({n: tensors[n] for n in shapes})
    if centred:
        sae.set_center(tensors["center"])
    sae.to(device)
    train_cfg = _config(path, TrainConfig, doc["train"], "train.") if doc.get("train") else None
    firing = None
    firing_file = path / "firing.safetensors"
    if firing_file.exists():
        fr = load_file(str(firing_file))
        for name in ("counts", "steps_since_fired"):
            if tuple(fr[name].shape) != (cfg.m,):
                raise ValueError(
                    f"checkpoint {str(path)!r}: firing {name} has shape {tuple(fr[name].shape)}, "
                    f"expected ({cfg.m},)"
                )
        firing = FiringStats(fr["counts"], fr["steps_since_fired"], int(doc.get("samples_seen") or 0))
    meta = dict(doc.get("metadata") or {})
    for key in ("class_names", "hook_layer", "model_id"):
        meta[key] = doc.get(key)
    state = None
    if load_trainer_state:
        state_file = path / "trainer_state.pt"
        if not state_file.exists():
            raise FileNotFoundError(f"checkpoint {str(path)!r} has no trainer_state.pt; it cannot be resumed")
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    return Checkpoint(sae, cfg, train_cfg, firing, meta, state, path)
