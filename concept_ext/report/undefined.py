"""Which stored numbers are undefined, and why (issue 22, item 4).

Some metrics have no value for a method on a run, yet the reference stores a number by convention:
SentenceSim(k) is 0 when no two test sentences share exactly k of their top concepts, ConceptSim is 0 for a
concept with fewer than two activating sentences, and the means over concepts are 0 when a method keeps no
concept. ``metrics.json`` keeps those conventional values, with the counts that show them undefined beside
them (``n_pairs``, ``n_active``, ``n_selected``); every table prints them as "—" with the reason as a
footnote (:class:`Footnotes`) and the SentenceSim plot leaves a gap.

:func:`undefined_reason` decides one dotted path of a method's results; :func:`undefined_map` lists every
undefined path of a method (written to ``metrics.json`` as the method's ``"undefined"`` entry).
"""
from __future__ import annotations

import re
from typing import Any, Optional

from concept_ext.report.format import DASH, fmt, is_num, lookup, number

__all__ = ["undefined_reason", "undefined_map", "Footnotes", "metric_cell"]

_SSIM = re.compile(r"interpret\.sentence_sim\.sentence_sim\.(\d+)")
_CSIM_J = re.compile(r"interpret\.concept_sim\.per_concept\.(\d+)")
# Means over the selected concepts: undefined when the method keeps none.
_OVER_CONCEPTS = re.compile(r"protocols\.[^.]+\.(completeness\.(avg_act_rate|max_act_rate)|segment\.means.*"
                            r"|conditional\.(delta_f_cond|tvd_cond|delta_acc_cond)(_selective|_weighted)?)$")


def _n_selected(m: dict) -> Optional[int]:
    n = number(lookup(m, "n_selected"))
    if n is None:
        active = lookup(m, "interpret.concept_sim.n_active")
        return len(active) if isinstance(active, list) else None
    return int(n)


def _count(m: dict, path: str) -> Optional[int]:
    v = m
    for part in path.split("."):  # the first seed's counts: lookup() would summarise across seeds
        if isinstance(v, dict):
            v = v.get(part)
        elif isinstance(v, list) and part.isdigit() and int(part) < len(v):
            v = v[int(part)]
        else:
            return None
    if isinstance(v, list):
        return int(sum(x for x in v if is_num(x)))
    return int(v) if is_num(v) else None


def undefined_reason(m: dict, path: str) -> Optional[str]:
    """Why the number at dotted ``path`` of method entry ``m`` is undefined, or None when it is defined
    (or when the counts that would tell are absent: results written before they were recorded)."""
    hit = _SSIM.fullmatch(path)
    if hit:
        i = int(hit.group(1))
        ks = lookup(m, "interpret.sentence_sim.k") or [1, 2, 3, 4]
        top = lookup(m, "interpret.sentence_sim.top") or 5
        pairs = _count(m, f"interpret.sentence_sim.n_pairs.{i}")
        # n_pairs of results written before the seed totals were recorded is the first seed's: a non-zero
        # mean then says another seed had pairs (an undefined value is exactly the conventional 0).
        if pairs == 0 and i < len(ks) and number(lookup(m, path)) in (0.0, None):
            return (f"SentenceSim({ks[i]}): no two test sentences share exactly {ks[i]} of their top-{top} "
                    f"concepts (0 pairs); metrics.json keeps the reference's 0 beside n_pairs")
        return None
    if path in ("interpret.concept_sim.weighted", "interpret.concept_sim.unweighted"):
        if _count(m, "interpret.concept_sim.n_pairs") == 0:
            return ("ConceptSim: no concept has two or more activating sentences (0 pairs); "
                    "metrics.json keeps the reference's 0")
        return None
    hit = _CSIM_J.fullmatch(path)
    if hit:
        if _count(m, f"interpret.concept_sim.n_pairs.{hit.group(1)}") == 0:
            return "ConceptSim of a concept with fewer than two activating sentences (no pair)"
        return None
    n_sel = _n_selected(m)
    if path == "interpret.overlap.jaccard" and n_sel is not None and n_sel < 2:
        return f"Jaccard of A_j: needs two concepts, the method keeps {n_sel}"
    if path.startswith("interpret.term_overlap.jaccard") and lookup(m, "interpret.term_overlap") is not None and (
            lookup(m, path) is None):
        return "term overlap: needs two concepts with terms"
    if path == "interpret.overlap.redundancy" and _count(m, "interpret.overlap.n_covered") == 0:
        return "redundancy: no test sentence activates any concept"
    if n_sel == 0 and _OVER_CONCEPTS.fullmatch(path):
        return "a mean over concepts, and the method keeps no concept (|F| = 0)"
    return None


def undefined_map(m: dict) -> dict[str, str]:
    """Every undefined headline path of method entry ``m`` -> its reason (the ``"undefined"`` entry)."""
    paths = [f"interpret.sentence_sim.sentence_sim.{i}"
             for i in range(len(lookup(m, "interpret.sentence_sim.k") or []))]
    paths += ["interpret.concept_sim.weighted", "interpret.concept_sim.unweighted",
              "interpret.overlap.jaccard", "interpret.overlap.redundancy", "interpret.term_overlap.jaccard",
              "interpret.term_overlap.jaccard_tfidf"]
    paths += [f"interpret.concept_sim.per_concept.{j}"
              for j in range(len(lookup(m, "interpret.concept_sim.per_concept") or []))]
    for p in (m.get("protocols") or {}):
        paths += [f"protocols.{p}.completeness.avg_act_rate", f"protocols.{p}.completeness.max_act_rate",
                  f"protocols.{p}.segment.means", f"protocols.{p}.conditional.delta_f_cond",
                  f"protocols.{p}.conditional.tvd_cond", f"protocols.{p}.conditional.delta_acc_cond"]
        paths += [f"protocols.{p}.conditional.{k}_{v}" for k in ("delta_f_cond", "tvd_cond")
                  for v in ("selective", "weighted")]
    out = {}
    for path in paths:
        reason = undefined_reason(m, path)
        if reason:
            out[path] = reason
    return out


class Footnotes:
    """Numbered reasons for the "—" cells of one table (the same reason keeps its number)."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def dash(self, reason: str) -> str:
        """The cell text: "—" with the reason's footnote number."""
        if reason not in self.reasons:
            self.reasons.append(reason)
        return f"{DASH}<sup>{self.reasons.index(reason) + 1}</sup>"

    def lines(self) -> list[str]:
        """The footnotes, one paragraph line each (empty when no cell needed one)."""
        return [f"<sup>{i + 1}</sup> n/a: {r}.  " for i, r in enumerate(self.reasons)]


def metric_cell(m: dict, path: str, notes: Footnotes, *, digits: int = 3, value: Any = None) -> str:
    """The table cell of ``path`` in method ``m``: the number, or "—" with a footnote when undefined."""
    reason = undefined_reason(m, path)
    if reason:
        return notes.dash(reason)
    return fmt(lookup(m, path) if value is None else value, digits=digits)
