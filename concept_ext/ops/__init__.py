"""The custom operators: schemas, reference kernels, fake kernels, autograd and typed wrappers.

Every op lives in the ``concept_ext`` namespace of ``torch.library``. The schema is defined here; the
pure-PyTorch reference (``reference.py``) is registered as the ``CompositeExplicitAutograd`` kernel, so
every op works without the compiled extension. When ``concept_ext._C`` is loaded, its CPU (and CUDA)
kernels take precedence for those dispatch keys. Fake kernels make the ops traceable by
``torch.compile``; autograd is registered with ``torch.library.register_autograd`` and calls the
``*_backward`` ops, which have kernels of their own.

Public wrappers (:func:`topk_encode`, :func:`sparse_decode`, :func:`activation_rate_loss`,
:func:`ablate_decode`) validate their arguments and raise ``ValueError``/``TypeError`` naming the bad
argument before anything reaches a kernel.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from concept_ext.ops import reference

__all__ = [
    "TopKCode",
    "AblationBatch",
    "topk_encode",
    "sparse_decode",
    "activation_rate_loss",
    "ablate_decode",
    "unchecked",
    "check_finite",
    "OP_NAMES",
]

_lib = torch.library.Library("concept_ext", "FRAGMENT")

_SCHEMAS = {
    "topk_encode": "topk_encode(Tensor x, Tensor W_enc, Tensor b_enc, int k) -> (Tensor, Tensor)",
    "topk_encode_backward": (
        "topk_encode_backward(Tensor grad_values, Tensor values, Tensor indices, Tensor x, Tensor W_enc,"
        " bool deterministic=False) -> (Tensor, Tensor, Tensor)"
    ),
    "sparse_decode": "sparse_decode(Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec) -> Tensor",
    "sparse_decode_backward": (
        "sparse_decode_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor W_dec,"
        " bool deterministic=False) -> (Tensor, Tensor)"
    ),
    "activation_rate_loss": (
        "activation_rate_loss(Tensor values, Tensor indices, int n_latents, float rate) -> Tensor"
    ),
    "activation_rate_loss_backward": (
        "activation_rate_loss_backward(Tensor grad, Tensor values, Tensor indices, int n_latents,"
        " float rate) -> Tensor"
    ),
    "ablate_decode": (
        "ablate_decode(Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec, Tensor keep,"
        " Tensor? target_norm) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    # One output slot per code entry: static shapes, no host synchronisation (CUDA-graph capturable).
    "ablate_decode_padded": (
        "ablate_decode_padded(Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec, Tensor keep,"
        " Tensor? target_norm) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
}

#: Names of every op registered in the ``concept_ext`` namespace.
OP_NAMES = tuple(_SCHEMAS)

for _name, _schema in _SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")


# --------------------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and devices only; never read data.
# --------------------------------------------------------------------------------------------------


@torch.library.register_fake("concept_ext::topk_encode")
def _topk_encode_fake(x, W_enc, b_enc, k):
    torch._check(x.dim() == 2 and W_enc.dim() == 2 and b_enc.dim() == 1)
    torch._check(1 <= k <= W_enc.shape[1])
    n = x.shape[0]
    return x.new_empty((n, k)), x.new_empty((n, k), dtype=torch.int64)


@torch.library.register_fake("concept_ext::topk_encode_backward")
def _topk_encode_backward_fake(grad_values, values, indices, x, W_enc, deterministic=False):
    d, m = W_enc.shape
    # grad_W_enc's layout follows reference.weight_grad_like (as every kernel does); grad_x is row-major.
    gw = W_enc.new_empty((m, d)).t() if reference.is_transposed_contiguous(W_enc) else W_enc.new_empty((d, m))
    return x.new_empty(x.shape), gw, W_enc.new_empty((m,))


@torch.library.register_fake("concept_ext::sparse_decode")
def _sparse_decode_fake(values, indices, W_dec, b_dec):
    torch._check(values.shape == indices.shape)
    return W_dec.new_empty((values.shape[0], W_dec.shape[1]))


@torch.library.register_fake("concept_ext::sparse_decode_backward")
def _sparse_decode_backward_fake(grad_out, values, indices, W_dec, deterministic=False):
    return torch.empty_like(values), torch.empty_like(W_dec)


@torch.library.register_fake("concept_ext::activation_rate_loss")
def _activation_rate_loss_fake(values, indices, n_latents, rate):
    return values.new_empty(())


@torch.library.register_fake("concept_ext::activation_rate_loss_backward")
def _activation_rate_loss_backward_fake(grad, values, indices, n_latents, rate):
    return torch.empty_like(values)


@torch.library.register_fake("concept_ext::ablate_decode")
def _ablate_decode_fake(values, indices, W_dec, b_dec, keep, target_norm):
    n, d = values.shape[0], W_dec.shape[1]
    p = torch.library.get_ctx().new_dynamic_size()
    return (
        W_dec.new_empty((n, d)),
        W_dec.new_empty((p, d)),
        values.new_empty((p,), dtype=torch.int64),
        values.new_empty((p,), dtype=torch.int64),
    )


@torch.library.register_fake("concept_ext::ablate_decode_padded")
def _ablate_decode_padded_fake(values, indices, W_dec, b_dec, keep, target_norm):
    n, k, d = values.shape[0], values.shape[1], W_dec.shape[1]
    return (
        W_dec.new_empty((n, d)),
        W_dec.new_empty((n * k, d)),
        values.new_empty((n * k,), dtype=torch.int64),
        values.new_empty((n * k,), dtype=torch.int64),
    )


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


def _topk_encode_setup(ctx, inputs, output):
    x, W_enc, _b_enc, _k = inputs
    values, indices = output
    ctx.save_for_backward(values, indices, x, W_enc)


def _topk_encode_bwd(ctx, grad_values, _grad_indices):
    values, indices, x, W_enc = ctx.saved_tensors
    if grad_values is None:
        return None, None, None, None
    # Under torch.use_deterministic_algorithms(True) the CUDA kernel reduces the weight gradients in a
    # fixed order instead of with atomics (the CPU kernel always does).
    gx, gw, gb = torch.ops.concept_ext.topk_encode_backward(
        grad_values.contiguous(), values, indices, x, W_enc, torch.are_deterministic_algorithms_enabled()
    )
    need = ctx.needs_input_grad
    return (gx if need[0] else None), (gw if need[1] else None), (gb if need[2] else None), None


torch.library.register_autograd(
    "concept_ext::topk_encode", _topk_encode_bwd, setup_context=_topk_encode_setup
)


def _sparse_decode_setup(ctx, inputs, output):
    values, indices, W_dec, _b_dec = inputs
    ctx.save_for_backward(values, indices, W_dec)


def _sparse_decode_bwd(ctx, grad_out):
    values, indices, W_dec = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_values = grad_w = grad_b = None
    if need[0] or need[2]:
        grad_values, grad_w = torch.ops.concept_ext.sparse_decode_backward(
            grad_out.contiguous(), values, indices, W_dec, torch.are_deterministic_algorithms_enabled()
        )
    if need[3]:
        grad_b = grad_out.sum(0)
    return (grad_values if need[0] else None), None, (grad_w if need[2] else None), grad_b


torch.library.register_autograd(
    "concept_ext::sparse_decode", _sparse_decode_bwd, setup_context=_sparse_decode_setup
)


def _activation_rate_setup(ctx, inputs, output):
    values, indices, n_latents, rate = inputs
    ctx.save_for_backward(values, indices)
    ctx.n_latents, ctx.rate = n_latents, rate


def _activation_rate_bwd(ctx, grad):
    values, indices = ctx.saved_tensors
    g = torch.ops.concept_ext.activation_rate_loss_backward(
        grad, values, indices, ctx.n_latents, ctx.rate
    )
    return g, None, None, None


torch.library.register_autograd(
    "concept_ext::activation_rate_loss", _activation_rate_bwd, setup_context=_activation_rate_setup
)


def _ablate_setup(ctx, inputs, output):
    values, indices, W_dec, b_dec, keep, target_norm = inputs
    ctx.save_for_backward(values, indices, W_dec, b_dec, keep, target_norm)


def _ablate_bwd(ctx, g_base, g_abl, _g_row, _g_con):
    return _ablate_bwd_via(reference.ablate_decode, ctx, g_base, g_abl)


def _ablate_padded_bwd(ctx, g_base, g_abl, _g_row, _g_con):
    return _ablate_bwd_via(reference.ablate_decode_padded, ctx, g_base, g_abl)


def _ablate_bwd_via(ref_fn, ctx, g_base, g_abl):
    # The ablation pass is an evaluation op; its gradient (rarely needed) is obtained by
    # differentiating the reference `ref_fn`, which is O(pairs * d) like the forward.
    values, indices, W_dec, b_dec, keep, target_norm = ctx.saved_tensors
    need = ctx.needs_input_grad
    with torch.enable_grad():
        leaves = [
            t.detach().requires_grad_(bool(need[i])) if t is not None else None
            for i, t in ((0, values), (2, W_dec), (3, b_dec), (5, target_norm))
        ]
        v, w, b, t = leaves
        base, abl, _, _ = ref_fn(v, indices, w, b, keep, t)
        outs, grads = [], []
        for o, g in ((base, g_base), (abl, g_abl)):
            # An output can be independent of every differentiable input (e.g. N = 0: base is b_dec
            # broadcast to [0, d]); it contributes no gradient.
            if g is not None and o.requires_grad:
                outs.append(o)
                grads.append(g)
        wrt = [x for x in leaves if x is not None and x.requires_grad]
        # materialize_grads: zeros (not None) for an input the outputs do not depend on.
        got = (torch.autograd.grad(outs, wrt, grads, allow_unused=True, materialize_grads=True) if outs
               else [torch.zeros_like(x) for x in wrt])
    it = iter(got)
    res = [next(it) if (x is not None and x.requires_grad) else None for x in leaves]
    return res[0], None, res[1], res[2], None, res[3]


torch.library.register_autograd(
    "concept_ext::ablate_decode", _ablate_bwd, setup_context=_ablate_setup
)
torch.library.register_autograd(
    "concept_ext::ablate_decode_padded", _ablate_padded_bwd, setup_context=_ablate_setup
)


# --------------------------------------------------------------------------------------------------
# Validation helpers for the public wrappers
# --------------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INDEX = (torch.int64, torch.int32)


_UNCHECKED = threading.local()


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """Skip the data-dependent checks (NaN/inf, index range) of the public wrappers inside the block, in
    this thread only.

    Each check reads a tensor value back to the host: on CUDA every one is a synchronisation that stalls
    the launch queue (a training step made 4). Use it where the inputs are known good: the SAE trainer
    validates its cached activations once, feeds the ops codes that ``topk_encode`` produced, and still
    checks every step's loss. Shape, dtype and device checks still run, and the CUDA kernels still
    range-check the ids they read on the device (a bad id then stops the kernel instead of raising a
    ValueError).
    """
    before = getattr(_UNCHECKED, "on", False)
    _UNCHECKED.on = True
    try:
        yield
    finally:
        _UNCHECKED.on = before


def _check_data() -> bool:
    """Whether data-dependent checks (NaN/inf, index range) may run: they read tensor values, which
    would synchronise the host with the GPU and break CUDA-graph capture and ``torch.compile``."""
    if os.environ.get("CONCEPT_EXT_CHECK_DATA", "1") == "0" or getattr(_UNCHECKED, "on", False):
        return False
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _float(t: Tensor, name: str, dim: int) -> None:
    _tensor(t, name)
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(t.shape)}")


def _index(t: Tensor, name: str, dim: int) -> None:
    _tensor(t, name)
    if t.dtype not in _INDEX:
        raise TypeError(f"{name} must be int64 or int32, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(t.shape)}")


def _same_device(named: dict) -> None:
    devs = {n: t.device for n, t in named.items() if t is not None}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"all tensors must be on the same device, got {desc}")


def check_finite(t: Tensor, name: str) -> None:
    """Raise ValueError naming ``name`` (and the first bad row along dim 0) if ``t`` holds a NaN or an
    infinity; the ops' data check, also used to validate activations once up front (trainer, concepts)."""
    # One reduction pass first: a NaN or an infinity makes the sum non-finite. ``isfinite(t).all()``
    # builds four full-size temporaries (eq, abs, ne, and) and cost ~80 ms per training step on W_enc
    # at paper scale (2-core CPU, torch.profiler); only a non-finite sum (a bad value, or a rare overflow
    # of huge finite values) pays for the exact check.
    if not t.numel():
        return
    total = t.sum()
    if bool(torch.isfinite(total)):
        return
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return
    where = ""
    if t.dim() > 0:  # name the first bad row (index along dim 0) and how many rows hold one
        rows = bad.reshape(t.shape[0], -1).any(dim=1).nonzero()
        where = f" (first in row {int(rows[0])} of {t.shape[0]}, {rows.numel()} rows in all)"
    raise ValueError(f"{name} contains NaN or infinite values{where}")


def _index_range(idx: Tensor, m: int, name: str, op: str) -> None:
    """Ids outside ``[0, m)`` raise. Skipped when the compiled CPU kernel serves ``op``: it checks the
    range itself in its own pass over the indices. The CUDA kernels check every id they read too, but a
    failed device-side check traps, which leaves the CUDA context unusable; so on CUDA the check runs here
    first (one host synchronisation) and a bad id is an ordinary, recoverable ValueError. Where data checks
    are off (``unchecked()``, graph capture, ``torch.compile``) the device-side check is what remains."""
    if idx.numel() == 0:
        return
    if idx.device.type == "cpu" and torch._C._dispatch_has_kernel_for_dispatch_key(f"concept_ext::{op}", "CPU"):
        return
    lo, hi = (int(v) for v in torch.aminmax(idx))
    if lo < 0 or hi >= m:
        raise ValueError(f"{name} must lie in [0, {m}), got values in [{lo}, {hi}]")


# --------------------------------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------------------------------


class TopKCode(NamedTuple):
    """A sparse code: the k active latents of each row."""

    values: Tensor
    """``[N, k]`` activations after ReLU, sorted descending within each row."""
    indices: Tensor
    """``[N, k]`` int64 latent ids."""


class AblationBatch(NamedTuple):
    """Output of :func:`ablate_decode`. With ``padded=True``, ``P = N * k`` slots, and a slot that holds
    no pair has ``pair_row = pair_concept = -1`` and a zero ``ablated`` row."""

    base: Tensor
    """``[N, d]`` reconstruction of every row from the kept latents only."""
    ablated: Tensor
    """``[P, d]`` reconstruction of each (row, concept) pair with that concept zeroed."""
    pair_row: Tensor
    """``[P]`` int64 row of each pair (-1 for an empty padded slot)."""
    pair_concept: Tensor
    """``[P]`` int64 position (in ``keep``) of the ablated concept of each pair (-1 for an empty slot)."""


def topk_encode(
    x: Tensor,  # [N, d]
    W_enc: Tensor,  # [d, m]
    b_enc: Tensor,  # [m]
    k: int,
    *,
    weight_dtype: Optional[torch.dtype] = None,
) -> TopKCode:
    """TopK sparse encoding: the k largest entries of ``x @ W_enc + b_enc`` per row, ReLU'd.

    Returns a :class:`TopKCode` with ``values [N, k]`` sorted descending and ``indices [N, k]``
    (int64). Differentiable w.r.t. ``x``, ``W_enc`` and ``b_enc``; only the selected entries receive
    gradient. NaN or infinite inputs raise ``ValueError`` (checked outside CUDA-graph capture and
    ``torch.compile``; set ``CONCEPT_EXT_CHECK_DATA=0`` to skip). Ties at the k-th place are broken
    in an implementation-defined way.

    ``weight_dtype=torch.bfloat16`` opts in to bfloat16 encoder weights with float32 ``x``/``b_enc``:
    the result is exact (fp32 accumulation) for the bf16-rounded ``W_enc``, whose memory is halved. Its
    error against fp32 weights is that rounding (relative 2^-9 per weight); on CPUs without native bf16
    dot products it is about as fast as fp32 (the GEMM still runs in fp32), see benchmarks/README.md.
    """
    _float(x, "x", 2)
    _float(W_enc, "W_enc", 2)
    _float(b_enc, "b_enc", 1)
    _same_device({"x": x, "W_enc": W_enc, "b_enc": b_enc})
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    d, m = W_enc.shape
    if x.shape[1] != d:
        raise ValueError(f"x has {x.shape[1]} features but W_enc expects d = {d} (W_enc is [d, m])")
    if b_enc.shape[0] != m:
        raise ValueError(f"b_enc must have m = {m} entries (W_enc is [d, m]), got {b_enc.shape[0]}")
    if not 1 <= k <= m:
        raise ValueError(f"k must satisfy 1 <= k <= m = {m}, got k = {k}")
    if weight_dtype is None:
        if not (x.dtype == W_enc.dtype == b_enc.dtype):
            raise TypeError(
                f"x, W_enc and b_enc must share a dtype, got {x.dtype}, {W_enc.dtype}, {b_enc.dtype}"
            )
    elif weight_dtype == torch.bfloat16:
        if W_enc.dtype != torch.bfloat16 or x.dtype != torch.float32 or b_enc.dtype != torch.float32:
            raise TypeError(
                "weight_dtype=torch.bfloat16 needs a bfloat16 W_enc and float32 x and b_enc, got "
                f"{x.dtype}, {W_enc.dtype}, {b_enc.dtype}"
            )
    else:
        raise ValueError(f"weight_dtype must be None or torch.bfloat16, got {weight_dtype}")
    if _check_data():
        check_finite(x, "x")
        check_finite(W_enc, "W_enc")
        check_finite(b_enc, "b_enc")
    values, indices = torch.ops.concept_ext.topk_encode(x, W_enc, b_enc, k)
    return TopKCode(values, indices)


def _check_code(values: Tensor, indices: Tensor) -> None:
    _float(values, "values", 2)
    _index(indices, "indices", 2)
    if values.shape != indices.shape:
        raise ValueError(
            f"values and indices must have the same shape [N, k], got {tuple(values.shape)} and "
            f"{tuple(indices.shape)}"
        )


def sparse_decode(
    values: Tensor,  # [N, k]
    indices: Tensor,  # [N, k]
    W_dec: Tensor,  # [m, d]
    b_dec: Tensor,  # [d]
) -> Tensor:
    """Sparse decoding ``x_hat [N, d] = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec``.

    Differentiable w.r.t. ``values``, ``W_dec`` and ``b_dec``; the gradient for ``W_dec`` is a sparse
    scatter over the ``N*k`` active pairs. Output dtype is that of ``W_dec``.
    """
    _check_code(values, indices)
    _float(W_dec, "W_dec", 2)
    _float(b_dec, "b_dec", 1)
    _same_device({"values": values, "indices": indices, "W_dec": W_dec, "b_dec": b_dec})
    m, d = W_dec.shape
    if b_dec.shape[0] != d:
        raise ValueError(f"b_dec must have d = {d} entries (W_dec is [m, d]), got {b_dec.shape[0]}")
    if not (values.dtype == W_dec.dtype == b_dec.dtype):
        raise TypeError(
            f"values, W_dec and b_dec must share a dtype, got {values.dtype}, {W_dec.dtype}, {b_dec.dtype}"
        )
    if _check_data():
        _index_range(indices, m, "indices", "sparse_decode")
    return torch.ops.concept_ext.sparse_decode(values, indices, W_dec, b_dec)


def activation_rate_loss(
    values: Tensor,  # [N, k]
    indices: Tensor,  # [N, k]
    n_latents: int,
    rate: float,
) -> Tensor:
    """Activation-rate sparsity loss of ClassifSAE (method.md section 2.3), from the sparse code.

    For each latent, the sum of its activations in the batch minus the sum of its
    ``floor(rate * N)`` largest ones; summed over latents and divided by ``N``. O(N*k) work plus a
    per-latent selection; never a dense ``[N, m]`` matrix. Differentiable w.r.t. ``values``.
    """
    _check_code(values, indices)
    _same_device({"values": values, "indices": indices})
    if not isinstance(n_latents, int) or n_latents < 1:
        raise ValueError(f"n_latents must be a positive int, got {n_latents!r}")
    if not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"rate must be a float in [0, 1], got {rate!r}")
    if _check_data():
        _index_range(indices, n_latents, "indices", "activation_rate_loss")
        check_finite(values, "values")
    return torch.ops.concept_ext.activation_rate_loss(values, indices, n_latents, float(rate))


def ablate_decode(
    values: Tensor,  # [N, k]
    indices: Tensor,  # [N, k]
    W_dec: Tensor,  # [m, d]
    b_dec: Tensor,  # [d]
    keep: Tensor,  # [F]
    *,
    target_norm: Optional[Tensor] = None,  # [N]
    padded: bool = False,
) -> AblationBatch:
    """Concept-ablation forward pass of the conditional causality sweep (method.md section 6.3).

    From a cached sparse code, returns in one call the reconstruction of every row from the kept
    latents ``keep`` and, for every (row, concept of ``keep`` active in that row) pair, the same
    reconstruction with that concept zeroed: a rank-1 correction per pair, O(pairs * d) work, no
    re-encode. With ``target_norm [N]`` every output is rescaled to its row's target norm
    (``r * t / (||r|| + 1e-9)``, the v2 evaluation rescale). See :class:`AblationBatch`.

    The number of pairs P depends on the data, so on CUDA the default form reads it back to the host
    once. ``padded=True`` instead returns one slot per code entry (``P = N * k``; slot ``i * k + j`` is
    entry ``j`` of row ``i``, empty slots marked -1): shapes depend only on the input shapes, nothing
    synchronises, and the call can be captured in a CUDA graph or compiled without dynamic shapes.
    Keeping the slots with ``pair_row >= 0``, ordered by (row, concept), gives the default output.
    """
    _check_code(values, indices)
    _float(W_dec, "W_dec", 2)
    _float(b_dec, "b_dec", 1)
    _index(keep, "keep", 1)
    named = {"values": values, "indices": indices, "W_dec": W_dec, "b_dec": b_dec, "keep": keep}
    if target_norm is not None:
        _float(target_norm, "target_norm", 1)
        named["target_norm"] = target_norm
        if target_norm.shape[0] != values.shape[0]:
            raise ValueError(
                f"target_norm must have one entry per row (N = {values.shape[0]}), got {target_norm.shape[0]}"
            )
    _same_device(named)
    m, d = W_dec.shape
    if b_dec.shape[0] != d:
        raise ValueError(f"b_dec must have d = {d} entries (W_dec is [m, d]), got {b_dec.shape[0]}")
    if not (values.dtype == W_dec.dtype == b_dec.dtype):
        raise TypeError(
            f"values, W_dec and b_dec must share a dtype, got {values.dtype}, {W_dec.dtype}, {b_dec.dtype}"
        )
    if target_norm is not None and target_norm.dtype != W_dec.dtype:
        raise TypeError(f"target_norm must have the dtype of W_dec ({W_dec.dtype}), got {target_norm.dtype}")
    if _check_data():
        _index_range(indices, m, "indices", "ablate_decode")
        _index_range(keep, m, "keep", "ablate_decode")
        if keep.numel() != torch.unique(keep).numel():
            raise ValueError("keep must hold distinct latent ids")
    op = torch.ops.concept_ext.ablate_decode_padded if padded else torch.ops.concept_ext.ablate_decode
    return AblationBatch(*op(values, indices, W_dec, b_dec, keep, target_norm))
