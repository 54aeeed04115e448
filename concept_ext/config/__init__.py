"""Run configuration as dataclasses, one module per stage family.

* :mod:`~concept_ext.config.sae`: :class:`SAEConfig` (architecture) and :class:`TrainConfig` (the SAE recipe);
* :mod:`~concept_ext.config.clf`: prompt, fine-tuning and caching of the classifier;
* :mod:`~concept_ext.config.baselines`: ICA, ConceptSHAP, HI-Concept, probe and selection settings;
* :mod:`~concept_ext.config.run`: :class:`RunConfig`, the whole job, and its presets.
"""
