"""Configuration of the classifier side: prompt, fine-tuning and activation caching (method.md section 1).

Every field has a docstring underneath it; the lead's ``config.py`` may import these classes into its
``RunConfig``. ``__post_init__`` validates each class once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from concept_ext.config.build import check_choices

__all__ = ["PromptConfig", "FineTuneConfig", "CacheConfig"]


@dataclass
class PromptConfig:
    """How a sentence becomes the classifier's input (method.md section 1.2)."""

    template: Literal["options_v1"] = "options_v1"
    """Prompt template name. ``options_v1`` = ``"{text}\\n\\nOPTIONS:\\n" + "{id}({name})\\n" per class``
    (the paper's template, method.md 1.2). Encoders ignore it (raw text)."""

    padding_side: Literal["left", "right"] = "left"
    """``left`` (the paper) or ``right``. Decision position and position_ids come from the mask, so
    both give the same predictions."""

    truncation_side: Literal["left", "right"] = "left"
    """``left`` keeps the option list when a text is too long (the paper); ``right`` cuts the end."""

    max_length: int = 2047
    """Maximum prompt tokens. 2047 = the Pythia context (2048) minus the label digit (method.md 1.2)."""

    append_eos: bool = False
    """Append the tokenizer's EOS after the prompt (method.md 9, oddity 5: the reference's flag is
    always False for the shipped configs)."""

    strip_html: bool = False
    """Remove ``<br />`` tags from texts before prompting (method.md 9, oddity 13; the paper keeps them)."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.max_length < 8:
            raise ValueError(f"PromptConfig.max_length must be >= 8, got {self.max_length}")


@dataclass
class FineTuneConfig:
    """Fine-tuning of the classifier with the restricted label head (method.md 1.3-1.4)."""

    steps: int = 200
    """Optimiser steps (paper: 30,000; 40,000 for TweetEval sentiment)."""

    batch_size: int = 8
    """Sentences per step (paper: 2, no accumulation)."""

    lr: float = 5e-5
    """Peak learning rate (paper: 2e-6)."""

    weight_decay: float = 0.01
    """AdamW weight decay (paper: 0.01)."""

    max_grad_norm: float = 1.0
    """Gradient clipping norm (paper: 1.0)."""

    warmup_ratio: float = 0.05
    """Linear warmup as a fraction of ``steps``, then cosine to 0 (paper v2: 0.05, v1: 0.1)."""

    warmup_steps: int | None = None
    """Explicit warmup steps overriding the ratio (``reference_quirks``: 500, method.md 9 oddity 20)."""

    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """``adamw`` (torch) or ``adamw8bit`` (bitsandbytes, CUDA only; falls back to torch AdamW and
    records the substitution)."""

    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """``auto`` = fp16 autocast + GradScaler on CUDA, fp32 on CPU; ``no``; ``fp16``; ``bf16``. Never on CPU."""

    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (paper: on)."""

    seed: int = 42
    """Seed of the model init, the data order and dropout (paper: 42)."""

    bucket_factor: int = 16
    """Length bucketing: shuffle, cut into chunks of ``batch_size * bucket_factor``, sort each chunk by
    length and split into batches (less padding, still random order)."""

    checkpoint_every: int = 0
    """Save an atomic resumable checkpoint every N steps (0 = only at the end)."""

    eval_batch_size: int = 32
    """Batch size of the accuracy passes after training."""

    max_eval_rows: int | None = None
    """Evaluate accuracy on at most this many rows per split (None = all)."""

    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: ``ddp`` (DistributedDataParallel, a full model copy per rank) or ``fsdp`` (FSDP2
    ``fully_shard`` per transformer block + root: parameters, gradients and AdamW state sharded over the
    ranks, for models whose training state does not fit one GPU). Same effective batch, learning-rate
    schedule and checkpoint format either way; ignored by a single process. Not part of the pipeline's
    stage fingerprint (it does not change the result beyond float rounding)."""

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "FineTuneConfig":
        """``paper`` (= ``v2``, method.md 1.4), ``v1`` or ``quick`` (a short CPU run for tests/demos)."""
        presets = {
            "paper": dict(steps=30_000, batch_size=2, lr=2e-6, warmup_ratio=0.05, optimizer="adamw8bit",
                          mixed_precision="auto", gradient_checkpointing=True, checkpoint_every=5_000),
            "v1": dict(steps=30_000, batch_size=2, lr=2e-6, warmup_ratio=0.1, optimizer="adamw",
                       mixed_precision="no", gradient_checkpointing=True, checkpoint_every=5_000),
            "quick": dict(steps=60, batch_size=8, lr=1e-3, warmup_ratio=0.1, optimizer="adamw",
                          mixed_precision="no", gradient_checkpointing=False, max_eval_rows=256),
        }
        presets["v2"] = presets["paper"]
        if name not in presets:
            raise ValueError(f"FineTuneConfig.preset: unknown preset {name!r} (choose from {sorted(presets)})")
        return cls(**{**presets[name], **overrides})

    def __post_init__(self) -> None:
        check_choices(self)
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("FineTuneConfig.steps and batch_size must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"FineTuneConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def warmup(self) -> int:
        """Number of warmup steps (explicit value, else ``round(ratio * steps)``)."""
        return self.warmup_steps if self.warmup_steps is not None else int(round(self.warmup_ratio * self.steps))


@dataclass
class CacheConfig:
    """The one-pass activation cache of a split (method.md 1.6, design.md 9)."""

    layer: int | None = None
    """Hook layer L (input of block L). None = n_layers - 1 (method.md 1.5)."""

    batch_size: int = 32
    """Sentences per forward pass (length-bucketed)."""

    shard_size: int = 4096
    """Rows per safetensors shard; a shard is the unit of resumption."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Model compute dtype for the pass (``float32``, ``float16``, ``bfloat16``); h is stored as float32."""

    spot_check_rows: int = 4
    """Rows re-run on load with the cached h spliced back at layer L (0 disables)."""

    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt settings (part of the cache key)."""

    def __post_init__(self) -> None:
        check_choices(self)
        if isinstance(self.prompt, dict):
            self.prompt = PromptConfig(**self.prompt)
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("CacheConfig.batch_size and shard_size must be >= 1")

    def to_dict(self) -> dict:
        """JSON-ready dictionary."""
        return dataclasses.asdict(self)
