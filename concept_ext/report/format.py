"""Cell formatting for the run report (concept_ext.report.markdown): numbers, multi-seed "mean ± std" summaries,
dotted look-ups in a method's results, and markdown-table escaping.

A value may be a plain number, ``None`` (printed "—"), a summary ``{"mean": x, "std": y}``, or a list of
per-seed numbers (summarised with the sample standard deviation).
"""
from __future__ import annotations

import math
import numbers
import re
import statistics
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["DASH", "fmt", "summarize", "number", "lookup", "cell", "table", "slug", "is_num"]

DASH = "—"
"""What a missing value prints as."""


def is_num(x: Any) -> bool:
    """True for a real number (Python or NumPy) that is not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def fmt(value: Any, *, digits: int = 3) -> str:
    """One table cell: None/NaN -> "—"; ``{"mean", "std"}`` or a list of per-seed numbers ->
    "mean ± std"; floats with ``digits`` decimals; ints, bools and strings as they are."""
    if value is None:
        return DASH
    if isinstance(value, dict):
        if "mean" not in value:
            return DASH
        mean, std = value.get("mean"), value.get("std")
        if not is_num(mean) or not math.isfinite(mean):
            return DASH
        if not is_num(std) or not math.isfinite(std):
            return f"{mean:.{digits}f}"
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    if isinstance(value, (list, tuple)):
        nums = [float(v) for v in value if is_num(v) and math.isfinite(v)]
        if not nums:
            return DASH
        return fmt(summarize(nums), digits=digits)
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):.{digits}f}" if math.isfinite(value) else DASH
    return str(value)


def summarize(values: Sequence[float]) -> dict[str, Optional[float]]:
    """``{"mean", "std", "n"}`` of per-seed values (sample std, ddof = 1; None for a single seed)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals)}


def number(value: Any) -> Optional[float]:
    """The plain float behind a cell value (the mean of a summary), or None."""
    if isinstance(value, dict):
        value = value.get("mean")
    elif isinstance(value, (list, tuple)) and value and all(is_num(v) for v in value):
        value = statistics.fmean(value)
    return float(value) if is_num(value) and math.isfinite(value) else None


def _walk(obj: Any, path: str) -> Any:
    cur = obj
    for part in path.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part)
        elif (isinstance(cur, (list, tuple)) and re.fullmatch(r"-?\d+", part)
              and -len(cur) <= int(part) < len(cur)):
            cur = cur[int(part)]
        else:
            return None
        if cur is None:
            return None
    return cur


def _per_seed_entries(seeds: Any) -> list[dict]:
    """The per-seed method entries when ``seeds`` holds whole method results (a list of them, or a dict
    seed -> entry), else []."""
    entries = list(seeds.values()) if isinstance(seeds, dict) else seeds if isinstance(seeds, list) else []
    if entries and all(isinstance(e, dict) and ("protocols" in e or "interpret" in e) for e in entries):
        return entries
    return []


def lookup(method: dict, path: str, default: Any = None) -> Any:
    """The value at a dotted ``path`` of a method entry (list indices allowed), or ``default``.

    Multi-seed results take precedence, in either of two shapes: ``method["seeds"][path]`` holds the
    per-seed values (or a ``{"mean", "std"}`` summary), or ``method["seeds"]`` holds one whole method
    entry per seed (a list, or a dict seed -> entry), whose numbers at ``path`` are summarised.
    """
    seeds = method.get("seeds") if isinstance(method, dict) else None
    if isinstance(seeds, dict) and path in seeds:
        s = seeds[path]
        if isinstance(s, (list, tuple)):
            return summarize([v for v in s if is_num(v) and math.isfinite(v)])
        return s
    per_seed = _per_seed_entries(seeds)
    if per_seed:
        vals = [number(_walk(e, path)) for e in per_seed]
        vals = [v for v in vals if v is not None]
        if vals:
            return summarize(vals)
    cur = _walk(method, path)
    return default if cur is None else cur


def cell(text: Any, *, limit: Optional[int] = None) -> str:
    """Text made safe for a markdown table cell: one line, pipes and HTML escaped, truncated."""
    s = " ".join(str(text).split())  # newlines and runs of blanks -> one space
    if limit is not None and len(s) > limit:
        s = s[: limit - 1].rstrip() + "…"
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: Sequence[int] = (0,)) -> list[str]:
    """A markdown table (cells already formatted); columns in ``left`` align left, the others right."""
    rule = ["---" if i in left else "--:" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out




def slug(name: str) -> str:
    """A file-name-safe form of a method name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "method"
