"""The LLM as a sentence classifier: backbones, hooks, the classifier head, its tail, fine-tuning.

* :mod:`~concept_ext.classifier.backbones`: loading a backbone (hub, package, tiny config);
* :mod:`~concept_ext.classifier.hooks`: reading and replacing the residual stream at a layer;
* :mod:`~concept_ext.classifier.model`: :class:`Classifier` (restricted label head or [CLS]);
* :mod:`~concept_ext.classifier.tail`: the readout of a hidden state (single-token tail, in-context);
* :mod:`~concept_ext.classifier.finetune` / :mod:`~concept_ext.classifier.finetune_fsdp`: fine-tuning.
"""
