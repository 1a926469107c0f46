"""`audit run --reproduce RESULTS.json`: run the recorded passes again with the recorded settings and say whether every
rate and KL falls within the recorded interval (checks/reproduction.py).

The settings are results.json's ``run.options`` (the models, prompts, config, directions, gate, judge, token and batch
sizes, dtype, device, servers); the inputs' hashes are checked first (audit/pipeline/verify.py), and a changed input is
reported beside the numbers. The fix simulation and --apply-fix are not re-run: the numbers compared come from the
passes (refusal, over-refusal, degenerate answers, KL) and the gate. The new run's outputs go to ``out``, with the
comparison as results.json's ``reproduction``.
"""

from __future__ import annotations

from pathlib import Path

from audit.outputs import check_destination
from audit.pipeline.options import RunOptions
from audit.pipeline.run import run_audit
from audit.pipeline.verify import verify
from audit.pipeline.write import write_outputs
from checks.errors import AuditError
from checks.reproduction import compare_runs
from reports.results_io import load_results


def default_out(results_path) -> str:
    """Where a reproduction goes unless -o says: beside the recorded run's folder, named after it."""
    p = Path(results_path)
    folder = p if p.is_dir() else p.parent
    return str(folder.absolute().parent / f"{folder.absolute().name}-reproduced")


def reproduce(results_path, out: str | None = None, force: bool = False, quiet: bool = False) -> dict:
    """The new run's results with ``reproduction`` (the comparison, and which inputs changed); written to ``out``."""
    results_path = Path(results_path)
    if results_path.is_dir():
        results_path = results_path / "results.json"
    out = out or default_out(results_path)
    doc = load_results(results_path)
    rec = (doc.get("run") or {}).get("options")
    if not rec:
        raise AuditError(f"{results_path}: records no run options (a results.json of `audit static`, or written before they were "
                         "recorded); nothing to reproduce")
    opts = RunOptions.from_record(rec, out=out, force=force, quiet=quiet, apply_fix=None, simulate=False,
                                  command=f"audit run --reproduce {results_path}")
    inputs = [opts.model_dir, opts.base, opts.config, opts.gate, opts.harmful, opts.harmless, opts.directions, opts.against,
              results_path]  # never written over: the recorded run's folder is refused as -o
    check_destination(out, inputs, force)
    bytes_check = verify(results_path)
    again = run_audit(opts, write=False)
    cmp = compare_runs(doc, again)
    again["reproduction"] = {"of": str(results_path.resolve()), "status": cmp.status, "summary": cmp.summary, "rows": cmp.data["rows"],
                             "inputs_changed": bytes_check["changed"], "inputs_missing": bytes_check["missing"],
                             "passed": cmp.status == "pass" and bytes_check["bytes_match"]}
    write_outputs(again, out, inputs=inputs, force=force)
    return again
