"""Text in: datasets (:mod:`~concept_ext.text.data`) and the prompt and tokenisation (:mod:`~concept_ext.text.prompt`)."""
