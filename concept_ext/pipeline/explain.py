"""Explaining one input with a finished run (``python -m concept_ext explain --run DIR "text"``).

Prints the classifier's prediction, the active concepts of the chosen method and each concept's
contribution to each class logit. For ClassifSAE the head is linear in z_class, so the contribution of
concept j to class c is exactly ``W_c[c, j] * z_j`` (plus the bias b_c, shown separately). For the
other methods the contribution is measured: the change of the bottleneck's tail logits when concept j is
zeroed (a conditional ablation of this one sentence, method.md 6.3).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

__all__ = ["Explanation", "explain"]


@dataclass
class ConceptContribution:
    """One active concept of the explained sentence."""

    concept: int
    """Concept id (latent index for SAE methods)."""
    activation: float
    """Its activation on the sentence."""
    contributions: list[float]
    """Contribution to each class logit (exact for ClassifSAE, ablation effect otherwise)."""
    segment: Optional[str]
    """Class segment of the concept (method.md section 5), if known."""
    top_terms: list[str] = field(default_factory=list)
    """Top TF-IDF terms of the concept from the run's evaluation, if available."""


@dataclass
class Explanation:
    """Everything :func:`explain` found for one text."""

    text: str
    """The input text."""
    method: str
    """Concept method used."""
    class_names: list[str]
    """Class names in label order."""
    logits: list[float]
    """The classifier's label logits."""
    prediction: str
    """Predicted class name."""
    exact: bool
    """True when contributions are exact (ClassifSAE head), False when measured by ablation."""
    bias: Optional[list[float]]
    """The head's bias b_c (ClassifSAE only)."""
    concepts: list[ConceptContribution]
    """Active selected concepts, strongest first."""

    def format(self) -> str:
        """A plain-text rendering for the terminal."""
        names = self.class_names
        lines = [f"text: {self.text!r}", f"prediction: {self.prediction}  logits: "
                 + ", ".join(f"{n}={v:.3f}" for n, v in zip(names, self.logits)),
                 f"method: {self.method} ({'exact head contributions' if self.exact else 'ablation effects on the tail logits'})"]
        if self.bias is not None:
            lines.append("head bias: " + ", ".join(f"{n}={v:+.3f}" for n, v in zip(names, self.bias)))
        if not self.concepts:
            lines.append("no selected concept is active on this text")
        for c in self.concepts:
            contrib = ", ".join(f"{n}={v:+.3f}" for n, v in zip(names, c.contributions))
            seg = f" [{c.segment}]" if c.segment else ""
            terms = f"  terms: {', '.join(c.top_terms[:8])}" if c.top_terms else ""
            lines.append(f"  concept {c.concept}{seg}: activation {c.activation:.3f} -> {contrib}{terms}")
        return "\n".join(lines)


def explain(run_dir: str | Path, text: str, *, method: str = "ClassifSAE", seed: Optional[int] = None) -> Explanation:
    """Explain ``text`` with the fitted ``method`` of the finished run in ``run_dir``."""
    from concept_ext.pipeline.context import open_run
    from concept_ext.pipeline.methods import load_method
    from concept_ext.runstate import read_record

    run_dir = Path(run_dir)
    ctx = open_run(run_dir)
    cfg = ctx.cfg
    if method not in cfg.methods:
        raise ValueError(f"method {method!r} was not part of this run; choose from {cfg.methods}")
    seed = cfg.seeds[0] if seed is None else seed
    fit_dir = run_dir / f"fit/{method}-s{seed}"
    if read_record(fit_dir) is None:
        raise FileNotFoundError(f"{fit_dir} is not finished; run or resume the pipeline first")
    clf = ctx.classifier
    pred = clf.predict([text], hidden=True)
    h, logits = pred.hidden, pred.logits[0]
    model = load_method(method, fit_dir)
    acts = model.encode(h)[0]  # [n_concepts]
    selected = list(model.selected)
    seg = list(model.segmentation or [])
    terms = _top_terms(run_dir / f"evaluate/{method}-s{seed}" / "results.json")
    active = [(pos, j) for pos, j in enumerate(selected) if abs(float(acts[j])) > 1e-8]
    bias = None
    contribs: dict[int, list[float]] = {}
    if method == "ClassifSAE":
        W_c, b_c = model.sae.W_c.detach(), model.sae.b_c.detach()
        bias = b_c.tolist()
        for _, j in active:
            contribs[j] = (W_c[:, j] * acts[j]).tolist()
    else:
        from concept_ext.metrics.readout import rescale_to
        from concept_ext.classifier.tail import SingleTokenTail

        tail = SingleTokenTail(clf, freeze=True)
        mask = torch.zeros_like(acts)
        mask[selected] = 1
        base_acts = (acts * mask)[None]
        variants = [base_acts] + [base_acts.clone().index_fill_(1, torch.tensor([j]), 0.0) for _, j in active]
        rec = model.reconstruct(torch.cat(variants)) if method not in ("ClassifSAE", "SAE") else model.reconstruct(
            torch.cat(variants), h=h.expand(len(variants), -1))
        with torch.no_grad():
            out = tail(rescale_to(rec.float(), h.norm(dim=1).expand(len(variants))))
        for i, (_, j) in enumerate(active, start=1):
            contribs[j] = (out[0] - out[i]).tolist()
    concepts = [ConceptContribution(concept=int(j), activation=float(acts[j]), contributions=contribs[j],
                                    segment=clf.class_names[seg[pos]] if pos < len(seg) else None,
                                    top_terms=terms.get(pos, [])) for pos, j in active]
    concepts.sort(key=lambda c: -abs(c.activation))
    return Explanation(text=text, method=method, class_names=list(clf.class_names), logits=logits.tolist(),
                       prediction=clf.class_names[int(logits.argmax())], exact=method == "ClassifSAE", bias=bias,
                       concepts=concepts)


def _top_terms(results_path: Path) -> dict[int, list[str]]:
    """Position in F -> TF-IDF terms, from an evaluation's results (empty when unavailable)."""
    try:
        tf = json.loads(results_path.read_text())["interpret"].get("tfidf") or {}
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return {}
    return {i: list(t) for i, t in enumerate(tf.get("terms", []))}
