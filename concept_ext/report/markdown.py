"""The run report: ``report.md`` plus PNG figures under ``figures/``, built from the results dictionary
that the pipeline also writes to ``metrics.json`` (method.md 6.8 for the headline table).

``write_report(run_dir, results)`` is the entry point; ``python -m concept_ext.report.markdown RUN_DIR`` rebuilds
the report of a finished run from its ``metrics.json``. Every optional key may be missing; ``None`` prints
as "—". Any number may also be given as ``{"mean": x, "std": y}`` (a multi-seed summary). A method's
``"seeds"`` entry may either map a dotted path inside the method (``"protocols.tail.completeness.racc"``,
``"interpret.sentence_sim.sentence_sim.0"``) to per-seed values or to such a summary, or hold one whole
method entry per seed (a list, or a dict seed -> entry); those cells then print "mean ± std" (sample
standard deviation). See ``report_format.lookup``.

The write is atomic: figures and markdown are produced in a temporary folder inside ``run_dir``, the
figures are moved into ``figures/`` and ``report.md`` replaces the old one last, so a failing figure
leaves no partial report.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from concept_ext.report import plots
from concept_ext.report.format import DASH, cell, fmt, is_num, lookup, number, slug, summarize, table
from concept_ext.report.health import collapse_warnings, headline_protocol
from concept_ext.report.undefined import Footnotes, metric_cell, undefined_reason

__all__ = ["METHOD_ORDER", "fmt", "lookup", "summarize", "method_names", "render", "write_report", "main"]

logger = logging.getLogger("concept_ext")

METHOD_ORDER = ("ICA", "ConceptSHAP", "HI-Concept", "SAE", "ClassifSAE")
"""Column order of the headline table (method.md 6.8); other method names follow in dict order."""

LEGEND = ("RAcc: agreement of the bottleneck's prediction with the full model's (ceiling: the same readout "
          "of the un-reconstructed h); Avg. Act. Rate: mean share of test sentences where a concept is "
          "active; Δf_cond / TVD_cond: label-flip rate / total variation after ablating one active concept, "
          "(a) averaged over concepts as the paper does, (b) over concepts active on < 99 % of the sentences "
          "(always-on concepts move every prediction alike), (c) weighted by the number of sentences each "
          "concept is active on; ConceptSim: mean cosine of the sentences activating a concept, weighted "
          "by pairs (method.md 6.1-6.5).")
PROTOCOL_TITLES = {"tail": "single-token tail (paper protocol)", "context": "in-context (our extension)"}


def method_names(results: dict) -> list[str]:
    """Methods present, in the headline column order."""
    methods = results.get("methods") or {}
    known = [m for m in METHOD_ORDER if m in methods]
    return known + [m for m in methods if m not in known]


def protocols_of(results: dict) -> list[str]:
    """The protocols to tabulate: the run's list, then any other protocol a method reports."""
    listed = list((results.get("run") or {}).get("protocols") or [])
    for m in (results.get("methods") or {}).values():
        for p in (m or {}).get("protocols") or {}:
            if p not in listed:
                listed.append(p)
    return listed or ["tail"]


# ------------------------------------------------------------------------------------- headline table


def _racc_cell(m: dict, p: str) -> str:
    racc = lookup(m, f"protocols.{p}.completeness.racc")
    ceiling = lookup(m, f"protocols.{p}.completeness.ceiling")
    s = fmt(racc)
    if ceiling is not None and s != DASH:
        s += f" (ceiling {fmt(ceiling)})"
    return s


def _with_notes(lines: list[str], notes: Footnotes, own: bool) -> list[str]:
    """A table followed by its footnotes, when it owns them and any cell needed one."""
    return lines + ["", *notes.lines()] if own and notes.reasons else lines


def headline_table(results: dict, protocol: str, notes: Optional[Footnotes] = None) -> list[str]:
    """The paper's table (method.md 6.8) for one protocol; undefined numbers print "—" with a footnote
    (appended after the table unless the caller passes its own ``notes``)."""
    names = method_names(results)
    ms = [results["methods"][n] or {} for n in names]
    p = protocol
    own, notes = notes is None, notes or Footnotes()
    rows = [
        ["RAcc"] + [_racc_cell(m, p) for m in ms],
        ["Avg. Act. Rate (%)"] + [metric_cell(m, f"protocols.{p}.completeness.avg_act_rate", notes, digits=1)
                                  for m in ms],
        ["Δf_cond (a) paper"] + [metric_cell(m, f"protocols.{p}.conditional.delta_f_cond", notes) for m in ms],
        ["Δf_cond (b) < 99 % active"] + [metric_cell(m, f"protocols.{p}.conditional.delta_f_cond_selective", notes)
                                         for m in ms],
        ["Δf_cond (c) weighted"] + [metric_cell(m, f"protocols.{p}.conditional.delta_f_cond_weighted", notes)
                                    for m in ms],
        ["TVD_cond (a) paper"] + [metric_cell(m, f"protocols.{p}.conditional.tvd_cond", notes) for m in ms],
        ["TVD_cond (b) < 99 % active"] + [metric_cell(m, f"protocols.{p}.conditional.tvd_cond_selective", notes)
                                          for m in ms],
        ["TVD_cond (c) weighted"] + [metric_cell(m, f"protocols.{p}.conditional.tvd_cond_weighted", notes)
                                     for m in ms],
        ["ConceptSim (weighted)"] + [metric_cell(m, "interpret.concept_sim.weighted", notes) for m in ms],
        ["\\|F\\|"] + [fmt(lookup(m, "n_selected", lookup(m, f"protocols.{p}.completeness.n_selected")))
                      for m in ms],
    ]
    return _with_notes(table(["metric"] + names, rows), notes, own)


def details_table(results: dict, protocol: str, notes: Optional[Footnotes] = None) -> list[str]:
    """Stored-only numbers of one protocol: ceiling ratio, accuracies, ΔAcc_cond, segment ablation."""
    names = method_names(results)
    ms = [results["methods"][n] or {} for n in names]
    p = protocol
    own, notes = notes is None, notes or Footnotes()

    fractions: list[int] = []
    for m in ms:
        for e in lookup(m, f"protocols.{p}.segment.means") or []:
            if isinstance(e, dict) and is_num(e.get("fraction")) and int(e["fraction"]) not in fractions:
                fractions.append(int(e["fraction"]))

    def seg(m: dict, frac: int, key: str) -> str:
        reason = undefined_reason(m, f"protocols.{p}.segment.means")
        if reason:
            return notes.dash(reason)
        for e in lookup(m, f"protocols.{p}.segment.means") or []:
            if isinstance(e, dict) and is_num(e.get("fraction")) and int(e["fraction"]) == frac:
                return fmt(e.get(key))
        return DASH

    rows = [
        ["RAcc / ceiling"] + [fmt(lookup(m, f"protocols.{p}.completeness.racc_ratio")) for m in ms],
        ["bottleneck accuracy (vs y)"] + [fmt(lookup(m, f"protocols.{p}.completeness.bottleneck_accuracy"))
                                          for m in ms],
        ["full-model accuracy (vs y)"] + [fmt(lookup(m, f"protocols.{p}.completeness.original_accuracy"))
                                          for m in ms],
        ["bottleneck CE"] + [fmt(lookup(m, f"protocols.{p}.completeness.bottleneck_ce")) for m in ms],
        ["max act. rate (%)"] + [metric_cell(m, f"protocols.{p}.completeness.max_act_rate", notes, digits=1)
                                 for m in ms],
        ["ΔAcc_cond"] + [metric_cell(m, f"protocols.{p}.conditional.delta_acc_cond", notes) for m in ms],
    ]
    for frac in sorted(fractions):  # method.md 6.4 (v1 headline), class-averaged
        rows.append([f"segment ablation {frac}%: ΔAcc / flip rate"]
                    + [f"{seg(m, frac, 'delta_acc')} / {seg(m, frac, 'flip_rate')}" for m in ms])
    return _with_notes(table(["metric"] + names, rows), notes, own)


def interpret_table(results: dict, notes: Optional[Footnotes] = None, *,
                    sentence_sim_only: bool = False) -> list[str]:
    """SentenceSim(1..4), the cosine baseline and the other interpretability numbers (only the
    SentenceSim rows with ``sentence_sim_only``); undefined numbers print "—" with a footnote."""
    names = method_names(results)
    ms = [results["methods"][n] or {} for n in names]
    own, notes = notes is None, notes or Footnotes()
    ks: list[int] = []
    for m in ms:
        for k in lookup(m, "interpret.sentence_sim.k") or []:
            if is_num(k) and int(k) not in ks:
                ks.append(int(k))
    ks = sorted(ks) or [1, 2, 3, 4]

    def ssim(m: dict, k: int) -> str:
        own = lookup(m, "interpret.sentence_sim.k") or [1, 2, 3, 4]
        if k not in own:
            return DASH
        return metric_cell(m, f"interpret.sentence_sim.sentence_sim.{list(own).index(k)}", notes)

    base = (results.get("baseline_cosine") or {}).get("mean")
    rows = [[f"SentenceSim({k})"] + [ssim(m, k) for m in ms] for k in ks]
    if not sentence_sim_only:
        rows += [
            ["cosine baseline (all test pairs)"] + [fmt(base)] * len(ms),
            ["ConceptSim (unweighted)"] + [metric_cell(m, "interpret.concept_sim.unweighted", notes) for m in ms],
            ["Jaccard of A_j"] + [metric_cell(m, "interpret.overlap.jaccard", notes) for m in ms],
            ["redundancy"] + [metric_cell(m, "interpret.overlap.redundancy", notes, digits=2) for m in ms],
            ["coverage"] + [fmt(lookup(m, "interpret.overlap.coverage")) for m in ms],
            ["term overlap (top-10 Jaccard)"] + [metric_cell(m, "interpret.term_overlap.jaccard", notes) for m in ms],
            ["term overlap, plain TF-IDF ranking"] + [metric_cell(m, "interpret.term_overlap.jaccard_tfidf", notes)
                                                      for m in ms],
        ]
    return _with_notes(table(["metric"] + names, rows), notes, own)


# ------------------------------------------------------------------------------------------- figures


def _rates(m: dict, protocols: Sequence[str]) -> list:
    for p in protocols:
        r = lookup(m, f"protocols.{p}.completeness.act_rates")
        if r:
            return list(r)
    return []


def global_figures(results: dict, fig_dir: Path) -> dict[str, str]:
    """SentenceSim curves and activation-rate histograms; name -> path relative to the run folder."""
    names = method_names(results)
    methods = results.get("methods") or {}
    out: dict[str, str] = {}
    curves = {}
    for n in names:
        ks = lookup(methods[n] or {}, "interpret.sentence_sim.k") or [1, 2, 3, 4]
        # Undefined points (no pair shares exactly k concepts) are None: a gap in the curve, not a 0.
        vals = [None if undefined_reason(methods[n] or {}, f"interpret.sentence_sim.sentence_sim.{i}")
                else number(lookup(methods[n] or {}, f"interpret.sentence_sim.sentence_sim.{i}"))
                for i in range(len(ks))]
        if any(v is not None for v in vals):
            curves[n] = (ks, vals)
    base = number((results.get("baseline_cosine") or {}).get("mean"))
    if curves or base is not None:
        plots.plot_sentence_sim(fig_dir / "sentence_sim.png", curves, baseline=base)
        out["sentence_sim"] = "figures/sentence_sim.png"
    protocols = protocols_of(results)
    rates = {n: [number(r) for r in _rates(methods[n] or {}, protocols)] for n in names}
    values = {n: (methods[n] or {}).get("act_values") for n in names}
    if any(rates.values()) or any(values.values()):
        ids = {n: [str(c) for c in (methods[n] or {}).get("selected") or []] for n in names}
        plots.plot_act_rate_hist(fig_dir / "act_rate_hist.png", rates, values=values, labels=ids)
        out["act_rate_hist"] = "figures/act_rate_hist.png"
    return out


# ------------------------------------------------------------------------------------ run and method


def _duration(seconds: Any) -> str:
    x = number(seconds)
    if x is None:
        return DASH
    if x < 120:
        return f"{x:.1f} s"
    h, rem = divmod(int(round(x)), 3600)
    return (f"{h} h " if h else "") + f"{rem // 60} min {rem % 60} s"


def _class_name(results: dict, c: Any) -> str:
    names = (results.get("run") or {}).get("class_names") or []
    if not is_num(c):
        return DASH
    return str(names[int(c)]) if 0 <= int(c) < len(names) else f"class {int(c)}"


def run_header(results: dict) -> list[str]:
    """Title, run facts and the classifier's accuracy."""
    run = results.get("run") or {}
    title = f"# concept_ext report — {run.get('backbone') or '?'} on {run.get('dataset') or '?'}"
    facts = [("backbone", run.get("backbone")), ("dataset", run.get("dataset")),
             ("classes", ", ".join(map(str, run.get("class_names") or [])) or None),
             ("preset", run.get("preset")), ("protocols", ", ".join(protocols_of(results))),
             ("device", run.get("device")),
             ("seeds", ", ".join(map(str, run.get("seeds") or [])) or None)]
    skip = {"backbone", "dataset", "class_names", "preset", "protocols", "config", "versions", "timings",
            "device", "seeds"}
    facts += [(k, v) for k, v in run.items() if k not in skip and not isinstance(v, (dict, list))]
    lines = [title, "", *table(["run", ""], [[cell(k), cell(fmt(v))] for k, v in facts], left=(0, 1))]
    clf = results.get("classifier") or {}
    lines += ["", "## Classifier", "",
              f"Test accuracy **{fmt(clf.get('test_accuracy'))}** on {fmt(clf.get('n_test'))} sentences; "
              f"train accuracy {fmt(clf.get('train_accuracy'))} on "
              f"{fmt(clf.get('n_train_eval', clf.get('n_train')))} of the {fmt(clf.get('n_train'))} training sentences."]
    return lines


def _per_concept(m: dict, p: str) -> dict[int, dict]:
    entries = lookup(m, f"protocols.{p}.conditional.per_concept") or []
    return {int(e.get("position", i)): e for i, e in enumerate(entries) if isinstance(e, dict)}


def method_section(results: dict, name: str, fig_dir: Path, stem: str) -> list[str]:
    """Figures, the concept table and each concept's terms, word cloud and top sentences."""
    m = results["methods"][name] or {}
    protos = [p for p in protocols_of(results) if lookup(m, f"protocols.{p}")]
    fallback = lookup(m, f"protocols.{protos[0]}.completeness.selected") if protos else None
    selected = list(m.get("selected") or fallback or [])
    seg = list(m.get("segmentation") or [])
    n = max(len(selected), int(number(m.get("n_selected")) or 0))
    labels = [str(selected[j]) if j < len(selected) else f"#{j}" for j in range(n)]
    class_names = (results.get("run") or {}).get("class_names") or []
    lines = [f"## {name}", "",
             f"Selected concepts (|F| = {fmt(m.get('n_selected'))}): "
             f"{', '.join(map(str, selected)) or DASH}; "
             f"dropped as dead: {', '.join(map(str, m.get('dropped') or [])) or DASH}."]
    means = m.get("class_concept_means")
    if means and any(means):
        f = plots.plot_class_heatmap(fig_dir / f"heatmap_{stem}.png", means, class_names=class_names,
                                     concept_labels=labels, segmentation=seg,
                                     title=f"{name}: mean activation per class")
        lines += ["", f"![{cell(name)} class x concept heat map](figures/{f.name})"]
    if m.get("decoder_pca"):
        f = plots.plot_decoder_pca(fig_dir / f"decoder_pca_{stem}.png", m["decoder_pca"], selected=selected,
                                   segmentation=seg, class_names=class_names,
                                   title=f"{name}: decoder directions (PCA)")
        lines += ["", f"![{cell(name)} decoder PCA](figures/{f.name})"]
    rates = _rates(m, protos)
    conds = {p: _per_concept(m, p) for p in protos}
    terms = lookup(m, "interpret.tfidf.terms") or []
    weights = lookup(m, "interpret.tfidf.weights") or lookup(m, "interpret.tfidf.scores") or []
    header = ["pos", "concept", "class segment", "act. rate (%)"]
    header += [f"\\|S_j\\| / flip rate / TVD ({p})" for p in protos]
    header += ["\\|A_j\\|", "ConceptSim", "top terms", "cloud"]
    rows, details = [], []
    notes = Footnotes()
    for j in range(n):
        cid = labels[j]
        c_terms = list(terms[j]) if j < len(terms) and terms[j] else []
        c_weights = list(weights[j]) if j < len(weights) and weights[j] else [1.0] * len(c_terms)
        seg_name = _class_name(results, seg[j] if j < len(seg) else None)
        cloud = plots.plot_wordcloud(fig_dir / f"wordcloud_{stem}_{slug(cid)}.png", c_terms, c_weights,
                                     title=f"{name} concept {cid} ({seg_name})")
        link = f"figures/{cloud.name}"
        rows.append([str(j), cid, cell(seg_name), fmt(rates[j] if j < len(rates) else None, digits=1),
                     *[" / ".join(fmt(conds[p].get(j, {}).get(k)) for k in ("n_active", "flip_rate", "tvd"))
                       for p in protos],
                     fmt(lookup(m, f"interpret.concept_sim.n_active.{j}")),
                     metric_cell(m, f"interpret.concept_sim.per_concept.{j}", notes),
                     cell(", ".join(c_terms[:6]) or DASH), f"[png]({link})"])
        details += ["", f"### {cell(name)} — concept {cid} ({cell(seg_name)})", "",
                    f"![word cloud]({link})"]
        texts = lookup(m, f"interpret.top_sentences.texts.{j}") or []
        vals = lookup(m, f"interpret.top_sentences.values.{j}") or []
        idx = lookup(m, f"interpret.top_sentences.indices.{j}") or []
        if texts:
            sent_rows = [[str(r + 1), fmt(vals[r] if r < len(vals) else None),
                          fmt(idx[r] if r < len(idx) else None), cell(t, limit=160)]
                         for r, t in enumerate(texts[:10])]
            details += ["", *table(["#", "activation", "sentence id", "text"], sent_rows, left=(3,))]
        else:
            details += ["", "_No top-activating sentences recorded._"]
    if rows:
        lines += ["", *_with_notes(table(header, rows, left=(2, len(header) - 2, len(header) - 1)), notes, True),
                  *details]
    return lines


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def tail_sections(results: dict) -> list[str]:
    """Timings, versions and the collapsed configuration."""
    run = results.get("run") or {}
    lines: list[str] = []
    timings = _flatten(run.get("timings") or {})
    if timings:
        total = sum(number(v) or 0.0 for v in timings.values())
        rows = [[cell(k), _duration(v)] for k, v in timings.items()] + [["**total**", _duration(total)]]
        lines += ["## Timings", "", *table(["stage", "time"], rows), ""]
    versions = run.get("versions") or {}
    if versions:
        lines += ["## Versions", "", *table(["package", "version"],
                                            [[cell(k), cell(fmt(v))] for k, v in versions.items()],
                                            left=(0, 1)), ""]
    if run.get("config") is not None:
        cfg = json.dumps(run["config"], indent=2, sort_keys=True, default=str)
        lines += ["## Configuration", "", "<details><summary>Full configuration (JSON)</summary>", "",
                  "```json", cfg, "```", "", "</details>"]
    return lines


# ---------------------------------------------------------------------------------------- entry point


def render(results: dict, fig_dir: Path) -> str:
    """The markdown text of the report; figures are written under ``fig_dir``."""
    if not isinstance(results, dict):
        raise TypeError(f"results must be a dict, got {type(results).__name__}")
    fig_dir.mkdir(parents=True, exist_ok=True)
    lines = run_header(results)
    figs = global_figures(results, fig_dir)
    if method_names(results):
        protocols = protocols_of(results)
        lead = headline_protocol(results, protocols)
        ordered = [lead.protocol] + [p for p in protocols if p != lead.protocol]
        warnings = collapse_warnings(results, protocols)
        if warnings:
            lines += ["", "## Warnings", "", *[f"- {w}" for w in warnings]]
        for p in ordered:
            lines += ["", f"## Headline table — {PROTOCOL_TITLES.get(p, p)}", ""]
            if p == ordered[0] and lead.reason:
                lines += [lead.reason, ""]
            lines += headline_table(results, p)
            if p == ordered[0]:
                lines += ["", LEGEND]
            lines += ["", f"<details><summary>More numbers ({p})</summary>", ""]
            lines += details_table(results, p)
            lines += ["", "</details>"]
        lines += ["", "## Interpretability", ""]
        lines += interpret_table(results)
        for key, caption in (("sentence_sim", "SentenceSim(k) curves"),
                             ("act_rate_hist", "Activation rates per concept")):
            if key in figs:
                lines += ["", f"![{caption}]({figs[key]})"]
        for n in method_names(results):
            lines += ["", *method_section(results, n, fig_dir, slug(n))]
    else:
        lines += ["", "_No method results._"]
    lines += ["", *tail_sections(results), ""]
    return "\n".join(lines)


def write_report(run_dir: Path, results: dict) -> Path:
    """Write ``run_dir/report.md`` and its figures under ``run_dir/figures/``; returns the report path.

    Atomic: nothing in ``run_dir`` changes unless every figure and the markdown were produced.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".report-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=run_dir))
    try:
        text = render(results, tmp / "figures")
        (tmp / "report.md").write_text(text, encoding="utf-8")
        final_figs = run_dir / "figures"
        final_figs.mkdir(exist_ok=True)
        for f in sorted((tmp / "figures").iterdir()):
            os.replace(f, final_figs / f.name)
        target = run_dir / "report.md"
        os.replace(tmp / "report.md", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("report written to %s", target)
    return target


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m concept_ext.report RUN_DIR``: rebuild the report from ``RUN_DIR/metrics.json``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m concept_ext.report RUN_DIR\n")
        return 2
    run_dir = Path(args[0])
    results = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    sys.stdout.write(f"{write_report(run_dir, results)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
