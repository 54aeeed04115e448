"""Context-managed hooks on the residual stream entering block L (design.md section 7).

transformers 5 layers return a bare tensor [B, T, D] (GPT-NeoX, Llama, BERT), older ones a tuple whose
first element is the hidden states; ``output[0]`` on a bare tensor silently takes the first batch row.
The helpers below accept both forms and hand back the form they received. Handles are removed in
``finally`` even when the forward raises.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

__all__ = ["split_hidden", "join_hidden", "capture_resid_pre", "replace_resid_pre", "capture_layer_call",
           "LayerCall", "run_layers"]


def split_hidden(x: Any) -> Tensor:
    """The hidden-state tensor of a layer input/output that is either a tensor or a tuple/list."""
    if torch.is_tensor(x):
        return x
    if isinstance(x, (tuple, list)) and x and torch.is_tensor(x[0]):
        return x[0]
    raise TypeError(f"expected a tensor or a tuple starting with one, got {type(x).__name__}")


def join_hidden(original: Any, h: Tensor) -> Any:
    """Put ``h`` back in the same container form as ``original``."""
    if torch.is_tensor(original):
        return h
    return type(original)((h, *original[1:]))


def _hidden_from_call(args: tuple, kwargs: dict) -> tuple[Tensor, bool]:
    if args:
        return split_hidden(args[0]), True
    if "hidden_states" in kwargs:
        return split_hidden(kwargs["hidden_states"]), False
    raise TypeError("layer called without positional input or hidden_states=")


@contextlib.contextmanager
def capture_resid_pre(layer: nn.Module, positions: Tensor | None = None,
                      *, store: dict | None = None) -> Iterator[dict]:
    """Record the input of ``layer`` (a block). ``positions`` [B] gathers one token per row -> ``store["h"]``
    [B, D]; without it the full [B, T, D] is stored. The tensor is detached only if grad is off."""
    out = store if store is not None else {}

    def hook(module, args, kwargs):
        h, _ = _hidden_from_call(args, kwargs)
        out["h"] = h[torch.arange(h.shape[0], device=h.device), positions.to(h.device)] if positions is not None else h
        return None

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield out
    finally:
        handle.remove()


@contextlib.contextmanager
def replace_resid_pre(layer: nn.Module, positions: Tensor, values: Tensor) -> Iterator[None]:
    """Replace the input of ``layer`` at ``positions`` [B] by ``values`` [B, D] (other positions untouched).
    Used for causality / the in-context protocol (method.md 3.3)."""

    def hook(module, args, kwargs):
        in_args = bool(args)
        raw = args[0] if in_args else kwargs["hidden_states"]
        h = split_hidden(raw).clone()
        rows = torch.arange(h.shape[0], device=h.device)
        h[rows, positions.to(h.device)] = values.to(device=h.device, dtype=h.dtype)
        new = join_hidden(raw, h)
        if in_args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class LayerCall:
    """The extra arguments a model passes to its blocks (masks, rotary tables, ...), captured once so
    the blocks can be re-run by themselves (the tail, method.md 3.1/3.3)."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args = args
        """Positional arguments after the hidden states."""
        self.kwargs = kwargs
        """Keyword arguments (caches stripped)."""


@contextlib.contextmanager
def capture_layer_call(layer: nn.Module) -> Iterator[dict]:
    """Capture the arguments ``layer`` is called with -> ``store["call"]`` (a :class:`LayerCall`) and
    ``store["h"]`` (its full hidden input [B, T, D])."""
    store: dict = {}

    def hook(module, args, kwargs):
        h, in_args = _hidden_from_call(args, kwargs)
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "layer_past",
                                                             "past_key_value", "use_cache", "cache_position")}
        store["call"] = LayerCall(tuple(args[1:]) if in_args else (), kw)
        store["h"] = h
        return None

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


def run_layers(layers: nn.ModuleList, start: int, h: Tensor, call: LayerCall) -> Tensor:
    """Run blocks ``start..`` on ``h`` [B, T, D] with captured arguments; returns the last block output."""
    for layer in list(layers)[start:]:
        h = split_hidden(layer(h, *call.args, **call.kwargs))
    return h
