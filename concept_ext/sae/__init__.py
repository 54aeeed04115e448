"""Sparse autoencoders: the TopK SAE / ClassifSAE model, its losses, the trainer and its checkpoints.

* :mod:`~concept_ext.sae.model`: :class:`TopKSAE`, :class:`ClassifSAE` (encode/decode/classify on the ops);
* :mod:`~concept_ext.sae.losses`: every loss term of method.md 2.3 and 8;
* :mod:`~concept_ext.sae.trainer`: :class:`Trainer` and :func:`train_sae` (resumable, distributed);
* :mod:`~concept_ext.sae.graph_step`: the training step as one CUDA graph replay;
* :mod:`~concept_ext.sae.state`: data order, epoch counter, firing statistics, schedule;
* :mod:`~concept_ext.sae.checkpoint`: the on-disk SAE format (safetensors + cfg.json).
"""
