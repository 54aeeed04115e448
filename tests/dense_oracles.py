"""Deliberately naive dense implementations, written independently of ``concept_ext.ops.reference``.

They check the reference itself (which is the oracle of the kernels) against the formulas of
method.md: everything here materialises the dense ``[N, m]`` code.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def dense_code(values: Tensor, indices: Tensor, m: int) -> Tensor:
    """``z [N, m]`` with ``values`` scattered (summed) at ``indices``; float64."""
    z = torch.zeros((values.shape[0], m), dtype=torch.float64)
    z.scatter_add_(1, indices.long().cpu(), values.double().cpu())
    return z


def dense_decode(values, indices, W_dec, b_dec) -> Tensor:
    return dense_code(values, indices, W_dec.shape[0]) @ W_dec.double().cpu() + b_dec.double().cpu()


def dense_rate_loss(values, indices, m: int, rate: float) -> Tensor:
    """L_ar as method.md section 2.3 writes it, with a column top-k over the dense code."""
    n = values.shape[0]
    if n == 0:
        return torch.zeros((), dtype=torch.float64)
    z = dense_code(values.clamp_min(0), indices, m)
    m_keep = int(math.floor(rate * n + 1e-9))
    top = torch.topk(z, m_keep, dim=0).values.sum() if m_keep > 0 else 0.0
    return (z.sum() - top) / n


def pre_activations(x, W_enc, b_enc) -> Tensor:
    return x.double().cpu() @ W_enc.double().cpu() + b_enc.double().cpu()


def naive_ablation(values, indices, W_dec, b_dec, keep, target_norm=None):
    """Loop over rows and kept concepts; re-decode every ablated set from a dense code."""
    m = W_dec.shape[0]
    z = dense_code(values, indices, m)
    keep = keep.long().cpu()
    mask = torch.zeros(m, dtype=torch.float64)
    mask[keep] = 1
    W, b = W_dec.double().cpu(), b_dec.double().cpu()

    def scale(r, i):
        if target_norm is None:
            return r
        return r * target_norm[i].double().cpu() / (r.norm() + 1e-9)

    base, abl, rows, cons = [], [], [], []
    for i in range(z.shape[0]):
        zf = z[i] * mask
        base.append(scale(zf @ W + b, i))
        for c, j in enumerate(keep.tolist()):
            if bool(((indices[i].long().cpu() == j) & (values[i].cpu() > 0)).any()):
                za = zf.clone()
                za[j] = 0
                abl.append(scale(za @ W + b, i))
                rows.append(i)
                cons.append(c)
    d = W.shape[1]
    stack = lambda xs: torch.stack(xs) if xs else torch.zeros((0, d), dtype=torch.float64)  # noqa: E731
    return stack(base), stack(abl), torch.tensor(rows, dtype=torch.int64), torch.tensor(cons, dtype=torch.int64)
