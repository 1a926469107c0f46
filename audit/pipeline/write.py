"""Every output folder of results: `audit run`'s (results.json, report.html, junit.xml, samples.jsonl), `audit static`'s
(results.json) and `audit report`'s (report.html, junit.xml), written through audit/outputs.py (a temporary folder of
ours renamed into place; never into or over an input). results.json's text is reports/results_io.dumps_results: every
one written is validated against checks/schemas/results.schema.json first."""

from __future__ import annotations

import json
import os
from pathlib import Path

from audit.outputs import MARKER, OutputDir, is_ours, write_file
from checks.errors import AuditError
from reports.html import render_html
from reports.junit import render_junit
from reports.results_io import dumps_results

RESULTS_NAME = "results.json"
SAMPLES_NAME = "samples.jsonl"  # every completion judged, one JSON object a line
REACHED_NAME = "reached-config.yaml"  # what reached the weights, as a config a later run can be held to (--config)
REPORT_FILES = {"report.html": render_html, "junit.xml": render_junit}
OUTPUT_KIND = "audit output"  # the marker's kind of a folder of results (`audit report` may add its files to one)


def write_results(results: dict, folder: Path) -> Path:
    """``folder``/results.json (``folder`` a temporary folder of ours), validated against its schema."""
    path = folder / RESULTS_NAME
    path.write_text(dumps_results(results), encoding="utf-8")
    return path


def write_outputs(results: dict, out: str, inputs=(), force: bool = False) -> Path:
    """`audit run`: report.html, results.json, junit.xml and samples.jsonl (plus applied-fix/ when a fix was applied)."""
    applied = results.pop("_applied_results", None)
    with OutputDir(out, inputs=inputs, force=force, kind=OUTPUT_KIND) as od:
        for folder, res in ((od.tmp, results), (od.tmp / "applied-fix", applied)):
            if res is None:
                continue
            folder.mkdir(exist_ok=True)
            write_results(res, folder)
            write_samples(res, folder / SAMPLES_NAME)
            for name, render in REPORT_FILES.items():
                (folder / name).write_text(render(res), encoding="utf-8")
            if res.get("reached_config"):
                (folder / REACHED_NAME).write_text(res["reached_config"], encoding="utf-8")
        dest = od.commit()
    return dest


def write_static(doc: dict, out: str | os.PathLike, inputs=(), force: bool = False) -> Path:
    """`audit static`: OUT/results.json."""
    with OutputDir(out, inputs=inputs, force=force, kind=OUTPUT_KIND) as od:
        write_results(doc, od.tmp)
        dest = od.commit()
    return dest / RESULTS_NAME


def write_samples(results: dict, path: Path) -> None:
    """Every judged completion, one JSON object per line: prompt, completion, reasoning, label, reason, set, model."""
    rows = ((results.get("checks") or {}).get("refusal") or {}).get("data", {}).get("samples") or []
    path.write_text("".join(json.dumps({**r, "model": "base" if r.get("when") == "before" else "ablated"}, ensure_ascii=False, sort_keys=True)
                            + "\n" for r in rows), encoding="utf-8")


def write_report(results: dict, out: str | os.PathLike, inputs=()) -> list[Path]:
    """`audit report`: report.html and junit.xml into ``out``: a new (or empty) folder, or a folder of results this tool
    wrote (its earlier report files are replaced). Any other folder is refused: a model directory, ours or not, or a
    folder of the user's."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise AuditError(f"{out}: is a file; -o takes the folder report.html and junit.xml go into")
    if out.is_dir() and any(out.iterdir()):
        if not is_ours(out) or _kind(out) != OUTPUT_KIND:
            what = "a folder this tool did not write" if not is_ours(out) else f"a {_kind(out) or 'folder'} this tool wrote, not a folder of results"
            raise AuditError(f"{out}: is {what}; report.html and junit.xml go only into a new folder or one `audit run` / `audit static` "
                             "wrote -- choose another -o")
        return [write_file(out / name, lambda p, r=render: p.write_text(r(results), encoding="utf-8"), inputs, force=True,
                           ours=lambda p: True) for name, render in REPORT_FILES.items()]
    with OutputDir(out, inputs=inputs, kind=OUTPUT_KIND) as od:
        for name, render in REPORT_FILES.items():
            (od.tmp / name).write_text(render(results), encoding="utf-8")
        dest = od.commit()
    return [dest / name for name in REPORT_FILES]


def _kind(folder: Path) -> str | None:
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info.get("kind") if isinstance(info, dict) else None
