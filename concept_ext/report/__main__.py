"""``python -m concept_ext.report RUN_DIR``: rebuild ``report.md`` and the figures from ``RUN_DIR/metrics.json``."""
from concept_ext.report.markdown import main

raise SystemExit(main())
