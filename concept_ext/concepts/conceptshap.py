"""ConceptSHAP baseline (method.md 4.2; v1 in section 8) and the actual ConceptSHAP quantities.

Training reproduces the reference concept bottleneck: with c~ the unit concept columns and H~ the unit
rows of H, S = H c~ (v1: S = H C_vec, un-normalised), Sn = H~ c~ (cosines), M = [Sn > thres],
p = (M*S)/(sum_row(M*S) + 1e-3), g(p) = ReLU(p W1) W2 fed without norm rescale into the tail.

* v2 loss: CE(tail(g(p)), y_pred) + 0.1 L_sim + 0.5 L_far (:func:`sim_loss_v2`, :func:`far_loss_v2`).
* v1 loss: CE - 0.1 R1 + 0.1 R2 after epoch 1; R1 = kNN similarity of each raw concept to its 64
  nearest train vectors (neighbour choice without gradient), R2 = mean squared off-diagonal Gram entry.

The paper's v2 tables use only the bottleneck; :meth:`ConceptSHAPConcepts.completeness` and
:meth:`ConceptSHAPConcepts.shapley` add completeness and Shapley importance (:mod:`.shapley`).
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from concept_ext.concepts.base import Tail, check_activations, check_labels, register_concept_model
from concept_ext.config.baselines import BottleneckConfig, ShapleyConfig
from concept_ext.concepts.bottleneck import BottleneckConcepts, Scores, _ratio, far_loss_v2, sim_loss_v2
from concept_ext.concepts.shapley import ShapleyResult, shapley_exact, shapley_permutation, subset_accuracy_fn

logger = logging.getLogger("concept_ext")

__all__ = ["ConceptSHAPConcepts", "knn_r1", "gram_r2"]


def knn_r1(c_raw: Tensor, x_all: Tensor, k: int) -> Tensor:  # c_raw [d, n], x_all [N, d]
    """v1 R1: mean over concepts of the mean dot product c_j . x over its k nearest train vectors x."""
    with torch.no_grad():  # the neighbour choice carries no gradient (method.md 8)
        # ||c - x||^2 = ||x||^2 - 2 c.x + ||c||^2; the last term is constant per concept.
        dist = (x_all * x_all).sum(1, keepdim=True) - 2 * x_all @ c_raw  # [N, n]
        idx = dist.topk(min(k, x_all.shape[0]), dim=0, largest=False).indices  # [k, n]
    neigh = x_all[idx]  # [k, n, d]
    return torch.einsum("knd,dn->kn", neigh, c_raw).mean()


def gram_r2(c_raw: Tensor) -> Tensor:  # c_raw [d, n]
    """v1 R2: mean over the n(n-1) off-diagonal entries of (C^T C)^2, un-normalised."""
    gram = c_raw.T @ c_raw
    n = gram.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=gram.device)
    return (gram[off] ** 2).mean() if n > 1 else gram.sum() * 0


@register_concept_model
class ConceptSHAPConcepts(BottleneckConcepts):
    """ConceptSHAP concept bottleneck (v2 by default; ``baselines_preset("v1").conceptshap`` for v1)."""

    method = "conceptshap"
    config_cls = BottleneckConfig

    def scores(self, h: Tensor) -> Scores:  # h [B, d]
        cfg, net = self.config, self.net
        c_unit = net.unit_concepts()  # [d, n]
        h = net.centred(h)  # h - mu with the package's `center` (method.md 4.2 decision), else h
        s = h @ (net.C_vec if cfg.unnormalized_scores else c_unit)  # [B, n] projections
        sn = F.normalize(h, dim=1) @ c_unit  # [B, n] cosines
        mask = sn > cfg.thres
        return Scores(S=s, Sn=sn, mask=mask, p=_ratio(mask * s, cfg.eps))

    def batch_loss(self, hb, yb, tail, epoch, gen, h_all):
        cfg, net = self.config, self.net
        sc = self.scores(hb)
        ce = F.cross_entropy(tail(net.g(sc["p"])), yb)
        parts = {"ce": float(ce.detach())}
        loss = ce
        if epoch >= cfg.reg_start_epoch:
            if cfg.regularizer == "v2":
                l_sim, l_far = sim_loss_v2(sc["Sn"]), far_loss_v2(net.unit_concepts())
                loss = loss + cfg.lambda_sim * l_sim + cfg.lambda_far * l_far
            else:
                l_sim, l_far = -knn_r1(net.C_vec, h_all, cfg.knn_k), gram_r2(net.C_vec)
                loss = loss + cfg.lambda_sim * l_sim + cfg.lambda_far * l_far
            parts.update(sim=float(l_sim.detach()), far=float(l_far.detach()))
        parts["loss"] = float(loss.detach())
        return loss, parts

    # -- ConceptSHAP quantities --------------------------------------------------------------------

    def _eval_setup(self, h: Tensor, labels: Tensor, tail: Tail):
        self._require_fitted()
        h = check_activations(h, name="h", d=self.d).to(self._dev(), torch.float32)
        labels = check_labels(labels, h.shape[0], name="labels").to(self._dev())
        with torch.no_grad():
            logits = tail(h)
        n_classes = int(logits.shape[1])
        check_labels(labels, h.shape[0], name="labels", n_classes=n_classes)
        n_orig = int((logits.argmax(1) == labels).sum())
        return h, labels, n_classes, n_orig

    def completeness(self, h: Tensor, labels: Tensor, tail: Tail, *, keep: Optional[list[int]] = None,
                     form: str = "accuracy") -> float:
        """eta of the concepts in ``keep`` (default: ``selected``; others zeroed), against ``labels``.

        ``labels`` are normally the LLM's predicted labels; acc_orig is that of argmax tail(h).
        """
        h, labels, n_classes, n_orig = self._eval_setup(h, labels, tail)
        if keep is None:
            keep = self.selected or list(range(self.n_concepts))
        fn = subset_accuracy_fn(self.encode(h), self.reconstruct, tail, labels, n_classes=n_classes,
                                n_correct_orig=n_orig, form=form, players=keep)
        return fn(np.ones(len(keep), dtype=bool))

    def shapley(self, h: Tensor, labels: Tensor, tail: Tail, *, config: Optional[ShapleyConfig] = None,
                players: Optional[list[int]] = None) -> ShapleyResult:
        """Shapley importance of each concept in ``players`` (default: all) for the completeness score.

        Exact enumeration when there are at most ``config.exact_max`` players, else the permutation
        estimator with ``config.n_permutations`` orderings (values with standard errors).
        """
        cfg = config if config is not None else ShapleyConfig()
        h, labels, n_classes, n_orig = self._eval_setup(h, labels, tail)
        players = list(range(self.n_concepts)) if players is None else [int(j) for j in players]
        fn = subset_accuracy_fn(self.encode(h), self.reconstruct, tail, labels, n_classes=n_classes,
                                n_correct_orig=n_orig, form=cfg.completeness_form, players=players)
        if len(players) <= cfg.exact_max:
            return shapley_exact(fn, len(players))
        return shapley_permutation(fn, len(players), n_permutations=cfg.n_permutations, seed=cfg.seed)
