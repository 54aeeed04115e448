"""Prompt template, label-token ids, padding, decision positions and position ids (method.md 1.2-1.3).

Decoder prompt (the paper's template, no few-shot examples, no BOS)::

    "{text}\\n\\nOPTIONS:\\n0(World)\\n1(Sports)\\n2(Business)\\n3(SciTech)\\n"  (+ "{label digit}")

The label digit is never fed: attention is causal, so the logits at the last prompt position (position
-2 of prompt+digit) are the ones that predict it (method.md 1.2). Encoders get the raw text with their
own special tokens; their decision token is position 0 ([CLS]).
"""
from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from concept_ext.config.clf import PromptConfig

__all__ = ["build_prompt", "label_token_ids", "EncodedTexts", "encode_texts", "pad_batch",
           "position_ids_from_mask", "decision_positions"]

_BR = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)


def build_prompt(text: str, class_names: Sequence[str], *, template: str = "options_v1") -> str:
    """The paper's prompt without the label digit (method.md 1.2)."""
    if template != "options_v1":
        raise ValueError(f"template: unknown template {template!r}")
    options = "".join(f"{i}({name})\n" for i, name in enumerate(class_names))
    return f"{text}\n\nOPTIONS:\n{options}"


def label_token_ids(tokenizer, n_classes: int, *, class_names: Sequence[str] | None = None) -> list[int]:
    """Token ids of the digits ``0..C-1``, asserting each is one token and that prompt+digit tokenises as
    the prompt's tokens plus exactly that token (method.md 1.2). Never hard-coded."""
    if not 1 <= n_classes <= 10:
        raise ValueError(f"n_classes must be in 1..10 (single-digit labels), got {n_classes}")
    ids = []
    for c in range(n_classes):
        toks = tokenizer(str(c), add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(f"label digit {c!r} is {len(toks)} tokens {toks} under this tokenizer; "
                             "the restricted label head needs single-token digits")
        ids.append(int(toks[0]))
    names = list(class_names) if class_names is not None else [f"c{c}" for c in range(n_classes)]
    prompt = build_prompt("Example sentence.", names)
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for c, tid in enumerate(ids):
        full = tokenizer(prompt + str(c), add_special_tokens=False)["input_ids"]
        if full != base + [tid]:
            raise ValueError(f"prompt + {c!r} does not tokenise as prompt tokens + [{tid}] ({full[-3:]} vs "
                             f"{base[-2:]} + [{tid}]): the decision position would be wrong")
    return ids


class EncodedTexts(NamedTuple):
    """Unpadded token ids of a list of inputs."""

    ids: list[list[int]]
    """Token ids per input, after truncation."""
    seen_texts: list[str]
    """The part of each text the model saw (method.md 9 oddity 13: without the template)."""
    truncated: list[bool]
    """Whether the text was cut by truncation."""


def encode_texts(tokenizer, texts: Sequence[str], class_names: Sequence[str], cfg: PromptConfig, *,
                 kind: str = "decoder", max_length: int | None = None) -> EncodedTexts:
    """Tokenise texts for ``kind`` = ``decoder`` (prompt template) or ``encoder`` (raw text + specials).

    ``max_length`` overrides ``cfg.max_length`` (e.g. an encoder's 512 positions)."""
    limit = max_length if max_length is not None else cfg.max_length
    if cfg.strip_html:
        texts = [_BR.sub(" ", t) for t in texts]
    if kind == "encoder":
        # Encoders always cut the end: [CLS] (the decision token) must stay first.
        enc = tokenizer(list(texts), truncation=True, max_length=limit, return_offsets_mapping=True)
        ids, seen, cut = [], [], []
        for t, row, offs in zip(texts, enc["input_ids"], enc["offset_mapping"]):
            ids.append(list(row))
            ends = [e for s, e in offs if e > 0]
            end = max(ends) if ends else 0
            seen.append(t[:end])
            cut.append(end < len(t.rstrip()))
        return EncodedTexts(ids, seen, cut)
    if kind != "decoder":
        raise ValueError(f"kind must be 'decoder' or 'encoder', got {kind!r}")
    prompts = [build_prompt(t, class_names, template=cfg.template) for t in texts]
    enc = tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True)
    eos = [tokenizer.eos_token_id] if cfg.append_eos else []
    room = limit - len(eos)
    ids, seen, cut = [], [], []
    for t, row, offs in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        row = list(row)
        if len(row) <= room:
            ids.append(row + eos)
            seen.append(t)
            cut.append(False)
            continue
        if cfg.truncation_side == "left":
            start = offs[len(row) - room][0]  # first kept character of the prompt
            ids.append(row[-room:] + eos)
            seen.append(t[min(start, len(t)):])
        else:
            end = offs[room - 1][1]
            ids.append(row[:room] + eos)
            seen.append(t[:min(end, len(t))])
        cut.append(True)
    return EncodedTexts(ids, seen, cut)


def pad_batch(ids: Sequence[Sequence[int]], *, pad_id: int, side: str = "left") -> tuple[Tensor, Tensor]:
    """Pad to the longest row. Returns (input_ids [B, T] int64, attention_mask [B, T] int64)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not ids:
        raise ValueError("pad_batch: empty batch")
    T = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, r in enumerate(ids):
        n = len(r)
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        input_ids[i, sl] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, sl] = 1
    return input_ids, mask


def position_ids_from_mask(mask: Tensor) -> Tensor:  # mask: [B, T] -> [B, T]
    """``cumsum(mask) - 1`` clamped at 0: pads do not count as positions (method.md 9 oddity 12)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def decision_positions(mask: Tensor, *, kind: str = "decoder") -> Tensor:  # mask: [B, T] -> [B]
    """Index of the decision token per row: the last real token (decoder) or the first one (encoder's
    [CLS]), from the mask so either padding side works."""
    T = mask.shape[-1]
    ar = torch.arange(T, device=mask.device)
    if kind == "decoder":
        return torch.where(mask.bool(), ar, -1).amax(-1)
    return torch.where(mask.bool(), ar, T).amin(-1)
