"""Interoperability with the SAE libraries people already use (issue 25): SAELens and sparsify.

* :func:`load_sae` / :func:`export_sae` (``formats.py``): their on-disk TopK SAE formats <-> a concept_ext
  :class:`~concept_ext.sae.model.TopKSAE` / :class:`~concept_ext.sae.model.ClassifSAE`;
* :func:`accelerate` / :func:`undo` (``live.py``): run a live sparsify ``SparseCoder`` or SAELens
  TopK SAE on the concept_ext kernels, keeping its type, parameters and outputs.

Neither library is imported by this package; only the objects and files they make are read.
"""
from concept_ext.interop.live import Accelerated, accelerate, is_accelerated, undo
from concept_ext.interop.formats import FORMATS, HEAD_FILE, detect_format, export_sae, load_sae

__all__ = ["load_sae", "export_sae", "detect_format", "FORMATS", "HEAD_FILE", "accelerate", "undo",
           "is_accelerated", "Accelerated"]
