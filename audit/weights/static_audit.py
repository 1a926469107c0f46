"""The static audit: base vs ablated weights, without running either model (unless asked to measure).

``static_audit`` finds the base (``--base``, else the manifest's ``base.path``), the intent (our
manifest, else a ``--config`` YAML -- ours or llm-abliteration's -- planned on the base's layout,
else inferred from what changed), the directions (``directions``, else measured on the base from
``harmful``/``harmless``, else the manifest's or config's measurement file), streams every tensor
pair once (audit/weights/compare.py) and returns the "weights", "projection" and "recovery" CheckResults.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch

from audit import __version__
from audit.ablation.suppress import plan_suppress
from audit.forward.measure import measure_directions
from audit.intent.config import AblationConfig, load_config, plan, resolve_measurements
from audit.intent.directions import load_directions
from audit.intent.manifest import load_manifest
from audit.model.directory import ModelDir, identity_changes
from audit.model.gguf_file import GGUFModel, is_gguf
from audit.model.hashes import input_entries
from audit.model.prompts import load_prompts
from audit.weights import native
from audit.weights.compare import compare_models, open_pair
from checks.conversion import check_conversion
from checks.errors import AuditError
from checks.findings import FAIL, CheckResult, Finding, jsonable
from checks.layout import targets_of
from checks.projection import TensorProjection, check_projection
from checks.recover import check_recovery
from checks.weights import Intent, check_weights, inferred_intent
from reports.results_io import SCHEMA_VERSION


def _directions_obj(directions):
    if directions is None:
        return None
    if hasattr(directions, "refusal_dir"):
        return directions
    return load_directions(directions)


def _unit(v: torch.Tensor) -> torch.Tensor | None:
    v = v.float().flatten()
    n = v.norm()
    return v / n if n > 0 and torch.isfinite(n) else None


def _intent_from_edits(edits, source: str, config, keys=None) -> tuple[Intent, dict[int, dict]]:
    targets: dict[str, set[int]] = {}
    per_layer: dict[int, dict] = {}
    for e in edits:
        layer = 0 if e.layer is None else e.layer
        for t in e.targets:
            targets.setdefault(t, set()).add(layer)
        per_layer.setdefault(layer, {"direction": e.direction, "measurement": e.direction_index, "scale": e.scale})
    entries = [{"layer": en.layer, "measurement": en.measurement, "scale": en.scale, "sparsity": en.sparsity} for en in config.entries]
    for en in config.entries:  # entries that matched no tensor still count (for collisions and gaps)
        per_layer.setdefault(en.layer, {"direction": None, "measurement": en.measurement, "scale": en.scale})
    return Intent(source, targets, set(keys) if keys is not None else {e.key for e in edits}, entries,
                  f"{len(edits)} planned edits from {config.source}"), per_layer


def static_audit(ablated, base=None, config=None, directions=None, harmful=None, harmless=None, progress=None,
                 record: dict | None = None, against=None, same_ok: bool = False) -> dict[str, CheckResult]:
    """Audit the weights of ``ablated`` (a model directory or a GGUF file) against its base; returns {"weights", "projection",
    "recovery"}, and "conversion" with ``against``: the safetensors ablation a GGUF ``ablated`` was converted from, whose
    manifest then states the intent (checks/conversion.py: did the edit survive conversion?).

    ``record``: a dict that receives the per-tensor records (diffs, projections, recoveries, the planned edits by
    key, the intent's source, the directions used): what audit/intent/reached.py writes the reached ablation down from.
    ``same_ok``: ``ablated`` may be ``base`` itself (the no-op control of `audit run --control`).
    """
    t0 = time.perf_counter()
    ablated = Path(ablated)
    if against is not None and not is_gguf(ablated):
        raise AuditError(f"--against compares a GGUF file with the safetensors model it was converted from; {ablated} is not a .gguf file")
    intent_dir = Path(against) if against is not None else ablated  # where the ablation's manifest and directions are
    manifest = load_manifest(intent_dir) if intent_dir.is_dir() else None
    if base is None:
        if manifest is None:
            raise AuditError(f"{intent_dir}: has no ablation-manifest.json, so its base is unknown; pass --base BASE (the model it was ablated from)")
        base = manifest["base"]["path"]
        if not Path(base).is_dir():
            raise AuditError(f"{intent_dir}: its manifest names the base {base}, which is not there; pass --base BASE")
    md_a, md_b = open_pair(ablated, base, same_ok=same_ok)
    md_s = open_pair(against, base)[0] if against is not None else None
    layout = md_b.layout

    # directions measured on the base (the model's own, per layer)
    measured = _directions_obj(directions)
    if measured is not None and measured.hidden_size != layout.hidden_size:
        raise AuditError(f"{directions if not hasattr(directions, 'refusal_dir') else 'the directions'}: hidden size {measured.hidden_size}, "
                         f"but {md_b.path} has hidden_size {layout.hidden_size}; they were measured on another model -- re-run `audit measure` on this base")
    if measured is None and (harmful is not None or harmless is not None):
        measured = measure_directions(md_b, load_prompts(harmful, "harmful"), load_prompts(harmless, "harmless"), progress=progress)

    # the intent, with the directions it ablated: an explicit --config is the user's statement of intent and
    # wins over a manifest; the manifest's directions file still serves when the config names none
    intent, per_layer, intent_dirs = None, {}, None
    suppressed_keys: set[str] = set()  # router tensors a suppress config edits: no direction to recover from them
    suppressed_rows: list[dict] = []  # ... and what the key diff shows of them
    dfile = intent_dir / manifest.get("directions_file", "directions.safetensors") if manifest is not None else None
    manifest_dirs = dfile if dfile is not None and dfile.is_file() else None
    if config is not None:
        cfg = load_config(config)
        mp = resolve_measurements(cfg)
        if mp is not None and not mp.is_file() and measured is None and manifest_dirs is None:
            raise AuditError(f"{config}: names measurements {cfg.measurements!r}, but there is no such file ({mp}); pass --directions FILE "
                             "or fix the path (relative paths are read beside the config first)")
        intent_dirs = (load_directions(mp) if mp is not None and mp.is_file() else None) or measured or \
            (load_directions(manifest_dirs) if manifest_dirs else None)
        edits = plan(cfg, layout, intent_dirs)
        supp = [] if cfg.suppress_experts == "auto" else plan_suppress(cfg, layout)  # router entries suppress_experts names
        suppressed_keys = {se.key for se in supp}
        suppressed_rows = [{**se.to_dict(), "reason": f"named in {config}"} for se in supp]
        intent, per_layer = _intent_from_edits(edits, "config", cfg, keys=[e.key for e in edits] + [se.key for se in supp])
    elif manifest is not None:
        cfg = AblationConfig.from_dict(manifest["config"], source=str(intent_dir / "ablation-manifest.json"))
        intent_dirs = load_directions(manifest_dirs) if manifest_dirs else measured
        edits = plan(cfg, layout, intent_dirs)
        suppressed_keys = {m["key"] for m in manifest.get("router_suppressed") or []}
        suppressed_rows = list(manifest.get("router_suppressed") or [])
        intent, per_layer = _intent_from_edits(edits, "manifest", cfg, keys=[m["key"] for m in manifest["modified"]]
                                               + [m["key"] for m in manifest.get("router_suppressed") or []])
    if measured is None:
        measured = intent_dirs
    planned = {}
    if intent is not None:
        planned = {e.key: e.direction for e in edits if e.direction is not None}
    # the ablated direction for keys the plan does not name: the layer entry's, else the commonest
    layer_dir = {l: v["direction"] for l, v in per_layer.items() if v.get("direction") is not None}
    common = None
    if layer_dir:
        idx = Counter(v["measurement"] for v in per_layer.values() if v.get("direction") is not None).most_common(1)[0][0]
        common = next(v["direction"] for v in per_layer.values() if v["measurement"] == idx and v.get("direction") is not None)
    local = None
    if measured is not None and measured.hidden_size == layout.hidden_size:
        local = measured.refusal_dir
    nL = local.shape[0] if local is not None else 0
    local_units = {}

    def directions_for(key, role):
        out = {}
        r = planned.get(key)
        if r is None:
            r = layer_dir.get(role.layer, common) if role.layer is not None else layer_dir.get(0, common)
        if r is not None:
            out["ablated"] = r
        if local is not None:
            i = 0 if role.layer is None else role.layer + (1 if role.io == "writer" else 0)
            i = min(i, nL - 1)
            if i not in local_units:
                local_units[i] = _unit(local[i])
            out["local"] = local_units[i]
        return out

    from tqdm import tqdm

    native.kernels()  # loaded here, not inside the first worker
    with tqdm(total=md_a.nbytes + md_b.nbytes, desc="weights", unit="B", unit_scale=True, disable=None if progress is None else not progress) as bar:
        cmp = compare_models(md_a, md_b, directions_for, progress=lambda done, total: bar.update(done - bar.n))
    cmp_s = None
    if md_s is not None:  # the source the GGUF was converted from, against the same base along the same directions
        with tqdm(total=md_s.nbytes + md_b.nbytes, desc="source", unit="B", unit_scale=True, disable=None if progress is None else not progress) as bar:
            cmp_s = compare_models(md_s, md_b, directions_for, progress=lambda done, total: bar.update(done - bar.n))
    t_stream = time.perf_counter() - t0

    if intent is None:
        intent = inferred_intent(cmp.diffs)
    results: dict[str, CheckResult] = {}
    t1 = time.perf_counter()
    results["weights"] = check_weights(cmp.diffs, intent, layout.num_layers, suppressed=suppressed_rows)
    results["weights"].data["layout"] = layout.summary()
    results["weights"].data["bytes_read"] = cmp.bytes_read
    results["weights"].data["stream_seconds"] = round(cmp.seconds, 3)
    results["weights"].data["base"] = str(md_b.path)
    if isinstance(md_a, GGUFModel):
        results["weights"].data["gguf"] = md_a.summary()
    recorded = ((manifest or {}).get("base") or {}).get("identity")
    if recorded:
        changes = identity_changes(recorded, md_b.identity())
        if changes:
            results["weights"].findings.insert(0, Finding(
                "base-changed", FAIL, f"the base {md_b.path} is not the model this ablation was made from ({'; '.join(changes[:5])}): "
                "every comparison below is against another model -- pass the original base with --base", value=float(len(changes)),
                evidence={"changes": changes, "manifest_base": manifest["base"].get("path")}))
            results["weights"].status = FAIL
            results["weights"].summary = "the base changed since the ablation; " + results["weights"].summary

    projs = [p for p in cmp.projections if p.key not in suppressed_keys]  # suppression is not a projection (audit/ablation/suppress.py)
    if not any("ablated" in p.dirs for p in projs):  # no intended direction: each changed tensor against its own recovered one
        rec_by_key = {r.key: r for r in cmp.recoveries}
        for p in projs:
            if p.key in rec_by_key and rec_by_key[p.key].recovery.along is not None:
                p.dirs["recovered"] = rec_by_key[p.key].recovery.along
        if not projs:
            projs = [TensorProjection(r.key, r.layer, r.component, r.projection, r.io, (), True, md_a.logical[r.key].dtype, r.expert, 0.0,
                                      {"recovered": r.recovery.along}) for r in cmp.recoveries if r.recovery.along is not None]
            roles = layout.roles
            for p in projs:
                p.targets = targets_of(roles[p.key]) if p.key in roles else ()
    cosines = []
    if local is not None:
        for l in range(layout.num_layers):
            r = layer_dir.get(l, common)
            if r is None:
                continue
            row = {"layer": l, "measurement": per_layer.get(l, {}).get("measurement")}
            for name, i in (("cos_index_L", l), ("cos_index_L+1", l + 1)):
                row[name] = abs(float(_unit(local[min(i, nL - 1)]) @ r.float())) if _unit(local[min(i, nL - 1)]) is not None else None
            cosines.append(row)
    results["projection"] = check_projection(projs, layout.n_routed_experts, layout.hidden_size, cosines)

    if cmp_s is not None:
        results["conversion"] = check_conversion(cmp.projections, cmp_s.projections, {d.key for d in cmp.diffs if d.changed},
                                                 {d.key for d in cmp_s.diffs if d.changed}, label=ablated.name)
        results["conversion"].data["source"] = str(md_s.path)
        results["conversion"].data["bytes_read"] = cmp_s.bytes_read
    quality = measured.quality_table() if measured is not None else None
    recoveries = [r for r in cmp.recoveries if r.key not in suppressed_keys]
    results["recovery"] = check_recovery(recoveries, local, quality, per_layer)
    if record is not None:
        record.update(diffs=cmp.diffs, projections=cmp.projections, recoveries=recoveries, layout=layout, paths=(md_a.path, md_b.path),
                      suppressed_keys=sorted(suppressed_keys),
                      planned={e.key: e for e in edits} if intent is not None and intent.source != "inferred" else {},
                      intent_source=intent.source, config=cfg if intent is not None and intent.source != "inferred" else None,
                      directions=intent_dirs if intent_dirs is not None else measured)
    t_checks = time.perf_counter() - t1
    for name, r in results.items():
        r.seconds = round(t_stream + t_checks if name == "weights" else t_checks, 3)
    for md in (md_a, md_b, md_s):
        if md is not None:
            md.close()
    return results


def static_inputs(ablated, base, against=None, config=None, directions=None, harmful=None, harmless=None) -> list:
    """(role, root, name) of every file `audit static` read (audit/model/hashes.py): the models, the config, directions and prompts."""
    md_b = ModelDir(base)
    out = input_entries("model", GGUFModel(ablated, md_b) if is_gguf(ablated) else ModelDir(ablated)) + input_entries("base", md_b)
    if against is not None:
        out += input_entries("source", ModelDir(against))
    for role, src in (("config", config), ("directions", directions), ("prompts:harmful", harmful), ("prompts:harmless", harmless)):
        out += input_entries(role, src)
    return out


def results_document(results: dict[str, CheckResult], ablated, base, started: float, extra: dict | None = None) -> dict:
    """The results.json document (schema checks/schemas/results.schema.json)."""
    doc = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "moe-ablation-audit", "version": __version__},
        "run": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)), "seconds": round(time.time() - started, 3),
                "command": "static"},
        "model": {"path": str(Path(ablated).resolve()), "base": None if base is None else str(Path(base).resolve())},
        "checks": {name: r.to_dict() for name, r in results.items()},
    }
    if extra:
        doc.update(extra)
    return jsonable(doc)
