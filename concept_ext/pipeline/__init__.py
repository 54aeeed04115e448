"""The job: the fingerprinted, resumable stages (:mod:`~concept_ext.pipeline.stages`), fitting and evaluating
one concept method (:mod:`~concept_ext.pipeline.methods`), the results dictionary
(:mod:`~concept_ext.pipeline.results`) and per-input explanations (:mod:`~concept_ext.pipeline.explain`)."""
