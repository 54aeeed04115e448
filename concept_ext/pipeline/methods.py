"""Fitting and evaluating the five concept methods inside the pipeline (one method, one seed at a time).

* ClassifSAE: a ClassifSAE trained on the train cache with the LLM-predicted labels; F = the first
  ``n_concepts`` latents (truncation, method.md 4.5).
* SAE: a plain TopK SAE; F = the L1-probe selection (method.md 4.4).
* ICA, ConceptSHAP, HI-Concept: the baselines of method.md section 4 (the bottlenecks train through the
  classifier's single-token tail).

Then the common post-processing of method.md section 5 (dead features dropped on the test split,
per-class segmentation) and, for evaluation, every metric of section 6 under each readout protocol.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from concept_ext.runstate import float32_list

if TYPE_CHECKING:  # pragma: no cover
    from concept_ext.pipeline.context import RunContext

logger = logging.getLogger("concept_ext")

_BASELINE_KEYS = {"ICA": "ica", "ConceptSHAP": "conceptshap", "HI-Concept": "hiconcept"}
SAE_METHODS = ("ClassifSAE", "SAE")


def _sae_configs(ctx: "RunContext", method: str, seed: int):
    from concept_ext.config.sae import SAEConfig

    h = ctx.load_split("train").h
    d = int(h.shape[1])
    arch = "classif_topk" if method == "ClassifSAE" else "topk"
    sae_cfg = SAEConfig(d=d, m=ctx.cfg.sae.expansion * d, k=ctx.cfg.sae.k, n_concepts=ctx.cfg.sae.n_concepts,
                        n_classes=len(ctx.class_names), architecture=arch, seed=seed)
    base = ctx.cfg.train_classifsae if method == "ClassifSAE" else ctx.cfg.train_sae
    train_cfg = dataclasses.replace(base, seed=seed, device=ctx.device, progress=ctx.progress)
    return sae_cfg, train_cfg


def _selection_inputs(ctx: "RunContext"):
    """(h, labels) for the probe and the segmentation: the train split with the LLM-predicted labels by
    default; ``baselines.select`` can switch to the test split and/or ground-truth labels (oddity 4)."""
    sel = ctx.cfg.baselines.select
    split = ctx.load_split("test" if sel.selection_split == "test" else "train")
    return split.h, (split.label if sel.selection_labels == "ground_truth" else split.pred)


def load_sae(fit_dir: Path, device: str):
    """The trained SAE module of an SAE method's fit folder."""
    from concept_ext.sae.checkpoint import load_checkpoint

    return load_checkpoint(fit_dir / "sae", device=device).sae


def fit_method(ctx: "RunContext", method: str, seed: int, out: Path) -> dict[str, Any]:
    """Fit ``method`` with ``seed``; save the concept model under ``out/concepts`` (and ``out/sae``)."""
    from concept_ext.concepts import SAEConcepts, make_concept_model
    from concept_ext.concepts.select import apply_selection

    train, test = ctx.load_split("train"), ctx.load_split("test")
    n_classes = len(ctx.class_names)
    torch.manual_seed(seed)
    info: dict[str, Any] = {}
    if method in SAE_METHODS:
        from concept_ext.sae.trainer import train_sae

        sae_cfg, train_cfg = _sae_configs(ctx, method, seed)
        meta = {"model_id": ctx.cfg.backbone, "hook_layer": ctx.classifier.layer, "class_names": ctx.class_names}
        res = train_sae(train.h, train.pred if method == "ClassifSAE" else None, sae_cfg, train_cfg,
                        out_dir=out / "sae_work", metadata=meta)
        from concept_ext.sae.checkpoint import save_checkpoint

        save_checkpoint(out / "sae", res.sae, train_cfg=train_cfg, firing=res.firing, metadata=meta)
        import shutil

        shutil.rmtree(out / "sae_work", ignore_errors=True)
        last = res.history[-1] if res.history else {}
        info["train_log_last"] = {k: float(v) for k, v in last.items()}
        if method == "ClassifSAE":  # class latents alive (fired within the dead window) at each log step
            info["live_class_history"] = [[int(r["step"]), int(r["live_class"])]
                                          for r in res.history if "live_class" in r]
        if method == "ClassifSAE":
            model = SAEConcepts(res.sae, selection="truncation", n_select=ctx.cfg.sae.n_concepts)
        else:
            probe = dataclasses.replace(ctx.cfg.baselines.probe, n_select=ctx.cfg.sae.n_concepts)
            model = SAEConcepts(res.sae, selection="probe", n_select=ctx.cfg.sae.n_concepts, probe=probe)
            sel_h, sel_y = _selection_inputs(ctx)
            if int(torch.unique(sel_y).numel()) < 2:
                raise ValueError(
                    "SAE probe selection needs at least two classes among the selection labels, but the "
                    f"classifier predicts only class {int(sel_y[0])} on the selection split: fine-tune it longer "
                    "(--set finetune.steps=...) or use ground-truth labels (--set baselines.select.selection_labels=ground_truth)")
            model.fit(sel_h, labels=sel_y)
    else:
        key = _BASELINE_KEYS[method]
        n = ctx.cfg.sae.n_concepts  # |F| is the same for every method (the paper: 20)
        cfg = getattr(ctx.cfg.baselines, key)
        cfg = (dataclasses.replace(cfg, n_components=n, random_state=seed) if method == "ICA"
               else dataclasses.replace(cfg, n_concepts=n, seed=seed))
        model = make_concept_model(key, cfg)
        tail = None
        if method != "ICA":
            from concept_ext.classifier.tail import SingleTokenTail

            tail = SingleTokenTail(ctx.classifier, freeze=True)
        model.fit(train.h.to(ctx.device) if method != "ICA" else train.h, labels=train.pred, tail=tail)
    seg_h, seg_y = _selection_inputs(ctx)
    sel = apply_selection(model, test.h, seg_h=seg_h, seg_labels=seg_y, n_classes=n_classes,
                          config=ctx.cfg.baselines.select)
    model.save(out / "concepts")
    info.update({"selected": list(map(int, model.selected)), "dropped": list(map(int, model.dropped)),
                 "n_selected": len(model.selected)})
    del sel
    return info


def load_method(method: str, fit_dir: Path):
    """Reload a fitted concept model from its fit folder."""
    from concept_ext.concepts.base import load_concept_model

    if method in SAE_METHODS:
        return load_concept_model(fit_dir / "concepts", sae=load_sae(fit_dir, "cpu"))
    return load_concept_model(fit_dir / "concepts")


def _readout(ctx: "RunContext", protocol: str):
    from concept_ext.metrics import ContextReadout, TailReadout
    from concept_ext.classifier.tail import ContextTail, SingleTokenTail

    if protocol == "tail":
        return TailReadout(SingleTokenTail(ctx.classifier, freeze=True), batch_size=ctx.cfg.eval.readout_batch,
                           progress=ctx.progress)
    # One ContextTail per run context: its clean pass and its block states (kept within the LRU's byte
    # budget) are the same for every method and seed, so sharing it saves full-model forwards.
    tail = ctx.shared("context_tail", lambda: ContextTail(ctx.classifier, ctx.load_split("test").texts))
    return ContextReadout(tail, batch_size=ctx.cfg.eval.readout_batch, progress=ctx.progress)


def evaluate_method(ctx: "RunContext", method: str, seed: int, fit_dir: Path) -> dict[str, Any]:
    """Every metric of method.md section 6 for one fitted method (JSON-ready dict)."""
    from concept_ext import metrics as M
    from concept_ext.metrics.text import clean_texts, term_overlap, tfidf_top_terms

    model = load_method(method, fit_dir)
    test = ctx.load_split("test")
    h, logits, labels = test.h, test.logits, test.label
    code = M.encode_selected(model, h)
    out: dict[str, Any] = {"method": method, "seed": seed, "n_selected": len(model.selected),
                           "selected": [int(i) for i in model.selected],
                           "dropped": [int(i) for i in getattr(model, "dropped", [])],
                           "segmentation": [int(c) for c in (model.segmentation or [])], "protocols": {}}
    for protocol in ctx.cfg.protocols:
        readout = _readout(ctx, protocol)
        comp = M.completeness(model, h, logits, labels, readout, code=code)
        cond = M.conditional_ablation(model, h, labels, readout, code=code)
        seg = M.segment_ablation(model, h, labels, readout, n_classes=len(ctx.class_names), code=code) if (
            ctx.cfg.eval.segment_ablation and model.segmentation is not None) else None
        out["protocols"][protocol] = {"completeness": comp.to_dict(), "conditional": cond.to_dict(),
                                      "segment": seg.to_dict() if seg is not None else None}
    acts = code.acts.float()  # [N, |F|]
    emb = ctx.embeddings()
    sets = M.activating_sets(acts)
    interp = {"concept_sim": M.concept_sim(acts, emb, sets=sets).to_dict(),
              "sentence_sim": M.sentence_sim(acts, emb).to_dict(),
              "overlap": M.set_overlap(sets.mask).to_dict(),
              "top_sentences": M.top_activating(acts, sets.mask, k=ctx.cfg.eval.top_sentences,
                                                texts=test.texts).to_dict()}
    try:
        cleaned, how = clean_texts(test.texts)
        terms = tfidf_top_terms(acts, sets.mask, test.texts, top_k=ctx.cfg.eval.tfidf_terms, cleaned=cleaned)
        terms.preprocessing = how
        interp["tfidf"] = terms.to_dict()
        # The reference's plain TF-IDF ranking, kept only to show how much more alike its terms are.
        plain = tfidf_top_terms(acts, sets.mask, test.texts, top_k=ctx.cfg.eval.tfidf_terms, cleaned=cleaned,
                                ranking="tfidf")
        interp["term_overlap"] = {**term_overlap(terms.terms).to_dict(),
                                  "jaccard_tfidf": term_overlap(plain.terms).jaccard}
    except ValueError as exc:  # e.g. an empty vocabulary on tiny test slices
        logger.warning("%s: TF-IDF terms unavailable (%s)", method, exc)
        interp["tfidf"] = None
    out["interpret"] = interp
    n_classes = len(ctx.class_names)
    means = torch.stack([acts[labels == c].mean(0) if bool((labels == c).any()) else torch.zeros(acts.shape[1])
                         for c in range(n_classes)]) if acts.shape[1] else torch.zeros((n_classes, 0))
    out["class_concept_means"] = float32_list(means)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randperm(acts.shape[0], generator=gen)[:2000]
    out["act_values"] = float32_list(acts[rows].t())  # [|F|, <= 2000] for the histograms
    if method in SAE_METHODS:
        w = model.directions().float()  # [m, d]
        w = w - w.mean(0)
        _, _, v = torch.pca_lowrank(w, q=2, center=False)
        out["decoder_pca"] = float32_list(w @ v[:, :2])
    return out
