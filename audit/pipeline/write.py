"""The output folder of `audit run`: results.json, report.html, junit.xml and samples.jsonl, written in a temporary
folder of ours and renamed into place (audit/outputs.py: never into or over an input)."""

from __future__ import annotations

from pathlib import Path

from audit.outputs import OutputDir
from reports.html import write_report
from reports.junit import write_junit
from reports.results_io import write_results_json, write_text_atomic

SAMPLES_NAME = "samples.jsonl"  # every completion judged, one JSON object a line
REACHED_NAME = "reached-config.yaml"  # what reached the weights, as a config a later run can be held to (--config)


def write_outputs(results: dict, out: str, inputs=(), force: bool = False) -> Path:
    """report.html, results.json and junit.xml (plus applied-fix/ when a fix was applied), written atomically."""
    applied = results.pop("_applied_results", None)
    with OutputDir(out, inputs=inputs, force=force) as od:
        for folder, res in ((od.tmp, results), (od.tmp / "applied-fix", applied)):
            if res is None:
                continue
            folder.mkdir(exist_ok=True)
            write_results_json(res, folder / "results.json")
            write_samples(res, folder / SAMPLES_NAME)
            write_report(res, folder / "report.html")
            write_junit(res, folder / "junit.xml")
            if res.get("reached_config"):
                write_text_atomic(folder / REACHED_NAME, res["reached_config"])
        dest = od.commit()
    return dest


def write_samples(results: dict, path: Path) -> None:
    """Every judged completion, one JSON object per line: prompt, completion, reasoning, label, reason, set, model."""
    import json


    rows = ((results.get("checks") or {}).get("refusal") or {}).get("data", {}).get("samples") or []
    write_text_atomic(path, "".join(json.dumps({**r, "model": "base" if r.get("when") == "before" else "ablated"}, ensure_ascii=False, sort_keys=True) + "\n"
                                    for r in rows))
