"""The peer libraries for the interop tests (issue 25), imported once; a test module that needs one calls
:func:`need`, which skips with the reason (and the pinned install) when the import fails."""
from __future__ import annotations

import contextlib
import importlib
import io

import pytest
import torch

PINS = {"sparsify": "eai-sparsify==1.3.3", "sae_lens": "sae-lens>=6.54,<7"}


def need(name: str):
    """The imported peer ``name`` (``"sparsify"`` or ``"sae_lens"``), or a skip naming the install."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # sparsify prints "Triton not installed ..."
            mod = importlib.import_module(name)
            if name == "sparsify":
                getattr(mod, "SparseCoder")  # never the unrelated PyPI package also called sparsify
            else:
                importlib.import_module("sae_lens.saes.topk_sae")
    except Exception as exc:  # noqa: BLE001 - any import failure is a skip reason
        pytest.skip(f"{name} not importable ({type(exc).__name__}: {exc}); pip install '{PINS[name]}'")
    return mod


def same_code(values, indices, ref_dense, *, atol: float) -> None:
    """Tie-aware check of a sparse code against a library's dense code ``[N, m]`` (performance.md 3.6):
    every selected index holds the reference's value there, and the multiset of selected values equals
    the reference's k largest."""
    n, k = values.shape
    got_at = ref_dense.gather(1, indices)  # the reference's values at our indices
    torch.testing.assert_close(values, got_at.to(values.dtype), atol=atol, rtol=atol)
    top = ref_dense.topk(k, dim=1).values.to(values.dtype)
    torch.testing.assert_close(values.sort(1, descending=True).values, top, atol=atol, rtol=atol)


def same_selection(values, indices, ref_values, ref_indices, m: int, *, atol: float) -> None:
    """Tie-aware check of two sparse codes (any order within a row)."""
    dense = ref_values.new_zeros(ref_values.shape[0], m).scatter(1, ref_indices, ref_values)
    same_code(values, indices, dense, atol=atol)


TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
