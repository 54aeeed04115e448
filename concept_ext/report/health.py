"""Run-level judgements the report puts before any number: which readout protocol leads, and which methods
collapsed (issue 21: a method that silently lost its concepts must be named, not averaged into a table).

Both read only the results dictionary (``metrics.json``), so they apply to old runs too.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

from concept_ext.report.format import lookup, number

__all__ = ["HEADLINE_CEILING_SHARE", "ALWAYS_ON_PERCENT", "DENSE_METHODS", "Headline", "headline_protocol",
           "collapse_warnings"]

#: The single-token tail leads when its ceiling is at least this share of the classifier's test accuracy;
#: below it the tail alone cannot reproduce the decision (e.g. it predicts one class for most inputs), so
#: RAcc and the flip rates under it say nothing and the in-context protocol leads.
HEADLINE_CEILING_SHARE = 0.9
#: A concept active on at least this percentage of the test sentences is flagged as always on.
ALWAYS_ON_PERCENT = 99.0
#: Methods whose concept activations are dense by construction (signed ICA sources): never flagged.
DENSE_METHODS = ("ICA",)


class Headline(NamedTuple):
    """The protocol whose table comes first, and why."""

    protocol: str
    """``"tail"`` or ``"context"``."""
    reason: str
    """One sentence for the report."""
    tail_ceiling: Optional[float]
    """The single-token tail's ceiling (mean over methods and seeds), when measured."""


def _ceiling(results: dict, protocol: str) -> Optional[float]:
    vals = [number(lookup(m or {}, f"protocols.{protocol}.completeness.ceiling"))
            for m in (results.get("methods") or {}).values()]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def headline_protocol(results: dict, protocols: list[str]) -> Headline:
    """The leading protocol among ``protocols``: the paper's tail unless its ceiling is below
    HEADLINE_CEILING_SHARE x the classifier's test accuracy and the in-context protocol was run."""
    tail = _ceiling(results, "tail") if "tail" in protocols else None
    acc = number((results.get("classifier") or {}).get("test_accuracy"))
    first = protocols[0] if protocols else "tail"
    if tail is None or acc is None:
        return Headline(first, "", tail)
    bar = HEADLINE_CEILING_SHARE * acc
    if tail >= bar:
        return Headline("tail", f"The single-token tail leads: its ceiling {tail:.3f} is at least "
                        f"{HEADLINE_CEILING_SHARE:g} x the classifier's test accuracy ({acc:.3f}).", tail)
    why = (f"the single-token tail's ceiling is {tail:.3f}, below {HEADLINE_CEILING_SHARE:g} x the "
           f"classifier's test accuracy ({acc:.3f}): tail(h) alone does not reproduce the model's decision "
           f"on this backbone and data, so RAcc and the flip rates under it say little")
    if "context" in protocols:
        return Headline("context", f"The in-context protocol leads: {why}.", tail)
    return Headline("tail", f"Caution: {why}. Run with the in-context protocol (`--set "
                    "'protocols=[\"tail\",\"context\"]'`) for a meaningful table.", tail)


def _seed_values(value: Any) -> list[float]:
    if isinstance(value, dict) and isinstance(value.get("values"), list):
        return [float(v) for v in value["values"] if number(v) is not None]
    x = number(value)
    return [] if x is None else [x]


def collapse_warnings(results: dict, protocols: list[str]) -> list[str]:
    """One line per method that ended with fewer than half its concepts live (on any seed) or with
    concepts active on >= ALWAYS_ON_PERCENT % of the test sentences (first seed, named)."""
    sae_cfg = (((results.get("run") or {}).get("config") or {}).get("sae") or {})
    n_concepts = number(sae_cfg.get("n_concepts")) or 20
    out = []
    for name, m in (results.get("methods") or {}).items():
        m = m or {}
        if name in DENSE_METHODS:
            continue
        live = _seed_values(m.get("n_selected"))
        low = [int(v) for v in live if v < n_concepts / 2]
        if low:
            out.append(f"**{name}**: fewer than half of its {int(n_concepts)} concepts are live on "
                       f"{len(low)} of {len(live)} seed(s) (|F| = {', '.join(map(str, low))}).")
        selected = list(m.get("selected") or [])
        for p in protocols:
            rates = lookup(m, f"protocols.{p}.completeness.act_rates") or []
            if rates:
                always = [str(selected[j]) if j < len(selected) else f"#{j}"
                          for j, r in enumerate(rates) if number(r) is not None and number(r) >= ALWAYS_ON_PERCENT]
                if always:
                    out.append(f"**{name}**: concept(s) {', '.join(always)} are active on >= "
                               f"{ALWAYS_ON_PERCENT:g} % of the test sentences (always on, first seed): they "
                               "carry the sentence-independent part of h; Δf_cond (b) leaves them out.")
                break
    return out
