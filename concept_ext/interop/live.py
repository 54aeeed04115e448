"""Run a live sparsify ``SparseCoder`` or SAELens TopK SAE on the concept_ext kernels (issue 25).

``accelerate(obj)`` binds replacement methods on the instance (never on the class): the object keeps its
type, its parameters (the same ``nn.Parameter`` objects, so an optimiser built before or after keeps
working) and its outputs, and the user's own training loop or analysis code runs unchanged.
``undo(obj)`` (or ``handle.undo()``, or leaving ``with accelerate(obj):``) removes them.

What runs on concept_ext ops:

* sparsify ``SparseCoder`` (``activation='topk'``; tested with eai-sparsify 1.3.3): ``forward`` (encode
  with ``concept_ext.ops.topk_encode`` on ``x - b_dec`` (or ``x`` for a transcoder), decode with
  ``sparse_decode``, skip connection, FVU, AuxK and Multi-TopK terms) and ``encode``/``decode``. b_dec stays
  trainable through the encoder input, as in sparsify. The dense pre-activations (sparsify's
  ``pre_acts``) are only computed when AuxK has dead latents or Multi-TopK is on, and carry no gradient,
  exactly as sparsify's ``FusedEncoder`` drops theirs.
* SAELens ``TopKSAE`` / ``TopKTrainingSAE`` (architecture ``"topk"``; tested with sae-lens 6.54.12):
  ``encode``, ``forward`` and ``training_forward_pass``, through the library's own ``process_sae_in``
  (dtype, hooks, input normalisation, b_dec subtraction), ``mse_loss_fn``, output normalisation and
  ``calculate_aux_loss``; ``rescale_acts_by_decoder_norm`` is applied to the weights inside the step
  (differentiably). ``decode`` of a dense code and ``encode_with_hidden_pre`` stay the library's.

Differences, all documented outputs-wise:

* the top-k codes come back sorted by value (the libraries' ``topk(sorted=False)`` order is unspecified);
  where fewer than k pre-activations are positive, the zero entries may sit at other latent ids;
* SAELens ``training_forward_pass`` returns ``hidden_pre=None`` unless the AuxK term needed the dense
  pre-activations (dead latents) or ``accelerate(sae, dense_hidden_pre=True)`` asked for them: the dense
  ``[N, d_sae]`` tensor is what the fused kernel avoids. SAELens's trainer does not read it;
* on CUDA the accelerated sparsify forward runs in the weights' dtype (no bf16 autocast).

SAELens calls with hooks attached to ``hook_sae_acts_pre`` / ``hook_sae_acts_post``, or with
``use_error_term``, fall back to the library's own method for that call, so hooks always see what they
expect. Pickling an accelerated object is not supported: ``undo`` first (``save_model`` /
``save_to_disk`` / ``state_dict`` are unaffected).
"""
from __future__ import annotations

import importlib
import types
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from concept_ext.ops import sparse_decode, topk_encode

__all__ = ["Accelerated", "accelerate", "undo", "is_accelerated"]

_MARK = "_concept_ext_accelerated"


class Accelerated:
    """Handle returned by :func:`accelerate`: ``.obj``, ``.library``, ``.methods`` and :meth:`undo`; a
    context manager that undoes on exit."""

    def __init__(self, obj: Any, library: str, methods: tuple[str, ...]) -> None:
        self.obj = obj
        """The accelerated object (the same object that was passed in)."""
        self.library = library
        """``"sparsify"`` or ``"sae_lens"``."""
        self.methods = methods
        """Names of the methods bound on the instance."""

    def undo(self) -> None:
        """Restore the library's own methods (idempotent)."""
        undo(self.obj)

    def __enter__(self) -> Any:
        return self.obj

    def __exit__(self, *exc: Any) -> None:
        self.undo()


def is_accelerated(obj: Any) -> bool:
    """Whether :func:`accelerate` is in effect on ``obj``."""
    return _MARK in getattr(obj, "__dict__", {})


def undo(obj: Any) -> None:
    """Remove what :func:`accelerate` bound on ``obj`` (no-op when it is not accelerated)."""
    state = obj.__dict__.pop(_MARK, None)
    if state is None:
        return
    for name in state["methods"]:
        obj.__dict__.pop(name, None)


def _library_of(obj: Any) -> Optional[str]:
    for cls in type(obj).__mro__:
        root = cls.__module__.split(".")[0]
        if root == "sparsify" and cls.__name__ == "SparseCoder":
            return "sparsify"
        if root == "sae_lens" and cls.__name__ in ("TopKSAE", "TopKTrainingSAE"):
            return "sae_lens"
    return None


def accelerate(obj: Any, *, dense_hidden_pre: bool = False) -> Accelerated:
    """Make ``obj`` (a sparsify ``SparseCoder`` or a SAELens ``TopKSAE`` / ``TopKTrainingSAE``) run its
    forward and backward on concept_ext ops; returns an :class:`Accelerated` handle (``.undo()``).

    ``dense_hidden_pre`` (SAELens training only): also compute the dense pre-activations for
    ``TrainStepOutput.hidden_pre`` on every step (one extra ``[N, d_sae]`` GEMM). Raises ``TypeError`` for
    any other object and ``ValueError`` for a variant the ops do not reproduce (sparsify ``groupmax``).
    Accelerating an accelerated object returns a fresh handle without stacking.
    """
    lib = _library_of(obj)
    if lib is None:
        raise TypeError(f"accelerate takes a sparsify SparseCoder or a SAELens TopKSAE/TopKTrainingSAE, got "
                        f"{type(obj).__module__}.{type(obj).__qualname__}")
    undo(obj)
    if lib == "sparsify":
        if obj.cfg.activation != "topk":
            raise ValueError(f"cannot accelerate a sparsify SparseCoder with activation={obj.cfg.activation!r} "
                             "(only 'topk')")
        if obj.W_dec is None:
            raise ValueError("cannot accelerate a sparsify SparseCoder loaded with decoder=False")
        methods: dict[str, Callable[..., Any]] = {
            "forward": _sparsify_forward, "encode": _sparsify_encode, "decode": _sparsify_decode}
    else:
        methods = {"encode": _saelens_encode, "forward": _saelens_forward}
        if hasattr(type(obj), "training_forward_pass"):
            methods["training_forward_pass"] = _saelens_training_forward_pass
    for name, fn in methods.items():
        obj.__dict__[name] = types.MethodType(fn, obj)
    obj.__dict__[_MARK] = {"methods": tuple(methods), "dense_hidden_pre": bool(dense_hidden_pre)}
    return Accelerated(obj, lib, tuple(methods))


def _lib_module(obj: Any, cls_name: str) -> Any:
    """The module defining the library class ``cls_name`` in ``obj``'s MRO (for its output NamedTuples)."""
    cls = next(c for c in type(obj).__mro__ if c.__name__ == cls_name)
    return importlib.import_module(cls.__module__)


def _original(obj: Any, name: str) -> Callable[..., Any]:
    """The library's own method ``name`` bound to ``obj`` (bypassing the instance binding)."""
    return getattr(type(obj), name).__get__(obj, type(obj))


# ------------------------------------------------------------------------------------------ sparsify


def _sp_code(coder: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(values [N, k], indices [N, k], encoder input [N, d]) with the encoder input differentiable in
    b_dec (sparsify's tied pre-bias)."""
    x = x.to(coder.dtype)
    x_in = x if coder.cfg.transcode else x - coder.b_dec
    # encoder.weight is nn.Linear's [m, d]; its transpose is the [d, m] view topk_encode reads in place.
    values, indices = topk_encode(x_in, coder.encoder.weight.t(), coder.encoder.bias, coder.cfg.k)
    return values, indices, x_in


def _sp_pre_acts(coder: Any, x_in: Tensor) -> Tensor:
    # sparsify's FusedEncoder returns pre_acts but its backward ignores their gradient: detach likewise.
    with torch.no_grad():
        return F.relu(F.linear(x_in, coder.encoder.weight, coder.encoder.bias))


def _sparsify_encode(self: Any, x: Tensor) -> Any:
    """sparsify ``encode`` on concept_ext ops: ``EncoderOutput(top_acts, top_indices, pre_acts)``."""
    values, indices, x_in = _sp_code(self, x)
    enc = _lib_module(self, "SparseCoder").EncoderOutput
    return enc(values, indices, _sp_pre_acts(self, x_in))


def _sparsify_decode(self: Any, top_acts: Tensor, top_indices: Tensor) -> Tensor:
    """sparsify ``decode`` on ``concept_ext.ops.sparse_decode``."""
    return sparse_decode(top_acts.to(self.dtype), top_indices, self.W_dec, self.b_dec)


def _sparsify_forward(self: Any, x: Tensor, y: Optional[Tensor] = None, *, dead_mask: Optional[Tensor] = None,
                      total_variance: Optional[Tensor] = None) -> Any:
    """sparsify ``SparseCoder.forward`` (1.3.3) with the encoder, decoder and their backward on concept_ext
    ops; the same ``ForwardOutput``."""
    top_acts, top_indices, x_in = _sp_code(self, x)
    if y is None:
        y = x
    sae_out = sparse_decode(top_acts, top_indices, self.W_dec, self.b_dec)  # [N, d], includes b_dec
    if self.W_skip is not None:
        sae_out = sae_out + x.to(self.dtype) @ self.W_skip.mT
    e = y - sae_out
    if total_variance is None:
        total_variance = (y - y.mean(0)).pow(2).sum()
    need_dead = dead_mask is not None and (num_dead := int(dead_mask.sum())) > 0
    pre_acts = _sp_pre_acts(self, x_in) if (need_dead or self.cfg.multi_topk) else None
    zero_bias = torch.zeros_like(self.b_dec).detach()
    if need_dead:
        k_aux = y.shape[-1] // 2  # sparsify's heuristic (Appendix B.1)
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        auxk_latents = torch.where(dead_mask[None], pre_acts, -torch.inf)
        auxk_acts, auxk_indices = auxk_latents.topk(k_aux, sorted=False)
        e_hat = sparse_decode(auxk_acts.to(self.dtype), auxk_indices, self.W_dec, zero_bias)  # no b_dec
        auxk_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
    else:
        auxk_loss = sae_out.new_tensor(0.0)
    fvu = e.pow(2).sum() / total_variance
    if self.cfg.multi_topk:
        # As sparsify does, the returned code and output become the top-4k ones (from detached pre_acts).
        top_acts, top_indices = pre_acts.topk(4 * self.cfg.k, sorted=False)
        sae_out = sparse_decode(top_acts.to(self.dtype), top_indices, self.W_dec, self.b_dec)
        multi_topk_fvu = (sae_out - y).pow(2).sum() / total_variance
    else:
        multi_topk_fvu = sae_out.new_tensor(0.0)
    fwd = _lib_module(self, "SparseCoder").ForwardOutput
    return fwd(sae_out, top_acts, top_indices, fvu, auxk_loss, multi_topk_fvu)


# ------------------------------------------------------------------------------------------- SAELens


def _sl_hooked(sae: Any) -> bool:
    """Whether a user hook or the error term needs the library's dense path."""
    if getattr(sae, "use_error_term", False):
        return True
    for name in ("hook_sae_acts_pre", "hook_sae_acts_post"):
        hp = getattr(sae, name)
        if getattr(hp, "_forward_hooks", None) or getattr(hp, "_backward_hooks", None):
            return True
    return False


def _sl_effective(sae: Any) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(W_enc [d, m], b_enc [m], decoder norms [m] or None): rescale_acts_by_decoder_norm multiplies the
    pre-activations by ||W_dec_j||, the same as scaling column j of W_enc and b_enc (differentiably)."""
    if not sae.cfg.rescale_acts_by_decoder_norm:
        return sae.W_enc, sae.b_enc, None
    norms = sae.W_dec.norm(dim=-1)  # [m]
    return sae.W_enc * norms[None, :], sae.b_enc * norms, norms


def _sl_code(sae: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Tensor]:
    """(values [N, k], indices [N, k], processed input [..., d], norms or None, flat input [N, d])."""
    sae_in = sae.process_sae_in(x)  # the library's own: dtype, reshape, hook, normalisation, - b_dec
    flat = sae_in.reshape(-1, sae.cfg.d_in)
    W, b, norms = _sl_effective(sae)
    values, indices = topk_encode(flat, W, b, sae.cfg.k)
    return values, indices, sae_in, norms, flat


def _sl_dense(sae: Any, values: Tensor, indices: Tensor, lead: tuple[int, ...]) -> Tensor:
    """The library's feature_acts ``[..., d_sae]`` (dense, or COO with use_sparse_activations)."""
    m = sae.cfg.d_sae
    if getattr(sae.activation_fn, "use_sparse_activations", False):
        n = values.shape[0]
        rows = torch.arange(n, device=values.device).repeat_interleave(values.shape[1])
        coo = torch.sparse_coo_tensor(torch.stack([rows, indices.reshape(-1)]), values.reshape(-1), (n, m))
        return coo if len(lead) == 1 else coo.to_dense().reshape(*lead, m)
    z = values.new_zeros((values.shape[0], m)).scatter(1, indices, values)
    return z.reshape(*lead, m)


def _sl_decode(sae: Any, values: Tensor, indices: Tensor, norms: Optional[Tensor], lead: tuple[int, ...]
               ) -> Tensor:
    """SAELens ``decode`` of a sparse code: sparse_decode, then the library's recons hook, output
    normalisation and reshape."""
    v = values if norms is None else values / norms[indices]  # act_times_W_dec's 1/||W_dec_j||
    out = sparse_decode(v.to(sae.W_dec.dtype), indices, sae.W_dec, sae.b_dec).reshape(*lead, sae.cfg.d_in)
    out = sae.hook_sae_recons(out)
    out = sae.run_time_activation_norm_fn_out(out)
    return sae.reshape_fn_out(out, sae.d_head)


def _saelens_encode(self: Any, x: Tensor) -> Tensor:
    """SAELens ``encode`` on concept_ext ops (the same dense feature_acts)."""
    if _sl_hooked(self):
        return _original(self, "encode")(x)
    values, indices, sae_in, _, _ = _sl_code(self, x)
    return self.hook_sae_acts_post(_sl_dense(self, values, indices, tuple(sae_in.shape[:-1])))


def _saelens_forward(self: Any, x: Tensor) -> Tensor:
    """SAELens ``forward`` (encode + decode) on concept_ext ops."""
    if _sl_hooked(self):
        return _original(self, "forward")(x)
    values, indices, sae_in, norms, _ = _sl_code(self, x)
    return self.hook_sae_output(_sl_decode(self, values, indices, norms, tuple(sae_in.shape[:-1])))


def _saelens_training_forward_pass(self: Any, step_input: Any) -> Any:
    """SAELens ``TrainingSAE.training_forward_pass`` (6.54) with encode/decode and their backward on
    concept_ext ops; the same losses and ``TrainStepOutput`` (``hidden_pre``: see the module docstring)."""
    if _sl_hooked(self):
        return _original(self, "training_forward_pass")(step_input)
    values, indices, sae_in, norms, flat = _sl_code(self, step_input.sae_in)
    lead = tuple(sae_in.shape[:-1])
    sae_out = _sl_decode(self, values, indices, norms, lead)
    feature_acts = _sl_dense(self, values, indices, lead)
    mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
    mask = step_input.dead_neuron_mask
    need_pre = self.__dict__[_MARK]["dense_hidden_pre"] or (mask is not None and bool(mask.any()))
    hidden_pre = None
    if need_pre:  # the library's hidden_pre, differentiable: the AuxK loss trains W_enc through it
        W, b, _ = _sl_effective(self)
        hidden_pre = torch.addmm(b, flat, W).reshape(*lead, self.cfg.d_sae)
    aux = self.calculate_aux_loss(step_input=step_input, feature_acts=feature_acts, hidden_pre=hidden_pre,
                                  sae_out=sae_out)
    total = mse_loss
    losses = {"mse_loss": mse_loss}
    if isinstance(aux, dict):
        losses.update(aux)
        for val in aux.values():
            total = total + val
    else:
        total = total + aux
    out_cls = _lib_module(self, "TrainingSAE").TrainStepOutput
    return out_cls(sae_in=step_input.sae_in, sae_out=sae_out, feature_acts=feature_acts, hidden_pre=hidden_pre,
                   loss=total, losses=losses)
