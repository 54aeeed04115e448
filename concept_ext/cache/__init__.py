"""Cached model states: hidden activations per split (:mod:`~concept_ext.cache.activations`) and the
sentence-encoder embeddings used by the interpretability metrics (:mod:`~concept_ext.cache.embed`)."""
