"""The diagnosis: from a run's evidence to ranked causes, each with its fix family, or an honest "unexplained".

- evidence.py: ``Evidence`` (typed) and ``build_evidence`` from the check results and what reached the weights;
- rules.py: one rule per cause (conditions, thresholds from checks/thresholds.py, fix family), the ``RULES`` table;
- diagnose.py: ``diagnose`` runs the rules, ``rank_by_simulation`` orders causes by what their simulated fixes did;
- outcome.py: ``conclude``: not needed, explained (proven or on evidence), or unexplained with what was tried;
- cause.py: ``Cause`` and ``cite`` (each item of evidence names the measurement it comes from).

Pure: no disk, no model. audit/pipeline/run.py sequences it; audit/pipeline/simulate.py walks the fix families.
"""

from checks.diagnosis.cause import Cause, cite, confidence_label
from checks.diagnosis.diagnose import diagnose, rank_by_simulation
from checks.diagnosis.evidence import Evidence, build_evidence
from checks.diagnosis.outcome import conclude
from checks.diagnosis.rules import BY_ID, RULES, TITLES, WRITER_CAUSES, prefix_collisions

__all__ = ["BY_ID", "RULES", "TITLES", "WRITER_CAUSES", "Cause", "Evidence", "build_evidence", "cite", "conclude", "confidence_label",
           "diagnose", "prefix_collisions", "rank_by_simulation"]
