"""Load and export TopK SAEs in the on-disk formats of SAELens and EleutherAI's sparsify (issue 25).

Neither library is imported here: the files are read and written with ``safetensors`` and ``json``, so
loading and exporting work without the peers installed. The formats were read from the libraries' own
source and are pinned:

* **SAELens 6.x** (tested with ``sae-lens`` 6.54.12): a folder with ``cfg.json`` (``architecture``,
  ``d_in``, ``d_sae``, ``k``, ``apply_b_dec_to_input``, ``normalize_activations``,
  ``rescale_acts_by_decoder_norm``, ``reshape_activations``, ``metadata.sae_lens_version``) and
  ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``).
  Configs written before 6.0 are refused.
* **sparsify 1.3.x** (tested with ``eai-sparsify`` 1.3.3): one folder per hookpoint with ``cfg.json``
  (``SparseCoderConfig`` fields plus ``d_in``) and ``sae.safetensors`` (``encoder.weight [m, d]``,
  ``encoder.bias [m]``, ``W_dec [m, d]``, ``b_dec [d]``).

Conventions (what :func:`load_sae` follows, each checked by tests/test_interop_formats.py):

* **b_dec before encoding.** SAELens (``apply_b_dec_to_input=True``) and sparsify (always, unless
  ``transcode``) encode ``x - b_dec``. That becomes the TopKSAE's pre-encoder centre
  (``sae.center = b_dec``, a buffer: later training of b_dec does not move it; use
  :func:`concept_ext.accelerate` on the library object for a trainable tied b_dec).
* **Decoder norm.** SAELens ``rescale_acts_by_decoder_norm=True`` multiplies the pre-activations by
  ``||W_dec_j||`` and divides the codes by it before decoding; it is folded into the weights on load
  (``W_enc_j, b_enc_j *= ||W_dec_j||``, ``W_dec_j /= ||W_dec_j||``), as SAELens's own ``fold_W_dec_norm``
  does: the same codes and reconstruction up to rounding. sparsify's ``normalize_decoder`` only acts
  during training; the stored W_dec is used as is.
* **Input normalisation.** A loaded SAE uses ``normalize='none'``, except SAELens's
  ``"constant_norm_rescale"`` (x * sqrt(d)/||x||, undone on the output), which is exactly our
  ``normalize='constant_norm_rescale'``. ``"expected_average_only_in"`` (an unfolded dataset constant),
  ``"layer_norm"`` and ``"covariance_whitening"`` are refused.
* **Dtypes.** float32/float64 weights load as they are; bfloat16/float16 weights are upcast to float32
  (exact), as concept_ext SAEs hold float32 or float64 parameters.

Export (:func:`export_sae`) writes the same files. Our per-sample sqrt(d) rescale
(``normalize='constant_norm_rescale'``) is SAELens's ``"constant_norm_rescale"`` and exports exactly;
sparsify has no input normalisation, so exporting such an SAE to sparsify is refused (the rescale is
per sample and non-linear: no fold is exact). A centre that differs from b_dec (or no centre where the
format always subtracts b_dec) is folded into the encoder bias, ``b_enc' = b_enc + (b_dec - c) W_enc``:
exact in real arithmetic, equal up to rounding. A ClassifSAE's head (``W_c``, ``b_c``), which neither
format knows, goes to the sidecar ``concept_ext_head.safetensors``; :func:`load_sae` reads it back and
returns a :class:`ClassifSAE`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from concept_ext.config.sae import SAEConfig
from concept_ext.sae.model import ClassifSAE, TopKSAE, build_sae

__all__ = ["FORMATS", "SAELENS_VERSION", "SPARSIFY_VERSION", "HEAD_FILE", "detect_format", "load_sae",
           "export_sae"]

PathLike = Union[str, os.PathLike]

#: Formats :func:`load_sae` and :func:`export_sae` know.
FORMATS = ("saelens", "sparsify")
#: The SAELens release whose format is written (and the supported range: 6.0 <= version < 7).
SAELENS_VERSION = "6.54.12"
#: The sparsify (eai-sparsify) release whose format is read and written.
SPARSIFY_VERSION = "1.3.3"
#: Sidecar file of a ClassifSAE's head (W_c [C, n], b_c [C]).
HEAD_FILE = "concept_ext_head.safetensors"

_SAELENS_WEIGHTS = "sae_weights.safetensors"
_SPARSIFY_WEIGHTS = "sae.safetensors"
_CFG = "cfg.json"
_HEAD_VERSION = "1"
# SparseCoderConfig fields of sparsify 1.3.3 (plus d_in, which save_to_disk adds).
_SPARSIFY_KEYS = {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                  "skip_connection", "transcode", "d_in"}
_SAELENS_NORMS = ("none", "constant_norm_rescale")


# ------------------------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object")
    return doc


def _load_tensors(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"SAE folder {str(path.parent)!r} has no {path.name}")
    return load_file(str(path))


def _check_keys(tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise ValueError(f"{str(where)!r} lacks the tensor(s) {missing}")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise ValueError(f"{str(where)!r} holds tensor(s) {extra} that a TopK SAE does not have "
                         "(another architecture?); refusing to drop them silently")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{str(where)!r}: {name} has shape {tuple(tensors[name].shape)}, expected "
                             f"{shape} from {_CFG}")


def _positive_int(doc: dict[str, Any], key: str, where: Path) -> int:
    if key not in doc or doc[key] is None:
        raise ValueError(f"{str(where)!r} has no {key!r}: a TopK SAE needs it")
    val = doc[key]
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"{str(where)!r}: {key} must be a positive int, got {val!r}")
    return val


def _param_dtype(*tensors: Tensor) -> torch.dtype:
    dt = tensors[0].dtype
    if any(t.dtype != dt for t in tensors):
        raise ValueError(f"SAE tensors have mixed dtypes {sorted({str(t.dtype) for t in tensors})}")
    return dt if dt in (torch.float32, torch.float64) else torch.float32


def _build(d: int, m: int, k: int, normalize: str, dtype: torch.dtype, head: Optional[dict[str, Tensor]]
           ) -> TopKSAE:
    if head is None:
        cfg = SAEConfig(d=d, m=m, k=k, n_concepts=0, architecture="topk", normalize=normalize,
                        dtype=str(dtype).removeprefix("torch."))
    else:
        n_classes, n_concepts = head["W_c"].shape
        cfg = SAEConfig(d=d, m=m, k=k, n_concepts=n_concepts, n_classes=n_classes,
                        architecture="classif_topk", normalize=normalize,
                        dtype=str(dtype).removeprefix("torch."))
    return build_sae(cfg)


@torch.no_grad()
def _fill(sae: TopKSAE, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
          center: Optional[Tensor], head: Optional[dict[str, Tensor]]) -> TopKSAE:
    dt = sae.W_dec.dtype
    # copy_ keeps TopKSAE's own W_enc layout (a transposed view of [m, d] storage).
    sae.W_enc.copy_(W_enc.to(dt))
    sae.b_enc.copy_(b_enc.to(dt))
    sae.W_dec.copy_(W_dec.to(dt))
    sae.b_dec.copy_(b_dec.to(dt))
    if head is not None:
        sae.W_c.copy_(head["W_c"].to(dt))
        sae.b_c.copy_(head["b_c"].to(dt))
    sae.set_center(None if center is None else center.to(dt))
    return sae


def _read_head(folder: Path, m: int) -> Optional[dict[str, Tensor]]:
    f = folder / HEAD_FILE
    if not f.exists():
        return None
    with safe_open(str(f), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    if meta.get("format_version") != _HEAD_VERSION:
        raise ValueError(f"{str(f)!r} has format_version {meta.get('format_version')!r}; "
                         f"this concept_ext reads {_HEAD_VERSION}")
    head = load_file(str(f))
    if set(head) != {"W_c", "b_c"}:
        raise ValueError(f"{str(f)!r} must hold exactly W_c and b_c, got {sorted(head)}")
    C, n = head["W_c"].shape
    if tuple(head["b_c"].shape) != (C,) or not 1 <= n <= m:
        raise ValueError(f"{str(f)!r}: W_c {tuple(head['W_c'].shape)} / b_c {tuple(head['b_c'].shape)} do "
                         f"not form a head [C, n] / [C] with n <= m = {m}")
    return head


# ----------------------------------------------------------------------------------------- detection


def detect_format(path: PathLike) -> str:
    """``"saelens"`` or ``"sparsify"`` for an SAE folder, from the files it holds."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"SAE folder {str(p)!r} does not exist")
    if (p / _SAELENS_WEIGHTS).exists():
        return "saelens"
    if (p / _SPARSIFY_WEIGHTS).exists() and (p / _CFG).exists():
        doc = _read_json(p / _CFG)
        if "format_version" in doc:
            raise ValueError(f"{str(p)!r} is a concept_ext checkpoint: use concept_ext.load_checkpoint")
        return "sparsify"
    hookpoints = sorted(q.name for q in p.iterdir() if (q / _SPARSIFY_WEIGHTS).exists())
    if hookpoints:
        raise ValueError(f"{str(p)!r} is a sparsify run with one SAE per hookpoint {hookpoints}: pass "
                         "hookpoint=<name> (or the hookpoint's folder)")
    raise ValueError(f"{str(p)!r} holds neither {_SAELENS_WEIGHTS} (SAELens) nor {_CFG} + "
                     f"{_SPARSIFY_WEIGHTS} (sparsify)")


# ----------------------------------------------------------------------------------------------- load


def _load_saelens(p: Path) -> tuple[dict[str, Tensor], Optional[Tensor], int, str]:
    cfg_file = p / _CFG
    if not cfg_file.exists():
        raise FileNotFoundError(f"SAELens folder {str(p)!r} has no {_CFG}")
    doc = _read_json(cfg_file)
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    version = doc.get("sae_lens_version") or meta.get("sae_lens_version")
    major = str(version).split(".")[0] if version else ""
    if major != "6":
        raise ValueError(f"{str(cfg_file)!r} was written by SAELens {version!r}; supported: 6.x "
                         f"(6.0 <= version < 7, tested with {SAELENS_VERSION})")
    arch = doc.get("architecture")
    if arch != "topk":
        raise ValueError(f"{str(cfg_file)!r} has architecture {arch!r}; only SAELens 'topk' SAEs load "
                         "(JumpReLU, standard ReLU+L1, gated, batchtopk, ... have other activations)")
    d = _positive_int(doc, "d_in", cfg_file)
    m = _positive_int(doc, "d_sae", cfg_file)
    k = _positive_int(doc, "k", cfg_file)
    if k > m:
        raise ValueError(f"{str(cfg_file)!r}: k = {k} exceeds d_sae = {m}")
    norm = doc.get("normalize_activations", "none")
    if norm not in _SAELENS_NORMS:
        raise ValueError(f"{str(cfg_file)!r}: normalize_activations = {norm!r} is not supported (supported: "
                         f"{list(_SAELENS_NORMS)}; fold the scaling into the weights with SAELens first)")
    if doc.get("reshape_activations", "none") != "none":
        raise ValueError(f"{str(cfg_file)!r}: reshape_activations = {doc['reshape_activations']!r} is not "
                         "supported (flatten the heads and use 'none')")
    apply_b_dec = doc.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise ValueError(f"{str(cfg_file)!r}: apply_b_dec_to_input must be a bool, got {apply_b_dec!r}")
    rescale = doc.get("rescale_acts_by_decoder_norm", False)
    if not isinstance(rescale, bool):
        raise ValueError(f"{str(cfg_file)!r}: rescale_acts_by_decoder_norm must be a bool, got {rescale!r}")
    tensors = _load_tensors(p / _SAELENS_WEIGHTS)
    _check_keys(tensors, {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,)},
                p / _SAELENS_WEIGHTS)
    w = {key: tensors[key] for key in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if rescale:  # fold ||W_dec_j|| exactly as SAELens's fold_W_dec_norm does (same clamp)
        dt = torch.promote_types(w["W_dec"].dtype, torch.float32)
        norms = w["W_dec"].to(dt).norm(dim=-1).clamp(min=1e-8)  # [m]
        w["W_enc"] = w["W_enc"].to(dt) * norms[None, :]
        w["b_enc"] = w["b_enc"].to(dt) * norms
        w["W_dec"] = w["W_dec"].to(dt) / norms[:, None]
    center = w["b_dec"] if apply_b_dec else None
    return w, center, k, "constant_norm_rescale" if norm == "constant_norm_rescale" else "none"


def _load_sparsify(p: Path) -> tuple[dict[str, Tensor], Optional[Tensor], int, str]:
    cfg_file = p / _CFG
    if not cfg_file.exists():
        raise FileNotFoundError(f"sparsify folder {str(p)!r} has no {_CFG}")
    doc = _read_json(cfg_file)
    unknown = sorted(set(doc) - _SPARSIFY_KEYS)
    if unknown:
        raise ValueError(f"{str(cfg_file)!r} has field(s) {unknown} unknown to sparsify {SPARSIFY_VERSION}: "
                         "written by an unsupported sparsify version")
    if doc.get("activation", "topk") != "topk":
        raise ValueError(f"{str(cfg_file)!r}: activation = {doc['activation']!r}; only 'topk' loads")
    if doc.get("transcode", False):
        raise ValueError(f"{str(cfg_file)!r} is a transcoder (transcode=true): it maps one activation to "
                         "another, not an autoencoder; not supported")
    if doc.get("skip_connection", False):
        raise ValueError(f"{str(cfg_file)!r} has a skip connection (W_skip); not supported")
    d = _positive_int(doc, "d_in", cfg_file)
    k = _positive_int(doc, "k", cfg_file)
    m = doc.get("num_latents") or 0
    if not m:
        m = d * _positive_int(doc, "expansion_factor", cfg_file)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"{str(cfg_file)!r}: num_latents must be a positive int, got {m!r}")
    if k > m:
        raise ValueError(f"{str(cfg_file)!r}: k = {k} exceeds num_latents = {m}")
    tensors = _load_tensors(p / _SPARSIFY_WEIGHTS)
    _check_keys(tensors, {"encoder.weight": (m, d), "encoder.bias": (m,), "W_dec": (m, d), "b_dec": (d,)},
                p / _SPARSIFY_WEIGHTS)
    w = {"W_enc": tensors["encoder.weight"].t(), "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"],
         "b_dec": tensors["b_dec"]}
    return w, w["b_dec"], k, "none"


def load_sae(path: PathLike, format: str = "auto", *, hookpoint: Optional[str] = None,
             device: Union[str, torch.device] = "cpu") -> TopKSAE:
    """Load a TopK SAE saved by SAELens 6.x or sparsify 1.3.x as a concept_ext :class:`TopKSAE`
    (:class:`ClassifSAE` when a concept_ext head sidecar is present).

    ``format``: ``"auto"`` (from the files), ``"saelens"`` or ``"sparsify"``. ``hookpoint`` picks one
    SAE of a sparsify run folder (``<path>/<hookpoint>/``). The module's encode/decode run on the
    concept_ext kernels and give the library's codes and reconstructions (conventions: module docstring).
    Raises ``FileNotFoundError`` for missing files and ``ValueError`` for anything not supported (another
    architecture, a missing tensor or config field, a shape mismatch, an input normalisation or bias
    convention this loader does not reproduce exactly).
    """
    p = Path(path)
    if hookpoint is not None:
        p = p / hookpoint
    fmt = detect_format(p) if format == "auto" else format
    if fmt not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {list(FORMATS)}, got {format!r}")
    w, center, k, normalize = (_load_saelens if fmt == "saelens" else _load_sparsify)(p)
    m, d = w["W_dec"].shape
    head = _read_head(p, m)
    dtype = _param_dtype(*w.values())
    sae = _build(d, m, k, normalize, dtype, head)
    return _fill(sae, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], center, head).to(device)


# --------------------------------------------------------------------------------------------- export


def _encoder_bias_for(sae: TopKSAE, subtracts_b_dec: bool) -> tuple[Tensor, bool]:
    """The encoder bias for a format that subtracts b_dec (or not) before encoding, and whether the
    centre had to be folded in. pre = (x - c) W + b = (x - b_dec) W + [b + (b_dec - c) W]."""
    c = sae.center
    target = sae.b_dec if subtracts_b_dec else None
    if (c is None and target is None) or (c is not None and target is not None and torch.equal(c, target)):
        return sae.b_enc.detach(), False
    shift = (target if target is not None else torch.zeros_like(sae.b_dec)) - (
        c if c is not None else torch.zeros_like(sae.b_dec))
    return (sae.b_enc + shift.to(sae.W_enc.dtype) @ sae.W_enc).detach(), True


def _write_head(sae: TopKSAE, folder: Path) -> None:
    if isinstance(sae, ClassifSAE):
        save_file({"W_c": sae.W_c.detach().cpu().contiguous(), "b_c": sae.b_c.detach().cpu().contiguous()},
                  str(folder / HEAD_FILE), metadata={"format_version": _HEAD_VERSION})
    elif (folder / HEAD_FILE).exists():  # a stale head would turn the plain SAE into a ClassifSAE on load
        (folder / HEAD_FILE).unlink()


def _cpu(t: Tensor) -> Tensor:
    return t.detach().cpu().contiguous()


def export_sae(sae: TopKSAE, path: PathLike, format: str, *, metadata: Optional[dict[str, Any]] = None
               ) -> Path:
    """Write ``sae`` (a :class:`TopKSAE` or :class:`ClassifSAE`) in ``format`` (``"saelens"`` or
    ``"sparsify"``) into the folder ``path``, so that the library's own loader
    (``sae_lens.SAE.load_from_disk`` / ``sparsify.SparseCoder.load_from_disk``) reproduces the codes.

    A ClassifSAE's head goes to ``HEAD_FILE`` in the same folder. ``metadata`` (SAELens only) is merged
    into the config's ``metadata`` (e.g. ``hook_name``, ``model_name``). Refuses (``ValueError``) a
    per-sample rescale (``normalize='constant_norm_rescale'``) for sparsify, which has none. Returns the
    folder.
    """
    if not isinstance(sae, TopKSAE):
        raise TypeError(f"sae must be a concept_ext TopKSAE or ClassifSAE, got {type(sae).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    if format == "saelens":
        b_enc, _ = _encoder_bias_for(sae, subtracts_b_dec=sae.center is not None)
        save_file({"W_enc": _cpu(sae.W_enc), "b_enc": _cpu(b_enc), "W_dec": _cpu(sae.W_dec),
                   "b_dec": _cpu(sae.b_dec)}, str(p / _SAELENS_WEIGHTS))
        from concept_ext import __version__
        doc = {
            "d_in": cfg.d, "d_sae": cfg.m, "dtype": cfg.dtype, "device": "cpu",
            "apply_b_dec_to_input": sae.center is not None,
            "normalize_activations": cfg.normalize,  # 'none' or 'constant_norm_rescale': the same maps
            "reshape_activations": "none",
            "metadata": {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
                         "exported_by": f"concept_ext {__version__}", **(metadata or {})},
            "k": cfg.k, "rescale_acts_by_decoder_norm": False, "architecture": "topk",
        }
    else:
        if cfg.normalize != "none":
            raise ValueError(f"cannot export an SAE with normalize={cfg.normalize!r} to sparsify: sparsify has "
                             "no per-sample input rescale and it does not fold into the weights; export to "
                             "'saelens' (constant_norm_rescale) or train with normalize='none'")
        if metadata:
            raise ValueError("metadata is only written to the SAELens format")
        b_enc, _ = _encoder_bias_for(sae, subtracts_b_dec=True)
        save_file({"encoder.weight": _cpu(sae.W_enc.t()), "encoder.bias": _cpu(b_enc), "W_dec": _cpu(sae.W_dec),
                   "b_dec": _cpu(sae.b_dec)}, str(p / _SPARSIFY_WEIGHTS))
        with torch.no_grad():
            unit = bool(torch.allclose(sae.W_dec.norm(dim=1), torch.ones(cfg.m, dtype=sae.W_dec.dtype,
                                                                          device=sae.W_dec.device), atol=1e-5))
        # normalize_decoder only steers sparsify's training (renormalise W_dec each step); say whether the
        # rows are unit now so that fine-tuning keeps the convention they were trained under.
        doc = {"activation": "topk", "expansion_factor": max(cfg.m // cfg.d, 1), "normalize_decoder": unit,
               "num_latents": cfg.m, "k": cfg.k, "multi_topk": False, "skip_connection": False,
               "transcode": False, "d_in": cfg.d}
    with open(p / _CFG, "w") as fh:
        json.dump(doc, fh, indent=2)
    _write_head(sae, p)
    return p
