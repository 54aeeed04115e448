"""The run report: ``report.md`` (:mod:`~concept_ext.report.markdown`), its cell formatting
(:mod:`~concept_ext.report.format`) and figures (:mod:`~concept_ext.report.plots`)."""
