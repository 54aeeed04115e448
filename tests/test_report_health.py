"""The report's run-level judgements (concept_ext.report.health): the leading protocol and collapse flags."""
from __future__ import annotations

from pathlib import Path

from concept_ext.report.health import collapse_warnings, headline_protocol
from concept_ext.report.markdown import render


def _results(tail_ceiling: float, acc: float, protocols=("tail", "context")) -> dict:
    def method(n_sel, rates):
        return {"n_selected": n_sel, "selected": list(range(len(rates))),
                "protocols": {p: {"completeness": {"racc": 0.5, "ceiling": tail_ceiling if p == "tail" else 1.0,
                                                   "act_rates": rates}} for p in protocols}}
    return {"run": {"protocols": list(protocols), "config": {"sae": {"n_concepts": 4}}},
            "classifier": {"test_accuracy": acc},
            "methods": {"ICA": method(4, [100.0] * 4),
                        "SAE": method(4, [100.0, 20.0, 99.5, 5.0]),
                        "ClassifSAE": method({"mean": 2.7, "std": 0.6, "values": [1, 3, 4]}, [10.0, 12.0])}}


def test_tail_leads_when_its_ceiling_is_meaningful():
    lead = headline_protocol(_results(0.95, 0.9), ["tail", "context"])
    assert lead.protocol == "tail" and "leads" in lead.reason


def test_context_leads_when_the_tail_ceiling_is_near_chance():
    lead = headline_protocol(_results(0.31, 0.8), ["tail", "context"])
    assert lead.protocol == "context" and "0.310" in lead.reason and "0.800" in lead.reason
    # Without the in-context protocol the tail stays first, with a caution that names the fix.
    lead = headline_protocol(_results(0.31, 0.8, ("tail",)), ["tail"])
    assert lead.protocol == "tail" and lead.reason.startswith("Caution") and "context" in lead.reason


def test_collapse_warnings_name_methods_and_concepts():
    warns = collapse_warnings(_results(0.9, 0.9), ["tail", "context"])
    text = "\n".join(warns)
    assert "ICA" not in text  # dense by construction
    assert any(w.startswith("**SAE**") and "0, 2" in w for w in warns), warns
    assert any(w.startswith("**ClassifSAE**") and "1 of 3 seed(s)" in w and "|F| = 1" in w for w in warns), warns
    assert len(warns) == 2


def test_report_puts_the_leading_protocol_and_warnings_first(tmp_path: Path):
    text = render(_results(0.31, 0.8), tmp_path / "figures")
    i_warn, i_ctx, i_tail = (text.index("## Warnings"), text.index("Headline table — in-context"),
                             text.index("Headline table — single-token"))
    assert i_warn < i_ctx < i_tail
    assert "The in-context protocol leads" in text[i_ctx:i_tail]
