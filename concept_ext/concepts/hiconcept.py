"""HI-Concept baseline (method.md 4.3), reference behaviour by default plus a flagged consistent variant.

Scores: S = H c~ (raw projections on unit concepts), Sn = softmax over the n concepts of H~ c~,
mask = [Sn > 1/n], p = (mask*S)/(sum_row + 1e-3), g(p) = ReLU(p W1) W2.

Loss = L_ae + L_pred + L_flip + 0.1 L_sim + 0.5 L_far with

* L_ae = MSE(H~, g(p)) (mean over elements): the target is the **normalised** input although the
  un-normalised g(p) is what enters the tail (method.md oddity 7, reproduced);
* L_pred = CE(tail(g(p)), y_pred); L_sim on the softmaxed scores; L_far as in ConceptSHAP;
* L_flip (epochs >= 50 of 100): keep ~ Bernoulli(0.8) per sample and per concept for concepts 0..n-2
  (the last concept is never masked); p' = (keep*S)/(sum_row + 1e-3) with the **raw**, un-thresholded S
  (oddity 7, reproduced); y = tail(g(p)), y' = tail(g(p')), both undetached;
  L_flip = -mean_i sum_c |softmax(y)_c - softmax(y')_c|.

``HIConceptConfig(consistent=True)`` is **our** variant, not the paper's baseline: L_ae targets the
un-normalised h (the space g(p) is fed forward in) and the flip mask perturbs the thresholded p,
p' = (keep*mask*S)/(sum_row + 1e-3). Everything else is unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from concept_ext.concepts.base import register_concept_model
from concept_ext.config.baselines import HIConceptConfig
from concept_ext.concepts.bottleneck import BottleneckConcepts, Scores, _ratio, far_loss_v2, sim_loss_v2

__all__ = ["HIConceptConcepts", "flip_loss"]


def flip_loss(logits: Tensor, logits_flipped: Tensor) -> Tensor:  # [B, C] each
    """-mean_i sum_c |softmax(y)_c - softmax(y')_c| (gradients through both arguments)."""
    return -(logits.softmax(dim=1) - logits_flipped.softmax(dim=1)).abs().sum(dim=1).mean()


@register_concept_model
class HIConceptConcepts(BottleneckConcepts):
    """HI-Concept concept bottleneck; see the module docstring for the reference/consistent switch."""

    method = "hiconcept"
    config_cls = HIConceptConfig

    def scores(self, h: Tensor) -> Scores:  # h [B, d]
        cfg, net = self.config, self.net
        c_unit = net.unit_concepts()  # [d, n]
        s = h @ c_unit  # [B, n] raw projections
        sn = (F.normalize(h, dim=1) @ c_unit).softmax(dim=1)  # [B, n]
        mask = sn > 1.0 / cfg.n_concepts  # above-uniform concepts (method.md 4.3)
        return Scores(S=s, Sn=sn, mask=mask, p=_ratio(mask * s, cfg.eps))

    def flip_keep(self, batch: int, gen: torch.Generator) -> Tensor:  # -> [B, n] float
        """The flip mask: Bernoulli(keep_prob) on concepts 0..n-2, concept n-1 always kept."""
        n = self.config.n_concepts
        probs = torch.full((batch, n - 1), self.config.keep_prob)
        keep = torch.bernoulli(probs, generator=gen)
        return torch.cat([keep, torch.ones(batch, 1)], dim=1).to(self._dev())

    def batch_loss(self, hb, yb, tail, epoch, gen, h_all):
        cfg, net = self.config, self.net
        sc = self.scores(hb)
        recon = net.g(sc["p"])  # [B, d]
        target = hb if cfg.consistent else F.normalize(hb, dim=1)
        l_ae = F.mse_loss(recon, target)
        logits = tail(recon)
        l_pred = F.cross_entropy(logits, yb)
        l_sim, l_far = sim_loss_v2(sc["Sn"]), far_loss_v2(net.unit_concepts())
        loss = cfg.lambda_ae * l_ae + cfg.lambda_pred * l_pred
        if epoch >= cfg.reg_start_epoch:
            loss = loss + cfg.lambda_sim * l_sim + cfg.lambda_far * l_far
        parts = {"ae": float(l_ae.detach()), "pred": float(l_pred.detach()),
                 "sim": float(l_sim.detach()), "far": float(l_far.detach())}
        if epoch >= cfg.flip_start_epoch:
            keep = self.flip_keep(hb.shape[0], gen)
            base = sc["mask"] * sc["S"] if cfg.consistent else sc["S"]
            p_flip = _ratio(keep * base, cfg.eps)
            l_flip = flip_loss(logits, tail(net.g(p_flip)))
            loss = loss + cfg.lambda_flip * l_flip
            parts["flip"] = float(l_flip.detach())
        parts["loss"] = float(loss.detach())
        return loss, parts
