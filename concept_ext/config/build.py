"""The one dict -> config-dataclass builder, and the one check of choice fields.

Every config dataclass of the package (:mod:`~concept_ext.config.sae`, :mod:`~concept_ext.config.clf`,
:mod:`~concept_ext.config.baselines`, :mod:`~concept_ext.config.run`) is built from JSON by
:func:`build_config`, with one rule: a key that is not a field is an error naming the key (with its path)
and the nearest valid one. Keys starting with ``_`` (``"_comment"``) document a file and are skipped.
Keys that were fields once and were removed are listed in :data:`RETIRED_KEYS`, so that old run folders,
stage records and checkpoints still load: such a key is dropped with a log line, never silently.

Choice fields are typed ``Literal[...]``; :func:`check_choices`, called by each class's ``__post_init__``,
checks them all in one place (direct construction included, not only JSON).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import typing
from typing import Any, Literal, Optional

logger = logging.getLogger("concept_ext")

__all__ = ["build_config", "check_choices", "unknown_key_error", "RETIRED_KEYS"]

#: Config class name -> {retired key: why it went}. A stored file may carry these (results/*/config.json,
#: fit folders' cfg.json, SAE checkpoints): they are dropped on load, with a log line. Add a key here when a
#: field is removed; never widen the rule to ignoring unknown keys.
RETIRED_KEYS: dict[str, dict[str, str]] = {}


def unknown_key_error(key: str, valid: Any, where: str = "") -> ValueError:
    """The one error for a key that is not a field: names ``where + key`` and the nearest valid key."""
    valid = sorted(valid)
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {where + near[0]!r}?)" if near else ""
    return ValueError(f"unknown config key {where + key!r}{hint}; valid keys: {valid}")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> Any:
    """``Optional[X]`` -> ``X`` (other types unchanged)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return args[0]
    return tp


def _choices(tp: Any) -> Optional[tuple]:
    """The allowed values of a ``Literal[...]`` (or ``Optional[Literal[...]]``) type, else None."""
    tp = _strip_optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def check_choices(obj: Any) -> None:
    """Raise ValueError for any ``Literal`` field of the dataclass ``obj`` holding another value (None is
    allowed where the field is Optional)."""
    cls = type(obj)
    for name, tp in _hints(cls).items():
        allowed = _choices(tp)
        if allowed is None or not hasattr(obj, name):
            continue
        value = getattr(obj, name)
        if value is None and _strip_optional(tp) is not tp:
            continue
        if value not in allowed:
            raise ValueError(f"{cls.__name__}.{name} must be one of {list(allowed)}, got {value!r}")


def _value(tp: Any, value: Any, where: str) -> Any:
    """A JSON value for a field of type ``tp``: a nested dataclass built, a list made a tuple where the
    field is a tuple (JSON has no tuples)."""
    inner = _strip_optional(tp)
    if dataclasses.is_dataclass(inner) and isinstance(value, dict):
        return build_config(inner, value, where=where)
    if (inner is tuple or typing.get_origin(inner) is tuple) and isinstance(value, list):
        return tuple(value)
    return value


def build_config(cls: type, data: dict[str, Any], *, where: str = "") -> Any:
    """Instantiate the config dataclass ``cls`` from a (possibly nested) dict; missing keys take their
    defaults, unknown keys are an error (:func:`unknown_key_error`), retired keys (:data:`RETIRED_KEYS`) are
    dropped with a log line. ``where``: the key path of ``data`` for messages (e.g. ``"train_sae."``)."""
    if not isinstance(data, dict):
        raise ValueError(f"config {where.rstrip('.') or cls.__name__} must be a JSON object, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    retired = RETIRED_KEYS.get(cls.__name__, {})
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key.startswith("_"):  # "_comment" keys document a file
            continue
        if key not in fields:
            if key in retired:
                logger.info("config %s%s: retired key dropped (%s)", where, key, retired[key])
                continue
            raise unknown_key_error(key, fields, where)
        kwargs[key] = _value(hints[key], value, f"{where}{key}.")
    return cls(**kwargs)
