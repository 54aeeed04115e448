"""Putting a vector back into the classifier (method.md section 3).

* :class:`SingleTokenTail` (the paper's protocol, 3.1): blocks L.. on a **length-1 sequence** whose only
  residual vector is v (position 0, no prefix), then the final norm and the C label-token rows of the
  unembedding. For Pythia (parallel residual) with one token the attention weight is 1 and rotary at
  position 0 is the identity, so this is a fixed per-vector function tail(v) [P, D] -> [P, C].
  For encoders (BERT/MiniLM) it means: the remaining encoder layers on a one-token sequence holding
  only v as [CLS] (so [CLS] attends to itself only; no text tokens), then pooler + classifier. Like the
  decoder version it is context-free and differs from the full model's prediction.
* :class:`ContextTail` (our extension, 3.3, flagged as such by callers): v replaces the residual entering
  block L at the real decision position of sentence i, with the real prefix. Sentences go in blocks;
  decoders reuse each block's prefix keys/values and recompute only the decision token, encoders re-run
  blocks L.. on the block's cached layer-L inputs; ctx_i(h_i) = o_i up to float error.

Both re-run the model's own HF blocks with the arguments (masks, rotary tables) captured from a real
forward (``hooks.capture_layer_call``), so any family in ``backbones.FAMILIES`` works unchanged.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import Tensor, nn

from transformers import DynamicCache

from concept_ext.classifier.model import Classifier, length_buckets
from concept_ext.classifier.hooks import LayerCall, capture_layer_call, replace_resid_pre, run_layers
from concept_ext.text.prompt import pad_batch, position_ids_from_mask

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
    replaced by u (method.md 3.3; our extension). Build it on a list of texts, then call repeatedly.

    Sentences are handled in length-bucketed blocks of ``block_size``; no forward ever holds more than one
    block. Block states are kept in an LRU bounded by ``cache_bytes`` (and by ``cache_blocks`` when given),
    so memory does not grow past the budget with the number of texts, while a test split whose states fit
    (MiniLM on 7,600 AG News sentences: about 0.7 GB) is built once and reused by every later call:
    the causality sweeps of all methods then cost no further full-model forward.

    * Decoders (causal): the prefix keys/values of every block do not depend on u. A block's state is its
      prefix cache (one ``use_cache=True`` forward over positions < decision, prompts left-padded so the
      decision token is last); a call runs only the decision token on a copy of that cache, with a
      pre-hook on block L putting u in place of the residual there (method.md 3.3, "HF fallback"). Blocks
      0..L-1 see that single token only, and their output there is discarded.
    * Encoders (bidirectional): u changes every position from block L+1 on, so a block's state is its
      layer-L inputs [b, T, D] and captured block arguments; a call re-runs blocks L.. on the whole
      sequence of the sentences involved.
    """

    max_cache_copy: int = 1 << 27
    """Most elements of prefix keys/values copied for one decoder chunk (512 MiB in fp32); ``chunk`` is
    lowered for long prompts / big models so that the per-call copy stays under it."""

    def __init__(self, clf: Classifier, texts: list[str], *, block_size: int = 64,
                 cache_blocks: Optional[int] = None, cache_bytes: int = 2 << 30):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"ContextTail: block_size must be a positive int, got {block_size!r}")
        if cache_blocks is not None and (not isinstance(cache_blocks, int) or cache_blocks < 1):
            raise ValueError(f"ContextTail: cache_blocks must be None or a positive int, got {cache_blocks!r}")
        if not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ValueError(f"ContextTail: cache_bytes must be a non-negative int, got {cache_bytes!r}")
        self.clf = clf
        self.block_size = block_size
        self.cache_blocks = cache_blocks
        self.cache_bytes = cache_bytes
        self._lru_bytes = 0
        self.builds = 0
        """Block states built so far (a full forward of that block each); for tests and profiling."""
        self._ids = clf.encode(texts).ids
        n, dev = len(self._ids), clf.device
        self.blocks: list[list[int]] = length_buckets([len(r) for r in self._ids], block_size)
        """Sentence indices of each block (length-bucketed)."""
        self._block_of = torch.empty(n, dtype=torch.long)  # [N] block of each sentence
        self._slot = torch.empty(n, dtype=torch.long)  # [N] its row inside the block
        for bi, idx in enumerate(self.blocks):
            self._block_of[idx] = bi
            self._slot[idx] = torch.arange(len(idx))
        self._lru: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.clean_logits = torch.empty(n, clf.n_classes, device=dev)  # [N, C] full-model logits o_i
        self.h_clean = torch.empty(n, clf.d_model, device=dev)  # [N, D] h_i (input of block L, decision token)
        with torch.no_grad():
            for idx in self.blocks:  # the clean pass, one block at a time, in the classifier's own padding
                out = clf.forward_batch(clf.batch([self._ids[i] for i in idx]), hidden=True)
                it = torch.as_tensor(idx, device=dev)
                self.clean_logits[it] = out.logits
                self.h_clean[it] = out.hidden

    def __len__(self) -> int:
        return len(self._ids)

    # -- per-block state ------------------------------------------------------------------------------
    @torch.no_grad()
    def _build(self, bi: int) -> dict[str, Any]:
        clf = self.clf
        ids = [self._ids[i] for i in self.blocks[bi]]
        if clf.kind == "encoder":
            b = clf.batch(ids)
            with capture_layer_call(clf.resolved.layers[clf.layer]) as store:
                clf.model(**{k: b[k] for k in ("input_ids", "attention_mask", "position_ids")})
            return {"h_in": store["h"].detach(), "call": store["call"], "pos": b["positions"]}
        input_ids, mask = pad_batch(ids, pad_id=clf.pad_id, side="left")  # decision token = last column
        pos_ids = position_ids_from_mask(mask)
        input_ids, mask, pos_ids = (t.to(clf.device) for t in (input_ids, mask, pos_ids))
        kv: list[tuple[Tensor, Tensor]] = []
        if input_ids.shape[1] > 1:
            out = clf.model.base_model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1],
                                       position_ids=pos_ids[:, :-1], use_cache=True)
            kv = _cache_layers(out.past_key_values)
        return {"kv": kv, "last_ids": input_ids[:, -1:], "mask": mask, "last_pos": pos_ids[:, -1:]}

    def _state(self, bi: int) -> dict[str, Any]:
        if bi in self._lru:
            self._lru.move_to_end(bi)
            return self._lru[bi]
        st = self._build(bi)
        self.builds += 1
        size = _nbytes(st)
        st["_bytes"] = size
        # Evict least recently used states until the new one fits the budget; the newest is always kept.
        while self._lru and ((self.cache_blocks is not None and len(self._lru) >= self.cache_blocks)
                             or self._lru_bytes + size > self.cache_bytes):
            _, old = self._lru.popitem(last=False)
            self._lru_bytes -= old["_bytes"]
        self._lru[bi] = st
        self._lru_bytes += size
        return st

    def _run(self, st: dict[str, Any], loc: Tensor, u: Tensor) -> Tensor:  # loc [p] rows in block, u [p, D]
        clf = self.clf
        L = clf.layer
        if clf.kind == "encoder":
            h = st["h_in"].index_select(0, loc).clone()  # [p, T, D]
            pos = st["pos"].index_select(0, loc)
            h[torch.arange(loc.numel(), device=h.device), pos] = u.to(h.dtype)
            B = st["h_in"].shape[0]
            call = LayerCall(_index_batch(st["call"].args, loc, B), _index_batch(st["call"].kwargs, loc, B))
            return _head(clf, run_layers(clf.resolved.layers, L, h, call), pos)
        cache = DynamicCache()  # a fresh copy per call: HF caches grow in place
        for li, (k, v) in enumerate(st["kv"]):
            cache.update(k.index_select(0, loc), v.index_select(0, loc), li)
        zero = torch.zeros(loc.numel(), dtype=torch.long, device=loc.device)
        with replace_resid_pre(clf.resolved.layers[L], zero, u):
            out = clf.model.base_model(input_ids=st["last_ids"].index_select(0, loc),
                                       attention_mask=st["mask"].index_select(0, loc),
                                       position_ids=st["last_pos"].index_select(0, loc),
                                       past_key_values=cache if st["kv"] else None, use_cache=True)
        x = out.last_hidden_state[:, -1]  # [p, D], already through the final norm
        W, b = clf.label_head()
        return (x @ W.T + (b if b is not None else 0.0)).float()

    def __call__(self, u: Tensor, rows: Tensor | None = None, *, chunk: int = 64) -> Tensor:
        """u [P, D] placed into sentences ``rows`` [P] (default: row p = sentence p) -> logits [P, C].

        Vectors are grouped by block (stable), each block's state is built at most once per call (kept
        in the LRU), and at most ``chunk`` vectors go through the model at once."""
        N = len(self)
        if u.dim() != 2 or u.shape[1] != self.clf.d_model:
            raise ValueError(f"ContextTail: u must be [P, {self.clf.d_model}], got {tuple(u.shape)}")
        if rows is None:
            if u.shape[0] != N:
                raise ValueError(f"ContextTail: u has {u.shape[0]} rows for {N} sentences; pass rows=")
            rows = torch.arange(N)
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        if rows.shape != (u.shape[0],):
            raise ValueError(f"ContextTail: rows must be [P] with P = {u.shape[0]}, got {tuple(rows.shape)}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= N):
            raise ValueError(f"ContextTail: rows must be in 0..{N - 1}")
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"ContextTail: chunk must be a positive int, got {chunk!r}")
        p = next(self.clf.model.parameters())
        u = u.to(device=p.device, dtype=p.dtype)
        blk = self._block_of[rows]
        order = torch.argsort(blk, stable=True)  # [P] vectors grouped by block
        bounds = torch.unique_consecutive(blk[order], return_counts=True)
        outs = []
        grad = torch.is_grad_enabled() and u.requires_grad
        with contextlib.nullcontext() if grad else torch.no_grad():
            s = 0
            for bi, cnt in zip(bounds[0].tolist(), bounds[1].tolist()):
                st = self._state(bi)
                # Decoders copy the prefix cache per vector: cap the copy at max_cache_copy elements.
                per = sum(k[0].numel() + v[0].numel() for k, v in st.get("kv", ()))
                step = max(1, min(chunk, self.max_cache_copy // per)) if per else chunk
                for a in range(s, s + cnt, step):
                    sel = order[a:min(a + step, s + cnt)]
                    loc = self._slot[rows[sel]].to(p.device)
                    outs.append(self._run(st, loc, u.index_select(0, sel.to(p.device))))
                s += cnt
        if not outs:
            return u.new_zeros(0, self.clf.n_classes, dtype=torch.float32)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel())
        return torch.cat(outs).index_select(0, inv.to(p.device))


def _nbytes(obj: Any) -> int:
    """Bytes held by the tensors inside a (nested) block state."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if isinstance(obj, LayerCall):
        return _nbytes(obj.args) + _nbytes(obj.kwargs)
    return 0


def _cache_layers(cache: Any) -> list[tuple[Tensor, Tensor]]:
    """Per-layer (keys, values) of an HF cache (``DynamicCache.layers`` or the legacy tuple form)."""
    if hasattr(cache, "layers"):
        return [(lay.keys, lay.values) for lay in cache.layers]
    return [(k, v) for k, v, *_ in cache]


@torch.no_grad()
def tail_ceiling(tail: SingleTokenTail, h: Tensor, logits: Tensor) -> float:
    """Share of rows where argmax tail(h) = argmax o (method.md 3.2): the reference for RAcc."""
    if h.shape[0] == 0:
        raise ValueError("tail_ceiling: empty input")
    return float((tail(h).argmax(-1).cpu() == logits.argmax(-1).cpu()).float().mean())
