"""`audit verify RESULTS.json [MODEL]`: does a recorded verdict apply to these bytes, and does the recorded evidence still pass?

Every input file results.json records (``inputs.files``: both models' shards and side files, a GGUF, the config, the
directions, the prompt files, the gate file) is hashed again, always read in full (Hugging Face cache blob names are
not trusted here), and compared with its recorded SHA-256; MODEL, when given, stands in for the recorded model (the
same file names in another folder, or another copy of a GGUF file). The gate is then evaluated again on the recorded
checks with the recorded gate settings (``run.gate_config``; a results.json of `audit static` has none: its checks'
statuses decide, as `audit static` does). Exit 0: the bytes are the recorded ones and the gate passes; 1: a file
changed or is missing, or the gate fails; 2: results.json cannot be verified.
"""

from __future__ import annotations

import os
from pathlib import Path

from audit.model.hashes import hash_inputs
from audit.pipeline.inputs import gate_from_record
from checks.errors import AuditError
from checks.gate import evaluate_gate
from reports.results_io import load_results


def verify(results_path, model=None) -> dict:
    """{"files": [per file: role, path, recorded, now, status], "changed", "missing", "bytes_match", "gate", "passed", "recorded_verdict"}."""
    doc = load_results(results_path)
    rec = doc.get("inputs") or {}
    files = rec.get("files")
    if not files:
        raise AuditError(f"{results_path}: records no input hashes (a results.json written before they were recorded); "
                         "re-run the audit to verify it")
    m = Path(model) if model is not None else None
    if m is not None and not m.exists():
        raise AuditError(f"{m}: no such file or folder; pass the model to verify in place of the recorded one")
    rows, entries = [], []
    for f in files:
        root, name = Path(f["root"]), f["name"]
        if m is not None and f["role"] == "model":
            root, name = (m.parent, m.name) if m.is_file() else (m, name)
        path = root / name
        row = {"role": f["role"], "path": str(path), "recorded": f.get("sha256"), "now": None, "status": "missing"}
        if path.is_file():
            entries.append((f["role"], root, name))
            row["status"] = None
        rows.append(row)
    now = hash_inputs(entries, reuse_hf=False)
    digest = {os.path.realpath(Path(x["root"]) / x["name"]): x["sha256"] for x in now["files"]}
    for row in rows:
        if row["status"] is None:
            row["now"] = digest[os.path.realpath(row["path"])]
            row["status"] = "ok" if row["now"] == row["recorded"] else "changed"
    changed = [r["path"] for r in rows if r["status"] == "changed"]
    missing = [r["path"] for r in rows if r["status"] == "missing"]
    gc = (doc.get("run") or {}).get("gate_config")
    if gc is not None:
        gate = evaluate_gate({"checks": doc.get("checks") or {}}, gate_from_record(gc), (gc or {}).get("source", "recorded"))
        gate_passed = gate["passed"]
    else:  # `audit static`: a failed check fails, as its exit code says
        failed = [n for n, c in (doc.get("checks") or {}).items() if isinstance(c, dict) and c.get("status") == "fail"]
        gate = {"passed": not failed, "source": "check statuses (audit static records no gate)", "failed": failed}
        gate_passed = not failed
    return {"files": rows, "changed": changed, "missing": missing, "bytes_match": not changed and not missing, "gate": gate,
            "gate_passed": gate_passed, "recorded_verdict": doc.get("verdict"), "passed": not changed and not missing and gate_passed,
            "seconds": now["seconds"], "bytes": now["bytes"]}
