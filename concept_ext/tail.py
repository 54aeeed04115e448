"""Putting a vector back into the classifier (method.md section 3).

* :class:`SingleTokenTail` (the paper's protocol, 3.1): blocks L.. on a **length-1 sequence** whose only
  residual vector is v (position 0, no prefix), then the final norm and the C label-token rows of the
  unembedding. For Pythia (parallel residual) with one token the attention weight is 1 and rotary at
  position 0 is the identity, so this is a fixed per-vector function tail(v) [P, D] -> [P, C].
  For encoders (BERT/MiniLM) it means: the remaining encoder layers on a one-token sequence holding
  only v as [CLS] (so [CLS] attends to itself only; no text tokens), then pooler + classifier. Like the
  decoder version it is context-free and differs from the full model's prediction.
* :class:`ContextTail` (our extension, 3.3, flagged as such by callers): v replaces the residual entering
  block L at the real decision position of sentence i, with the real prefix. The layer-L inputs of all
  positions are cached from one clean pass; each call recomputes blocks L.. only (layers 0..L-1 are
  never re-run), so ctx_i(h_i) = o_i up to float error.

Both re-run the model's own HF blocks with the arguments (masks, rotary tables) captured from a real
forward (``hooks.capture_layer_call``), so any family in ``backbones.FAMILIES`` works unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from .classifier import Classifier
from .hooks import LayerCall, capture_layer_call, run_layers

__all__ = ["SingleTokenTail", "ContextTail", "tail_ceiling"]


def _head(clf: Classifier, seq: Tensor, pos: Tensor) -> Tensor:  # seq [B, T, D], pos [B] -> [B, C]
    r = clf.resolved
    if clf.kind == "decoder":
        x = seq[torch.arange(seq.shape[0], device=seq.device), pos]
        if r.final_norm is not None:
            x = r.final_norm(x)
        W, b = clf.label_head()
        return (x @ W.T + (b if b is not None else 0.0)).float()
    # Encoders: the pooler / classification head read the sequence at index 0 ([CLS], right padding).
    pooled = r.pooler(seq) if r.pooler is not None else seq
    return r.head(pooled).float()


def _index_batch(obj: Any, rows: Tensor, B: int) -> Any:
    """Select ``rows`` of every tensor whose leading dim is the captured batch B (masks, rotary tables)."""
    if torch.is_tensor(obj):
        return obj.index_select(0, rows.to(obj.device)) if obj.dim() > 0 and obj.shape[0] == B and B > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_index_batch(o, rows, B) for o in obj)
    if isinstance(obj, list):
        return [_index_batch(o, rows, B) for o in obj]
    if isinstance(obj, dict):
        return {k: _index_batch(v, rows, B) for k, v in obj.items()}
    return obj


class SingleTokenTail(nn.Module):
    """tail(v): [P, D] -> [P, C] label logits, the paper's single-token protocol (method.md 3.1).

    Differentiable in v (ConceptSHAP / HI-Concept train through it). Set ``freeze=True`` to turn off
    gradients of the tail's own weights (the layers after L, final norm and head)."""

    def __init__(self, clf: Classifier, *, chunk: int = 4096, freeze: bool = False):
        super().__init__()
        self.clf = clf
        self.layer = clf.layer
        self.chunk = chunk
        self.call = self._capture()
        if freeze:
            for m in [*list(clf.resolved.layers)[self.layer:], clf.resolved.final_norm, clf.resolved.head,
                      clf.resolved.pooler]:
                if m is not None:
                    m.requires_grad_(False)

    @torch.no_grad()
    def _capture(self) -> LayerCall:
        tok = self.clf.tokenizer
        first = tok.cls_token_id if self.clf.kind == "encoder" and tok.cls_token_id is not None else self.clf.pad_id
        b = self.clf.batch([[int(first)]])
        with capture_layer_call(self.clf.resolved.layers[self.layer]) as store:
            if self.clf.kind == "decoder":
                self.clf.model.base_model(**{k: b[k] for k in ("input_ids", "attention_mask", "position_ids")},
                                          use_cache=False)
            else:
                self.clf.model(**{k: b[k] for k in ("input_ids", "attention_mask", "position_ids")})
        return store["call"]

    def forward(self, v: Tensor) -> Tensor:  # v: [P, D] -> [P, C]
        if v.dim() != 2 or v.shape[1] != self.clf.d_model:
            raise ValueError(f"tail: v must be [P, {self.clf.d_model}], got {tuple(v.shape)}")
        p = next(self.clf.model.parameters())
        outs = []
        for s in range(0, v.shape[0], self.chunk):
            h = v[s:s + self.chunk].to(device=p.device, dtype=p.dtype)[:, None, :]  # [p, 1, D]
            seq = run_layers(self.clf.resolved.layers, self.layer, h, self.call)
            outs.append(_head(self.clf, seq, torch.zeros(h.shape[0], dtype=torch.long, device=h.device)))
        if not outs:
            return v.new_zeros(0, self.clf.n_classes, dtype=torch.float32)
        return torch.cat(outs)


class ContextTail:
    """ctx_i(u): label logits of sentence i when the residual entering block L at its decision position is
    replaced by u (method.md 3.3; our extension). Build it on a batch of texts, then call repeatedly."""

    def __init__(self, clf: Classifier, texts: list[str]):
        self.clf = clf
        enc = clf.encode(texts)
        self.batch = clf.batch(enc.ids)
        with torch.no_grad(), capture_layer_call(clf.resolved.layers[clf.layer]) as store:
            self.clean_logits = clf.forward_batch(self.batch, hidden=False).logits  # [B, C]
        self.call: LayerCall = store["call"]
        self.h_in: Tensor = store["h"].detach()  # [B, T, D]: layer-L inputs of every position
        pos = self.batch["positions"]
        self.h_clean = self.h_in[torch.arange(len(texts), device=pos.device), pos].float()  # [B, D]

    def __len__(self) -> int:
        return self.h_in.shape[0]

    def __call__(self, u: Tensor, rows: Tensor | None = None, *, chunk: int = 64) -> Tensor:
        """u [P, D] placed into sentences ``rows`` [P] (default: row p = sentence p) -> logits [P, C]."""
        B = len(self)
        if rows is None:
            if u.shape[0] != B:
                raise ValueError(f"ContextTail: u has {u.shape[0]} rows for {B} sentences; pass rows=")
            rows = torch.arange(B)
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.h_in.device)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= B):
            raise ValueError(f"ContextTail: rows must be in 0..{B - 1}")
        outs = []
        grad = torch.is_grad_enabled() and u.requires_grad
        with contextlib.nullcontext() if grad else torch.no_grad():
            for s in range(0, u.shape[0], chunk):
                r = rows[s:s + chunk]
                h = self.h_in.index_select(0, r).clone()
                pos = self.batch["positions"].index_select(0, r)
                h[torch.arange(r.numel(), device=h.device), pos] = u[s:s + chunk].to(h.device, h.dtype)
                call = LayerCall(_index_batch(self.call.args, r, B), _index_batch(self.call.kwargs, r, B))
                seq = run_layers(self.clf.resolved.layers, self.clf.layer, h, call)
                outs.append(_head(self.clf, seq, pos))
        return torch.cat(outs) if outs else u.new_zeros(0, self.clf.n_classes)


@torch.no_grad()
def tail_ceiling(tail: SingleTokenTail, h: Tensor, logits: Tensor) -> float:
    """Share of rows where argmax tail(h) = argmax o (method.md 3.2): the reference for RAcc."""
    if h.shape[0] == 0:
        raise ValueError("tail_ceiling: empty input")
    return float((tail(h).argmax(-1).cpu() == logits.argmax(-1).cpu()).float().mean())
