"""Sample-input generators for the custom ops (design.md section 10).

One generator per op yields ``(label, kwargs)`` cases: odd sizes, k = 1 and k = m, ties, empty batch,
non-contiguous inputs, all-zero rows, int32 indices. Every call draws fresh random inputs from the
given generator, so correctness tests run on new data each time they are parametrised with a seed.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

# (N, d, m, k): odd sizes, k = 1, k = m, a row count above the reference's block size.
ENCODE_SHAPES = [(7, 5, 11, 3), (1, 3, 4, 1), (13, 9, 6, 6), (0, 4, 8, 2), (33, 16, 64, 8), (1030, 8, 40, 5)]
DECODE_SHAPES = [(7, 3, 11, 5), (1, 1, 4, 2), (19, 6, 6, 3), (0, 2, 8, 4), (64, 8, 128, 16)]


def make_code(n: int, k: int, m: int, *, dtype: torch.dtype, gen: torch.Generator, device="cpu",
              distinct: bool = True, zeros_frac: float = 0.2) -> tuple[Tensor, Tensor]:
    """A random sparse code: ``values [n, k]`` >= 0 (some exact zeros) and ``indices [n, k]``."""
    if distinct:
        idx = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(n)]) if n else torch.zeros(
            (0, k), dtype=torch.int64)
    else:
        idx = torch.randint(0, m, (n, k), generator=gen)
    vals = torch.rand((n, k), generator=gen, dtype=torch.float64) * 2
    vals = torch.where(torch.rand((n, k), generator=gen) < zeros_frac, torch.zeros_like(vals), vals)
    vals, order = vals.sort(dim=1, descending=True)
    idx = idx.gather(1, order)
    return vals.to(dtype=dtype, device=device), idx.to(device)


def encode_cases(dtype: torch.dtype, gen: torch.Generator, device="cpu") -> Iterator[tuple[str, dict]]:
    """Cases for ``topk_encode``."""
    for n, d, m, k in ENCODE_SHAPES:
        x = torch.randn((n, d), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        w = torch.randn((d, m), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        b = torch.randn((m,), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        yield f"n{n}_d{d}_m{m}_k{k}", dict(x=x, W_enc=w, b_enc=b, k=k)
    # Ties: duplicated encoder columns give equal pre-activations across latents.
    x = torch.randn((9, 6), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    w = torch.randn((6, 5), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device).repeat(1, 4)
    yield "ties", dict(x=x, W_enc=w, b_enc=torch.zeros(20, dtype=dtype, device=device), k=7)
    # All-negative pre-activations: every kept value is ReLU'd to 0.
    yield "all_negative", dict(x=torch.zeros((5, 4), dtype=dtype, device=device),
                               W_enc=torch.randn((4, 9), generator=gen).to(dtype=dtype, device=device),
                               b_enc=-torch.rand((9,), generator=gen).to(dtype=dtype, device=device) - 0.1, k=3)
    # Non-contiguous inputs: a transposed weight and a strided batch.
    xb = torch.randn((14, 7), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)[::2]
    wt = torch.randn((12, 7), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device).t()
    yield "non_contiguous", dict(x=xb, W_enc=wt, b_enc=torch.randn((12,), generator=gen).to(dtype=dtype,
                                                                                           device=device), k=4)


def decode_cases(dtype: torch.dtype, gen: torch.Generator, device="cpu") -> Iterator[tuple[str, dict]]:
    """Cases for ``sparse_decode`` (and the shape part of ``ablate_decode``)."""
    for n, d, m, k in DECODE_SHAPES:
        v, i = make_code(n, k, m, dtype=dtype, gen=gen, device=device)
        w = torch.randn((m, d), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        b = torch.randn((d,), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        yield f"n{n}_d{d}_m{m}_k{k}", dict(values=v, indices=i, W_dec=w, b_dec=b)
    v, i = make_code(11, 4, 9, dtype=dtype, gen=gen, device=device)
    w = torch.randn((9, 5), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    yield "int32_indices", dict(values=v, indices=i.to(torch.int32), W_dec=w,
                                b_dec=torch.zeros(5, dtype=dtype, device=device))
    vv, ii = make_code(22, 3, 10, dtype=dtype, gen=gen, device=device)
    wt = torch.randn((7, 10), generator=gen, dtype=torch.float64).to(dtype=dtype, device=device).t()
    yield "non_contiguous", dict(values=vv[::2], indices=ii[::2], W_dec=wt,
                                 b_dec=torch.randn((7,), generator=gen).to(dtype=dtype, device=device))
    v, i = make_code(6, 3, 12, dtype=dtype, gen=gen, device=device, distinct=False)
    yield "repeated_latent_in_row", dict(values=v, indices=i, W_dec=torch.randn(
        (12, 4), generator=gen).to(dtype=dtype, device=device), b_dec=torch.zeros(4, dtype=dtype, device=device))


def rate_cases(dtype: torch.dtype, gen: torch.Generator, device="cpu") -> Iterator[tuple[str, dict]]:
    """Cases for ``activation_rate_loss``: dense columns (many rows per latent), ties, tiny rates."""
    for n, k, m, rate in [(40, 3, 5, 0.1), (100, 8, 16, 0.1), (57, 4, 4, 0.25), (10, 2, 30, 0.1),
                          (0, 3, 8, 0.1), (64, 5, 7, 0.0), (20, 3, 6, 1.0)]:
        v, i = make_code(n, k, m, dtype=dtype, gen=gen, device=device)
        yield f"n{n}_k{k}_m{m}_r{rate}", dict(values=v, indices=i, n_latents=m, rate=rate)
    # Ties: values drawn from a tiny set so equal values straddle the m_keep boundary.
    v, i = make_code(50, 4, 6, dtype=dtype, gen=gen, device=device)
    v = (v * 2).round() / 2
    yield "ties", dict(values=v, indices=i, n_latents=6, rate=0.1)


# W_enc layouts for the grad_W_enc layout rule (reference.weight_grad_like): name -> a [d, m] view of
# fresh memory built from a [d, m] tensor w.
W_LAYOUTS = {
    "row_major": lambda w: w.contiguous(),
    "transposed": lambda w: w.t().contiguous().t(),  # nn.Linear's [m, d] seen transposed (TopKSAE)
    "padded_transposed": lambda w: torch.cat([w.t(), w.t()], 1)[:, : w.shape[0]].t(),  # strides (1, 2d)
    "column_sliced": lambda w: torch.cat([w, w], 1)[:, ::2],  # strides (2m, 2): not cuBLAS-readable
}
# (x dtype, W_enc dtype) for those tests: the same-dtype cases and the opt-in bf16-weights one.
LAYOUT_DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64),
                 (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
