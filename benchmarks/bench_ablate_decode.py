"""Concept ablation (method.md sections 3.1, 6.3): ablate_decode vs re-decoding each ablated set densely.

Group ``ablate_decode-<size>-F20`` compares, in the same process and with |F| = 20 kept concepts:

* ``ours``: :func:`concept_ext.ablate_decode` - base reconstruction from the kept latents plus one rank-1
  correction per (row, active concept) pair, O(pairs * d);
* ``naive``: the kept code scattered into a dense ``[N, m]`` matrix, ``base = z @ W_dec + b_dec``, then one
  pass per concept over the rows where it is active: zero that column and decode those rows densely again.

Each row draws about a third of its k latents from the 20 concepts (ClassifSAE's concept latents are
the frequently active ones), the rest from the other latents. The naive outputs are put in pair order
and compared with ours before timing. Runs at the paper-scale size CS (and the smoke size).
"""
from __future__ import annotations

import pytest
import torch

import concept_ext

from conftest import FULL, SIZES

N_CONCEPTS = 20
IMPLS = ["ours", "naive"]
ABLATE_SIZES = [s for s in SIZES if s.name in ("CS", "smoke")]
_CACHE: dict = {}


def _inputs(size):
    if size.name not in _CACHE:
        _CACHE.clear()
        g = torch.Generator().manual_seed(0)
        n, d, m, k = size.n, size.d, size.m, size.k
        keep = torch.randperm(m, generator=g)[:N_CONCEPTS]
        others = torch.ones(m, dtype=torch.bool)
        others[keep] = False
        other_ids = torch.nonzero(others).squeeze(1)
        n_con = max(1, k // 3)
        con = keep[torch.multinomial(torch.ones(n, N_CONCEPTS), n_con, replacement=False, generator=g)]
        rest = other_ids[torch.multinomial(torch.ones(n, other_ids.numel()), k - n_con, generator=g)]
        idx = torch.cat([con, rest], 1)
        values = torch.rand(n, k, generator=g)
        W = torch.randn(m, d, generator=g) / d**0.5
        b = torch.randn(d, generator=g)
        _CACHE[size.name] = (values, idx, W, b, keep)
    return _CACHE[size.name]


def _naive(values, idx, W, b, keep):
    """Returns (base [N, d], ablated [P, d], pair_row [P], pair_concept [P]) in the op's pair order."""
    n, m = values.shape[0], W.shape[0]
    kept = torch.isin(idx, keep)
    z = torch.zeros(n, m, dtype=values.dtype).scatter(1, idx, torch.where(kept, values, 0.0))
    base = z @ W + b
    rows_all, cons_all, outs = [], [], []
    for c, lat in enumerate(keep.tolist()):
        rows = torch.nonzero(((idx == lat) & (values > 0)).any(1)).squeeze(1)
        zc = z[rows]
        zc[:, lat] = 0.0
        outs.append(zc @ W + b)
        rows_all.append(rows)
        cons_all.append(torch.full_like(rows, c))
    rows, cons, abl = torch.cat(rows_all), torch.cat(cons_all), torch.cat(outs)
    order = torch.argsort(rows * keep.numel() + cons)
    return base, abl[order], rows[order], cons[order]


def _run(impl, values, idx, W, b, keep):
    if impl == "ours":
        return tuple(concept_ext.ablate_decode(values, idx, W, b, keep))
    return _naive(values, idx, W, b, keep)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", ABLATE_SIZES, ids=lambda s: s.name)
def test_ablate_decode(benchmark, size, impl):
    values, idx, W, b, keep = _inputs(size)
    benchmark.group = f"ablate_decode-{size.name}-F{N_CONCEPTS}"
    benchmark.extra_info.update(size._asdict(), n_concepts=N_CONCEPTS)

    def run():
        with torch.no_grad():
            return _run(impl, values, idx, W, b, keep)

    rounds = (3 if impl == "naive" else 10) if FULL else 1
    out = benchmark.pedantic(run, rounds=rounds, warmup_rounds=1 if FULL else 0)
    # The timed result against the other implementation (the naive loop is the op's reference).
    other = _run("naive" if impl == "ours" else "ours", values, idx, W, b, keep)
    torch.testing.assert_close(out[0], other[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], other[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(out[2], other[2]) and torch.equal(out[3], other[3])
    assert out[2].numel() > 0  # the sizes give ablation pairs to check
    benchmark.extra_info["pairs"] = int(out[2].numel())
