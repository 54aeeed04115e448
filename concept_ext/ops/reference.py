"""Pure-PyTorch reference implementations of every custom op.

These functions are the contract of the ops: the C++ and CUDA kernels must agree with them (the tests
compare on fresh random inputs), they serve as the ``CompositeExplicitAutograd`` kernels when the
compiled extension is absent, and the benchmarks use them as a baseline.

They are written for clarity and exactness, with the memory behaviour of the fast kernels where it is
cheap to keep (no dense ``[N, m]`` tensors in the decode, the activation-rate loss or the ablation).
Semantics (method.md sections 2.1, 2.3 and 3.1):

* ``topk_encode``: ``pre = x @ W_enc + b_enc``; the k largest pre-activations of each row, ReLU'd,
  sorted descending; ties between equal pre-activations are implementation-defined. A NaN in ``x``
  or in the weights raises (the Python wrapper checks; a NaN would otherwise make top-k selection
  meaningless).
* ``sparse_decode``: ``x_hat[i] = sum_j values[i, j] * W_dec[indices[i, j]] + b_dec``.
* ``activation_rate_loss``: with ``m_keep = floor(rate * N)``, for each latent the sum of its positive
  activations minus the sum of its ``m_keep`` largest ones; summed over latents and divided by ``N``.
  Entries whose value is <= 0 are inactive (never in the top set). The gradient w.r.t. ``values`` is
  ``1/N`` for every entry outside its latent's top set and 0 inside it; among equal values the entry
  that comes first in row-major order of ``[N, k]`` wins the top place.
* ``ablate_decode``: see :func:`ablate_decode`; ``ablate_decode_padded`` is the same pass with one
  output slot per code entry (static shapes, no host synchronisation), see :func:`ablate_decode_padded`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

__all__ = [
    "topk_encode",
    "topk_encode_backward",
    "sparse_decode",
    "sparse_decode_backward",
    "activation_rate_loss",
    "activation_rate_loss_backward",
    "activation_rate_top_mask",
    "ablate_decode",
    "ablate_decode_padded",
    "RESCALE_EPS",
]

#: Added to the norm of a reconstruction before rescaling it to a target norm (method.md section 3.1).
RESCALE_EPS = 1e-9

# Rows per block in the reference encode: keeps the [block, m] pre-activation tile small instead of
# materialising [N, m] at once.
_ENCODE_BLOCK = 1024


def _check_indices(indices: Tensor, m: int, name: str = "indices") -> None:
    """Raise ``IndexError`` for ids outside ``[0, m)``: some fast paths (``embedding_bag`` on CPU,
    ``bincount``) would otherwise read out of bounds or silently grow. Skipped during CUDA-graph
    capture, where reading a device value is not allowed, and while tracing (``torch.compile``, AOT
    autograd), where the values are symbolic."""
    if indices.numel() == 0 or (indices.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if torch.compiler.is_compiling() or is_fake(indices):
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= m:
        raise IndexError(f"{name} must lie in [0, {m}), got values in [{lo}, {hi}]")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Encode and keep the top-k latents per row.

    Args:
        x: ``[N, d]`` inputs.
        W_enc: ``[d, m]`` encoder weights.
        b_enc: ``[m]`` encoder bias.
        k: number of latents kept per row, ``1 <= k <= m``.

    Returns:
        ``values [N, k]`` (ReLU of the selected pre-activations, sorted descending, dtype of ``x``) and
        ``indices [N, k]`` (int64 latent ids).
    """
    n, m = x.shape[0], W_enc.shape[1]
    acc = _acc_dtype(x.dtype)
    values = x.new_empty((n, k))
    indices = torch.empty((n, k), dtype=torch.int64, device=x.device)
    w, b = W_enc.to(acc), b_enc.to(acc)
    for start in range(0, n, _ENCODE_BLOCK):
        stop = min(start + _ENCODE_BLOCK, n)
        pre = torch.addmm(b, x[start:stop].to(acc), w)  # [block, m]
        top, idx = torch.topk(pre, k, dim=1, largest=True, sorted=True)
        values[start:stop] = top.clamp_min(0).to(x.dtype)
        indices[start:stop] = idx
    return values, indices


def weight_grad_like(W_enc: Tensor, grad_t: Tensor) -> Tensor:
    """``grad_t [m, d]`` (= grad_W_enc^T) as grad_W_enc ``[d, m]`` in W_enc's dtype and layout rule, the
    one every kernel follows: the transposed layout (strides (1, d), ``grad_t``'s own memory) when W_enc is
    the transpose of a contiguous ``[m, d]`` matrix, as TopKSAE holds it; row-major otherwise."""
    if is_transposed_contiguous(W_enc):
        return grad_t.to(W_enc.dtype).contiguous().t()
    return grad_t.t().to(W_enc.dtype).contiguous()


def is_transposed_contiguous(t: Tensor) -> bool:
    """True when the 2-D ``t`` is the transpose of a contiguous matrix (strides (1, rows), both sizes > 1):
    nn.Linear's ``[m, d]`` weight seen as W_enc ``[d, m]``."""
    return t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1 and t.stride() == (1, t.shape[0])


def topk_encode_backward(
    grad_values: Tensor,  # [N, k]
    values: Tensor,  # [N, k]
    indices: Tensor,  # [N, k]
    x: Tensor,  # [N, d]
    W_enc: Tensor,  # [d, m]
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`topk_encode` w.r.t. ``x``, ``W_enc`` and ``b_enc``.

    ``deterministic`` asks the CUDA kernel for a fixed summation order; it does not change the result
    beyond rounding, and this reference ignores it.

    Only the k selected pre-activations per row receive gradient, and only where the ReLU passed
    (``values > 0``). ``grad_W_enc[:, j] = sum_{(i, r): indices[i, r] = j} g[i, r] * x[i]`` is a
    scatter over the selected pairs, never a dense ``[N, m]`` product.
    """
    n, d = x.shape
    m = W_enc.shape[1]
    acc = _acc_dtype(x.dtype)
    idx = indices.long()
    g = torch.where(values > 0, grad_values, torch.zeros_like(grad_values)).to(acc)  # [N, k]
    # grad_x[i] = sum_r g[i, r] * W_enc[:, idx[i, r]]
    w_t = W_enc.to(acc).t()  # [m, d]
    grad_x = torch.nn.functional.embedding_bag(
        idx, w_t, per_sample_weights=g, mode="sum"
    ) if n > 0 else x.new_zeros((0, d), dtype=acc)
    grad_w_t = torch.zeros((m, d), dtype=acc, device=x.device)  # [m, d] = grad_W_enc^T
    grad_b = torch.zeros((m,), dtype=acc, device=x.device)
    if n > 0:
        rows = torch.arange(n, device=x.device).repeat_interleave(idx.shape[1])  # [N*k]
        flat_idx, flat_g = idx.reshape(-1), g.reshape(-1)
        grad_w_t.index_add_(0, flat_idx, x.to(acc)[rows] * flat_g[:, None])
        grad_b.index_add_(0, flat_idx, flat_g)
    return grad_x.to(x.dtype), weight_grad_like(W_enc, grad_w_t), grad_b.to(W_enc.dtype)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """``x_hat [N, d] = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec`` (a gather-sum).

    Args:
        values: ``[N, k]`` latent activations.
        indices: ``[N, k]`` int64/int32 latent ids in ``[0, m)``.
        W_dec: ``[m, d]`` decoder weights.
        b_dec: ``[d]`` decoder bias.
    """
    n, d = values.shape[0], W_dec.shape[1]
    acc = _acc_dtype(W_dec.dtype)
    _check_indices(indices, W_dec.shape[0])
    if n == 0:
        return W_dec.new_empty((0, d))
    out = torch.nn.functional.embedding_bag(
        indices.long(), W_dec.to(acc), per_sample_weights=values.to(acc), mode="sum"
    )
    return (out + b_dec.to(acc)).to(W_dec.dtype)


def sparse_decode_backward(
    grad_out: Tensor,  # [N, d]
    values: Tensor,  # [N, k]
    indices: Tensor,  # [N, k]
    W_dec: Tensor,  # [m, d]
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`sparse_decode` w.r.t. ``values`` and ``W_dec``.

    ``deterministic`` asks the CUDA kernel for a fixed summation order (ignored here, see
    :func:`topk_encode_backward`).

    ``grad_values[i, j] = <grad_out[i], W_dec[indices[i, j]]>`` and
    ``grad_W_dec[l] = sum_{(i, j): indices[i, j] = l} values[i, j] * grad_out[i]`` (a scatter by
    latent; ``grad_b_dec = grad_out.sum(0)`` is computed by the caller).
    """
    n, k = values.shape
    m, d = W_dec.shape
    acc = _acc_dtype(W_dec.dtype)
    _check_indices(indices, m)
    idx = indices.long()
    g = grad_out.to(acc)
    grad_w = torch.zeros((m, d), dtype=acc, device=W_dec.device)
    if n == 0:
        return values.new_zeros((0, k)), grad_w.to(W_dec.dtype)
    w = W_dec.to(acc)
    grad_values = torch.einsum("nd,nkd->nk", g, w[idx]) if k * d * n <= 1 << 26 else torch.stack(
        [(g * w[idx[:, j]]).sum(1) for j in range(k)], dim=1
    )
    rows = torch.arange(n, device=W_dec.device).repeat_interleave(k)
    grad_w.index_add_(0, idx.reshape(-1), g[rows] * values.to(acc).reshape(-1, 1))
    return grad_values.to(values.dtype), grad_w.to(W_dec.dtype)


def _m_keep(n: int, rate: float) -> int:
    # floor(rate * N), method.md section 2.3 (m_tau). A tiny epsilon guards against 0.1 * 500 = 49.999...
    return int(math.floor(rate * n + 1e-9))


def activation_rate_top_mask(values: Tensor, indices: Tensor, n_latents: int, rate: float) -> Tensor:
    """Boolean ``[N, k]`` mask of the entries that are in their latent's top-``floor(rate*N)`` set.

    Only positive entries can be in a top set. Ties go to the entry that comes first in row-major
    order. Work is a sort of the ``N*k`` entries by (latent, value), never a dense ``[N, m]`` matrix.
    """
    n = values.shape[0]
    m_keep = _m_keep(n, rate)
    _check_indices(indices, n_latents)
    flat_v = values.reshape(-1)
    mask = torch.zeros(flat_v.shape, dtype=torch.bool, device=values.device)
    if n == 0 or m_keep == 0:
        return mask.reshape(values.shape)
    flat_i = indices.reshape(-1).long()
    active = flat_v > 0
    pos = torch.nonzero(active).squeeze(1)  # flat positions of active entries, ascending
    if pos.numel() == 0:
        return mask.reshape(values.shape)
    lat, val = flat_i[pos], flat_v[pos].to(_acc_dtype(values.dtype))
    # Order: by latent, then by value descending, then by flat position ascending (stable sorts,
    # applied from the least significant key to the most significant one).
    order = torch.argsort(val, descending=True, stable=True)
    order = order[torch.argsort(lat[order], stable=True)]
    lat_sorted = lat[order]
    # Rank of each entry within its latent's group.
    counts = torch.bincount(lat_sorted, minlength=n_latents)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(lat_sorted.numel(), device=values.device) - starts[lat_sorted]
    mask[pos[order[rank < m_keep]]] = True
    return mask.reshape(values.shape)


def activation_rate_loss(values: Tensor, indices: Tensor, n_latents: int, rate: float) -> Tensor:
    """Activation-rate sparsity loss L_ar of method.md section 2.3 on a sparse code.

    ``L_ar = (1/N) * sum_j [sum_i z_ij - (sum of the floor(rate*N) largest z_ij)]``, computed from
    ``values [N, k]`` and ``indices [N, k]`` (latent ids in ``[0, n_latents)``). Returns a 0-dim tensor
    in the dtype of ``values``; an empty batch gives 0.
    """
    n = values.shape[0]
    if n == 0:
        return values.new_zeros(())
    acc = _acc_dtype(values.dtype)
    v = values.to(acc).clamp_min(0)
    top = activation_rate_top_mask(values, indices, n_latents, rate)
    return (v[~top].sum() / n).to(values.dtype)


def activation_rate_loss_backward(
    grad: Tensor, values: Tensor, indices: Tensor, n_latents: int, rate: float
) -> Tensor:
    """Gradient of :func:`activation_rate_loss` w.r.t. ``values``: ``grad/N`` outside the top sets.

    Entries with ``values <= 0`` get ``grad/N`` too (the ReLU that produced them, upstream, stops it);
    this matches differentiating the dense formula, whose derivative w.r.t. a non-top entry is 1/N.
    """
    n = values.shape[0]
    if n == 0:
        return torch.zeros_like(values)
    top = activation_rate_top_mask(values, indices, n_latents, rate)
    g = (grad.to(_acc_dtype(values.dtype)) / n).expand(values.shape)
    return torch.where(top, torch.zeros_like(g), g).to(values.dtype)


def _kept_reconstruction(idx: Tensor, v_kept: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``[N, d]`` = sum_j v_kept[i, j] * w[idx[i, j]] + b (``embedding_bag`` rejects ``k = 0``)."""
    n, k = idx.shape
    if n == 0 or k == 0:
        return w.new_zeros((n, w.shape[1])) + b
    return torch.nn.functional.embedding_bag(idx, w, per_sample_weights=v_kept, mode="sum") + b


class _AblationSetup(NamedTuple):
    """What both ablation passes start from, in the accumulation dtype."""

    idx: Tensor  # [N, k] int64 latent ids
    entry_pos: Tensor  # [N, k] position in keep of each entry's latent, -1 when not kept
    kept: Tensor  # [N, k] bool
    v: Tensor  # [N, k] values
    v_kept: Tensor  # [N, k] values of kept entries, 0 elsewhere
    w: Tensor  # [m, d]
    base: Tensor  # [N, d] kept-latent reconstruction, unscaled


def _ablation_setup(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, keep: Tensor
                    ) -> _AblationSetup:
    """Range checks, then :class:`_AblationSetup` for ``keep [F]`` (int64, distinct)."""
    n = values.shape[0]
    m = W_dec.shape[0]
    acc = _acc_dtype(W_dec.dtype)
    _check_indices(indices, m)
    _check_indices(keep, m, "keep")
    pos_in_keep = torch.full((m,), -1, dtype=torch.int64, device=W_dec.device)
    pos_in_keep[keep] = torch.arange(keep.numel(), device=W_dec.device)
    idx = indices.long()
    entry_pos = pos_in_keep[idx] if n > 0 else idx
    kept = entry_pos >= 0
    v = values.to(acc)
    v_kept = torch.where(kept, v, torch.zeros_like(v))
    w = W_dec.to(acc)
    base = _kept_reconstruction(idx, v_kept, w, b_dec.to(acc))
    return _AblationSetup(idx, entry_pos, kept, v, v_kept, w, base)


def _rescale(base: Tensor, ablated: Tensor, t: Tensor, ablated_row: Tensor) -> tuple[Tensor, Tensor]:
    """The v2 evaluation rescale: every row ``r`` of input row ``i`` becomes ``r * t[i] / (||r|| + eps)``;
    ``ablated_row [P]`` is the input row of each ablated row."""
    base = base * (t / (base.norm(dim=1) + RESCALE_EPS))[:, None]
    ablated = ablated * (t[ablated_row] / (ablated.norm(dim=1) + RESCALE_EPS))[:, None]
    return base, ablated


def ablate_decode(
    values: Tensor,  # [N, k]
    indices: Tensor,  # [N, k]
    W_dec: Tensor,  # [m, d]
    b_dec: Tensor,  # [d]
    keep: Tensor,  # [F] int64 latent ids (distinct)
    target_norm: Optional[Tensor] = None,  # [N] or None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Concept-ablation forward pass for the conditional causality sweep (method.md sections 3.1, 6.3).

    Let ``x_F[i] = sum_{j: indices[i,j] in keep} values[i,j] * W_dec[indices[i,j]] + b_dec`` be the
    reconstruction of row ``i`` from the kept latents only. A *pair* is a row ``i`` and a position ``c``
    in ``keep`` whose latent is active in row ``i`` (some entry with that index and value > 0). For
    each pair, ``ablated = x_F[i] - values[i,j] * W_dec[keep[c]]`` (the concept zeroed, a rank-1
    correction). When ``target_norm`` is given, every output row ``r`` of its row ``i`` is rescaled to
    ``r * target_norm[i] / (||r|| + 1e-9)`` (v2 evaluation rescale).

    Returns:
        ``base [N, d]`` (x_F, rescaled when asked), ``ablated [P, d]``, ``pair_row [P]`` (int64 row
        ids) and ``pair_concept [P]`` (int64 positions in ``keep``). Pairs are ordered by row, then by
        position in ``keep``. If a latent appears twice in one row its entries are summed.
    """
    n = values.shape[0]
    acc = _acc_dtype(W_dec.dtype)
    keep = keep.long()
    idx, entry_pos, kept, v, v_kept, w, base = _ablation_setup(values, indices, W_dec, b_dec, keep)
    # Per (row, concept position): summed value, and whether the concept is active there.
    n_f = keep.numel()
    coef = torch.zeros((n, n_f + 1), dtype=acc, device=W_dec.device)  # column n_f collects non-kept
    active = torch.zeros((n, n_f + 1), dtype=torch.bool, device=W_dec.device)
    if n > 0:
        col = torch.where(kept, entry_pos, torch.full_like(entry_pos, n_f))
        coef.scatter_add_(1, col, v_kept)
        active.scatter_reduce_(1, col, kept & (v > 0), reduce="amax")
    coef, active = coef[:, :n_f], active[:, :n_f]
    nz = torch.nonzero(active)  # [P, 2], row-major: by row, then position in keep
    pair_row, pair_concept = nz[:, 0].clone(), nz[:, 1].clone()  # separate storage (no aliasing outputs)
    ablated = base[pair_row] - coef[pair_row, pair_concept, None] * w[keep[pair_concept]]
    if target_norm is not None:
        base, ablated = _rescale(base, ablated, target_norm.to(acc), pair_row)
    return base.to(W_dec.dtype), ablated.to(W_dec.dtype), pair_row, pair_concept


def ablate_decode_padded(
    values: Tensor,  # [N, k]
    indices: Tensor,  # [N, k]
    W_dec: Tensor,  # [m, d]
    b_dec: Tensor,  # [d]
    keep: Tensor,  # [F] int64 latent ids (distinct)
    target_norm: Optional[Tensor] = None,  # [N] or None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`ablate_decode` with one output slot per code entry: shapes depend only on ``N``, ``k`` and
    ``d``, so the op needs no host synchronisation and can be captured in a CUDA graph.

    Slot ``s = i * k + j`` belongs to entry ``j`` of row ``i``. It holds a pair when that entry is the
    pair's representative: its latent is in ``keep``, its value is > 0, and no earlier entry of the row
    has the same latent with a value > 0. Then ``ablated[s]``, ``pair_row[s]`` and ``pair_concept[s]``
    are exactly :func:`ablate_decode`'s row for that (row, concept) pair (the coefficient sums every
    entry of the row with that latent). Every other slot has ``pair_row = pair_concept = -1`` and a zero
    ``ablated`` row. Keeping the valid slots and ordering them by (row, position in keep) gives
    :func:`ablate_decode`'s output.

    Returns:
        ``base [N, d]``, ``ablated [N * k, d]``, ``pair_row [N * k]``, ``pair_concept [N * k]`` (int64).
    """
    n, k = values.shape
    d = W_dec.shape[1]
    acc = _acc_dtype(W_dec.dtype)
    dev = W_dec.device
    idx, entry_pos, kept, v, _, w, base = _ablation_setup(values, indices, W_dec, b_dec, keep.long())
    positive = v > 0
    same = idx[:, :, None] == idx[:, None, :]  # [N, k(j), k(q)]: entries j and q share a latent
    earlier = torch.ones((k, k), dtype=torch.bool, device=dev).tril(-1)  # [j, q]: q < j
    shadowed = (same & positive[:, None, :] & earlier).any(dim=2)  # an earlier active duplicate
    valid = kept & positive & ~shadowed  # [N, k]
    coef = (same.to(acc) * v[:, None, :]).sum(dim=2)  # [N, k]: every entry of that latent in the row
    ablated = base[:, None, :] - coef[..., None] * w[idx]  # [N, k, d]
    ablated = torch.where(valid[..., None], ablated, torch.zeros_like(ablated)).reshape(n * k, d)
    rows = torch.arange(n, device=dev)[:, None].expand(n, k)
    none = torch.full_like(entry_pos, -1)
    pair_row = torch.where(valid, rows, none).reshape(n * k)
    pair_concept = torch.where(valid, entry_pos, none).reshape(n * k)
    if target_norm is not None:
        # Invalid slots are zero rows: 0 * t / (0 + eps) keeps them zero.
        slot_row = torch.arange(n, device=dev).repeat_interleave(k)  # [N * k]
        base, ablated = _rescale(base, ablated, target_norm.to(acc), slot_row)
    return base.to(W_dec.dtype), ablated.to(W_dec.dtype), pair_row, pair_concept
