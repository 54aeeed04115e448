"""The explained classifier: decision-token label logits and the hooked hidden state (method.md 1.2-1.5).

* Decoders: the paper's prompt, the LM head restricted to the C label-digit tokens, read at the last
  prompt position (= position -2 of prompt+digit). Only the C needed unembedding rows are applied.
* Encoders (BERT/MiniLM): raw text, the sequence-classification head on [CLS]; decision token =
  position 0, so encoders always pad on the right.

h = the residual stream entering block L at the decision token, read by a forward pre-hook.
Every pass uses position_ids = cumsum(mask) - 1 (method.md 9 oddity 12), so batched predictions equal
one-at-a-time predictions for either padding side.
"""
from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from concept_ext.classifier.backbones import Backbone
from concept_ext.config.clf import PromptConfig
from concept_ext.classifier.hooks import capture_resid_pre
from concept_ext.text.prompt import EncodedTexts, decision_positions, encode_texts, label_token_ids, pad_batch, position_ids_from_mask

logger = logging.getLogger("concept_ext")

__all__ = ["Classifier", "ClassifierOutput", "Predictions", "length_buckets"]


class ClassifierOutput(NamedTuple):
    """One forward pass over a padded batch."""

    logits: Tensor
    """Label logits o at the decision token [B, C] (float32)."""
    hidden: Tensor | None
    """Residual stream entering block L at the decision token [B, D], or None when not requested."""


class Predictions(NamedTuple):
    """A bucketed pass over many texts, in input order."""

    logits: Tensor
    """[N, C] float32."""
    hidden: Tensor | None
    """[N, D] float32, or None."""
    pred: Tensor
    """argmax of logits [N] int64."""
    encoded: EncodedTexts
    """The token ids, seen texts and truncation flags."""


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (longest first, so memory peaks show early), cut into batches."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class Classifier:
    """Wraps a :class:`Backbone` as a C-way sentence classifier with a hook at layer L."""

    def __init__(self, backbone: Backbone, class_names: Sequence[str], *, layer: int | None = None,
                 prompt: PromptConfig | None = None):
        self.backbone = backbone
        self.model = backbone.model
        self.tokenizer = backbone.tokenizer
        self.resolved = backbone.resolved
        self.kind = backbone.resolved.kind
        self.class_names = list(class_names)
        self.prompt = prompt if prompt is not None else PromptConfig()
        n = self.resolved.n_layers
        self.layer = n - 1 if layer is None else int(layer)
        if not 0 <= self.layer < n:
            raise ValueError(f"layer must be in 0..{n - 1} (input of block L), got {layer}")
        if self.kind == "decoder":
            self.label_ids = label_token_ids(self.tokenizer, len(self.class_names), class_names=self.class_names)
            self.padding_side = self.prompt.padding_side
            limit = getattr(self.model.config, "max_position_embeddings", None)
            self.max_length = min(self.prompt.max_length, limit - 1) if limit else self.prompt.max_length
        else:
            self.label_ids = []
            n_out = getattr(self.model.config, "num_labels", None)
            if n_out != len(self.class_names):
                raise ValueError(f"encoder head has {n_out} outputs but {len(self.class_names)} class names")
            self.padding_side = "right"  # the BERT pooler reads index 0: [CLS] must stay first
            limit = getattr(self.tokenizer, "model_max_length", 512)
            pos = getattr(self.model.config, "max_position_embeddings", 512)
            self.max_length = min(self.prompt.max_length, limit if limit < 1e6 else 512, pos)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # -- properties -------------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def label_head(self) -> tuple[Tensor, Tensor | None]:
        """Restricted unembedding (decoder): W [C, D] and optional bias [C]."""
        head = self.resolved.head
        W = head.weight[self.label_ids]
        b = head.bias[self.label_ids] if getattr(head, "bias", None) is not None else None
        return W, b

    # -- passes -----------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> EncodedTexts:
        """Tokenise (prompt template for decoders, truncation per the prompt config)."""
        return encode_texts(self.tokenizer, texts, self.class_names, self.prompt, kind=self.kind,
                            max_length=self.max_length)

    def batch(self, ids: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        """Pad ids and build input_ids, attention_mask, position_ids [B, T] and decision positions [B]."""
        input_ids, mask = pad_batch(ids, pad_id=self.pad_id, side=self.padding_side)
        dev = self.device
        pos = decision_positions(mask, kind=self.kind)
        if self.kind == "decoder" and self.padding_side == "left" and not bool((pos == mask.shape[1] - 1).all()):
            raise AssertionError("left padding: the decision token must be the last position")
        return {"input_ids": input_ids.to(dev), "attention_mask": mask.to(dev),
                "position_ids": position_ids_from_mask(mask).to(dev),
                "positions": pos.to(dev)}

    def forward_batch(self, b: dict[str, Tensor], *, hidden: bool = True) -> ClassifierOutput:
        """Label logits [B, C] and (optionally) h [B, D] for a batch from :meth:`batch`. Differentiable."""
        pos = b["positions"]
        layer = self.resolved.layers[self.layer]
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}
        store: dict = {}
        ctx = capture_resid_pre(layer, pos, store=store) if hidden else contextlib.nullcontext()
        with ctx:
            if self.kind == "decoder":
                out = self.model.base_model(**inputs, use_cache=False)
                last = out.last_hidden_state  # [B, T, D], already through the final norm
                x = last[torch.arange(last.shape[0], device=last.device), pos]  # [B, D]
                W, bias = self.label_head()
                logits = x @ W.T + (bias if bias is not None else 0.0)
            else:
                logits = self.model(**inputs).logits
        return ClassifierOutput(logits.float(), store["h"].float() if hidden else None)

    @torch.no_grad()
    def predict(self, texts: Sequence[str], *, batch_size: int = 32, hidden: bool = True,
                progress: bool = False, encoded: EncodedTexts | None = None) -> Predictions:
        """One batched, length-bucketed pass (method.md 1.6); results in input order."""
        enc = encoded if encoded is not None else self.encode(texts)
        N = len(enc.ids)
        logits = torch.empty(N, self.n_classes)
        H = torch.empty(N, self.d_model) if hidden else None
        was_training = self.model.training
        self.model.eval()
        try:
            for idx in tqdm(length_buckets([len(r) for r in enc.ids], batch_size), disable=not progress,
                            desc="classify", leave=False):
                out = self.forward_batch(self.batch([enc.ids[i] for i in idx]), hidden=hidden)
                it = torch.as_tensor(idx)
                logits[it] = out.logits.cpu()
                if hidden:
                    H[it] = out.hidden.cpu()
        finally:
            self.model.train(was_training)
        return Predictions(logits, H, logits.argmax(-1), enc)
