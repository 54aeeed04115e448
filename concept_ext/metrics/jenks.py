"""Exact two-class Jenks natural breaks, vectorised over concepts (method.md section 6.5, oddity 15).

jenkspy 0.4.1 runs the Fisher-Jenks dynamic program, O(N^2) per concept. With two classes the program
reduces to choosing one split point of the sorted values, so the exact answer costs one sort and a few
prefix sums: O(N log N) per concept, done here for all F concepts at once in float64.

Semantics (identical to ``jenkspy.jenks_breaks(values, n_classes=2)[1]``):

* sort ascending, x_(1) <= ... <= x_(N); for each split s = 1..N-1 the lower class is the first s values;
* SSE(s) = within-class sum of squared deviations of both classes;
* s* = the smallest s with SSE(s) <= min SSE + 1e-12 * SST (jenkspy scans the lower-class sizes downwards
  and replaces its best on ">=", so the smallest of equal SSEs wins; the relative 1e-12 absorbs rounding);
* the break t = x_(s*), the maximum of the lower class; "active" means a > t strictly, so values tied with
  t stay below.

For N = 1 (no split exists) the break is the single value; for constant data every SSE is 0, so s* = 1
and t is that value (nothing is active). jenkspy raises on both; callers treat them as "no split"
(method.md 6.5 step 2).
"""
from __future__ import annotations

from typing import NamedTuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["Jenks2Split", "jenks2_breaks", "SSE_RELATIVE_TOLERANCE"]

#: Relative tolerance on SSE ties, times the total sum of squares (method.md 6.5: "1e-12 * SST").
SSE_RELATIVE_TOLERANCE = 1e-12

ArrayLike = Union[Tensor, np.ndarray]


class Jenks2Split(NamedTuple):
    """Result of :func:`jenks2_breaks` for F concepts (or one, when the input was 1-D)."""

    breaks: Tensor
    """[F] float64: the break t_j (the maximum of the lower class); active means a > t_j."""
    n_below: Tensor
    """[F] int64: s*_j, the size of the lower class (values <= t_j, ties included)."""


def _check_values(values: ArrayLike, name: str) -> tuple[Union[Tensor, np.ndarray], bool]:
    """Validate and return a 2-D float64 view: numpy for CPU data, a tensor for other devices."""
    if isinstance(values, Tensor):
        if values.dim() not in (1, 2):
            raise ValueError(f"{name} must be 1-D [N] or 2-D [F, N], got shape {tuple(values.shape)}")
        values = values.detach()
        if values.device.type == "cpu":
            values = values.numpy() if values.dtype != torch.bfloat16 else values.double().numpy()
    elif not isinstance(values, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(values).__name__}")
    if values.ndim not in (1, 2):
        raise ValueError(f"{name} must be 1-D [N] or 2-D [F, N], got shape {tuple(values.shape)}")
    squeeze = values.ndim == 1
    if isinstance(values, np.ndarray):
        # Plain numpy on CPU: torch's intra-op threading costs more than it saves at these sizes.
        x = np.asarray(values, dtype=np.float64)
        x = x[None, :] if squeeze else x
        finite = bool(np.isfinite(x).all())
    else:
        x = values.to(torch.float64)
        x = x.unsqueeze(0) if squeeze else x
        finite = bool(torch.isfinite(x).all())
    if x.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one value per concept (got N = 0)")
    if not finite:
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return x, squeeze


def _first_best_split_numpy(xs: np.ndarray) -> np.ndarray:
    """[F, N] sorted float64 (N >= 2) -> [F] 0-based index s* - 1 of the lower-class maximum."""
    n = xs.shape[1]
    y = xs - xs.mean(axis=1, keepdims=True)  # centred: prefix sums stay small relative to the SSEs
    sst = np.einsum("ij,ij->i", y, y)[:, None]  # [F, 1] total sum of squares
    c = np.cumsum(y, axis=1)  # [F, N]
    lo = c[:, :-1]  # [F, N-1] sum of the s lowest values, s = 1..N-1
    hi = c[:, -1:] - lo  # [F, N-1] sum of the others
    s = np.arange(1, n, dtype=np.float64)
    # SSE(s) = SST - B(s), B = between-class term; argmin SSE == argmax B, same 1e-12 * SST slack.
    between = lo * lo * (1.0 / s) + hi * hi * (1.0 / (n - s)) - c[:, -1:] ** 2 / n
    ok = between >= between.max(axis=1, keepdims=True) - SSE_RELATIVE_TOLERANCE * sst
    return ok.argmax(axis=1)  # first True = smallest s


def _first_best_split_torch(xs: Tensor) -> Tensor:
    """Same as :func:`_first_best_split_numpy` for tensors on any device."""
    n = xs.shape[1]
    y = xs - xs.mean(dim=1, keepdim=True)
    sst = (y * y).sum(dim=1, keepdim=True)
    c = torch.cumsum(y, dim=1)
    lo = c[:, :-1]
    hi = c[:, -1:] - lo
    s = torch.arange(1, n, dtype=torch.float64, device=xs.device)
    between = lo * lo / s + hi * hi / (n - s) - c[:, -1:] ** 2 / n
    ok = between >= between.max(dim=1, keepdim=True).values - SSE_RELATIVE_TOLERANCE * sst
    return torch.argmax(ok.to(torch.uint8), dim=1)


def jenks2_breaks(values: ArrayLike) -> Jenks2Split:
    """Exact two-class Jenks break per row, with jenkspy 0.4.1's tie semantics.

    Args:
        values: [F, N] (one row per concept) or [N]; any real dtype, tensor or numpy array, any device.
            Computation is in float64 (numpy on CPU, torch elsewhere).

    Returns:
        :class:`Jenks2Split` with ``breaks`` and ``n_below`` of shape [F] (or 0-d for 1-D input), on the
        input's device.
    """
    x, squeeze = _check_values(values, "values")
    n_rows, n = x.shape
    if isinstance(x, np.ndarray):
        # numpy's sort is ~10x faster than torch.sort on CPU for these shapes (performance.md section 6).
        xs_np = np.sort(x, axis=1)  # [F, N] ascending
        first_np = _first_best_split_numpy(xs_np) if n > 1 else np.zeros(n_rows, dtype=np.int64)
        first = torch.from_numpy(first_np.astype(np.int64))
        breaks = torch.from_numpy(xs_np[np.arange(n_rows), first_np])
    else:
        xs = torch.sort(x, dim=1).values  # [F, N] ascending
        if n > 1:
            first = _first_best_split_torch(xs)
        else:
            first = torch.zeros(n_rows, dtype=torch.int64, device=x.device)
        breaks = xs.gather(1, first.unsqueeze(1)).squeeze(1)
    n_below = first + 1
    if squeeze:
        return Jenks2Split(breaks[0], n_below[0])
    return Jenks2Split(breaks, n_below)
