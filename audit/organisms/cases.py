"""The diagnosis matrix: failed (and two sound) ablations of the spread organisms, each built once into the cache.

Every case is a model directory made from a cached ``spread`` organism (audit/organisms/build.py: r* planted
redundantly in every writer group of every layer) the way a user's tool would make it: most with our
own `audit ablate` (configs as in audit/intent/config.py, with a manifest), some by code that
imitates other tools and writes a plain Hugging Face directory without a manifest:

- ``notebook-experts``: a notebook that orthogonalizes the safetensors directly (float32, cast back),
  every writer but only the top-1 "refusal expert" of the routed experts per MoE layer (the expert
  the router picks most at the last prompt token of harmful prompts, measured here);
- ``prefix-tool``: an llm-abliteration-like tool that selects a layer's tensors with
  ``key.startswith(f"model.layers.{n}")`` -- no trailing dot, so layer 1 also edits layers 10-19 --
  and edits ``o_proj`` and every ``down_proj``; it leaves its YAML config and its measurement file
  (llm-abliteration's ``refuse_i`` / ``harmful_i`` / ``harmless_i`` dict);
- ``dense-names-tool``: a tool that knows dense names only (``o_proj``, ``mlp.down_proj``), so on
  Mixtral the experts' ``w2`` are never matched; it leaves its YAML config too.

The direction every case removes is the difference of means that `audit measure` gives on the
organism's training prompts at a mid-depth index (not r*). What each case *is* (``applied``: the
group-level description of what reached the weights; ``intent``: what a foreign tool's config
meant) is recorded in ``case.json``; which cause is to blame is NOT: that is measured by applying
each single candidate fix (benchmarks/diagnosis_matrix.py -> tests/data/diagnosis_truth.json).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from audit.ablation.ablate import DIRECTIONS_NAME, MANIFEST_NAME, ablate
from audit.forward.measure import measure_directions
from audit.forward.probe import probe
from audit.intent.config import AblationConfig
from audit.intent.directions import Directions
from audit.model.directory import ModelDir
from audit.organisms.build import cache_root, cached_organism, load_organism, read_meta, read_prompts
from audit.outputs import OutputDir
from audit.pipeline.run import RunOptions, run_audit
from checks.errors import AuditError
from checks.layout import targets_of
from checks.linalg import project_out

CASES_VERSION = "3"
ORGANISMS = {"glm": ("glm4_moe", "spread", 0), "mix": ("mixtral", "spread", 0), "oss": ("gpt_oss", "spread", 0)}
IN_SAMPLE = ("glm", "mix")  # the organisms the diagnosis rules were written and tuned on
OUT_OF_SAMPLE = ("oss",)  # audited only after the rules were frozen (checks/thresholds.py): reported apart, never tuned on
DEFAULT = ["attn_out", "mlp_down", "experts_down", "shared_down"]  # audit ablate's default components
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja")


@dataclass(frozen=True)
class CaseSpec:
    """How a case is made. ``layers`` None = every layer; ``measurement`` None = the organism's mid-depth index."""

    name: str
    organism: str  # key of ORGANISMS
    description: str
    kind: str = "ablate"  # ablate | notebook-experts | prefix-tool | dense-names-tool
    components: tuple[str, ...] = tuple(DEFAULT)
    layers: tuple[int, ...] | None = None
    measurement: int | None = None
    scale: float = 1.0
    tool_layers: tuple[int, ...] = ()  # prefix-tool: the layers its config lists


def _specs() -> list[CaseSpec]:
    g, m, o = "glm", "mix", "oss"
    no = lambda c: tuple(x for x in DEFAULT if x != c)  # noqa: E731
    return [
        CaseSpec("glm-band-half", g, "every default writer, but only a band of half the layers (3-8 of 12), as the guide's '15-25 of 46'",
                 layers=tuple(range(3, 9))),
        CaseSpec("glm-band-3", g, "every default writer in a band of three layers (5-7 of 12)", layers=(5, 6, 7)),
        CaseSpec("glm-no-attn", g, "every layer, attention (attn_out) left out", components=no("attn_out")),
        CaseSpec("glm-no-shared", g, "every layer, the shared expert (shared_down) left out", components=no("shared_down")),
        CaseSpec("glm-no-routed", g, "every layer, the routed experts' down_proj left out", components=no("experts_down")),
        CaseSpec("glm-no-dense", g, "every layer, the dense MLPs' down_proj (layers 0-2) left out", components=no("mlp_down")),
        CaseSpec("glm-scale-0.3", g, "every writer, every layer, scale 0.3", scale=0.3),
        CaseSpec("glm-scale-2.5", g, "every writer, every layer, scale 2.5 (overshoot)", scale=2.5),
        CaseSpec("glm-scale-12", g, "every writer, every layer, scale 12 (overshoot, model damaged)", scale=12.0),
        CaseSpec("glm-index-early", g, "every writer, every layer, the direction measured at index 1", measurement=1),
        CaseSpec("glm-top1-expert", g, "a notebook: every writer of every layer, but of the routed experts only the top-1 refusal expert per layer",
                 kind="notebook-experts"),
        CaseSpec("glm-prefix-135", g, "an llm-abliteration-like tool on layers [1, 3, 5] whose key prefix without the trailing dot "
                 "also edits layers 10 and 11; its YAML and measurement file, no manifest", kind="prefix-tool", tool_layers=(1, 3, 5)),
        CaseSpec("glm-sound", g, "every default writer, every layer, mid-depth index, scale 1: the control that must pass"),
        CaseSpec("mix-band-half", m, "every writer, but only a band of half the layers (2-5 of 8)", layers=(2, 3, 4, 5)),
        CaseSpec("mix-band-3", m, "every writer in a band of three layers (3-5 of 8)", layers=(3, 4, 5)),
        CaseSpec("mix-no-attn", m, "every layer, attention (attn_out) left out", components=no("attn_out")),
        CaseSpec("mix-no-routed", m, "every layer, the routed experts' down_proj (w2) left out", components=no("experts_down")),
        CaseSpec("mix-scale-0.3", m, "every writer, every layer, scale 0.3", scale=0.3),
        CaseSpec("mix-scale-12", m, "every writer, every layer, scale 12 (overshoot, model damaged)", scale=12.0),
        CaseSpec("mix-index-early", m, "every writer, every layer, the direction measured at index 1", measurement=1),
        CaseSpec("mix-top1-expert", m, "a notebook: attention of every layer, but of the routed experts only the top-1 refusal expert per layer",
                 kind="notebook-experts"),
        CaseSpec("mix-dense-names", m, "a dense-model tool on every layer: it matches o_proj and mlp.down_proj names, so the experts' w2 "
                 "are never edited; its YAML, no manifest", kind="dense-names-tool"),
        CaseSpec("mix-sound", m, "every writer, every layer, mid-depth index, scale 1: the control that must pass"),
        # the out-of-sample family: gpt_oss (fused [E, in, out] experts with biases, router bias, every layer MoE), r* planted late
        CaseSpec("oss-band-half", o, "every default writer, but only a band of half the layers (2-5 of 8)", layers=(2, 3, 4, 5)),
        CaseSpec("oss-band-3", o, "every default writer in a band of three layers (4-6 of 8)", layers=(4, 5, 6)),
        CaseSpec("oss-no-attn", o, "every layer, attention (attn_out) left out", components=no("attn_out")),
        CaseSpec("oss-no-routed", o, "every layer, the fused routed experts' down_proj left out", components=no("experts_down")),
        CaseSpec("oss-scale-0.3", o, "every writer, every layer, scale 0.3", scale=0.3),
        CaseSpec("oss-scale-2.5", o, "every writer, every layer, scale 2.5 (overshoot)", scale=2.5),
        CaseSpec("oss-scale-12", o, "every writer, every layer, scale 12 (overshoot, model damaged)", scale=12.0),
        CaseSpec("oss-index-early", o, "every writer, every layer, the direction measured at index 1", measurement=1),
        CaseSpec("oss-top1-expert", o, "a notebook: attention of every layer, but of the fused routed experts only the top-1 refusal expert's "
                 "slice per layer", kind="notebook-experts"),
        CaseSpec("oss-dense-names", o, "a dense-model tool on every layer: it matches o_proj and mlp.down_proj names, so the fused experts are "
                 "never edited; its YAML, no manifest", kind="dense-names-tool"),
        CaseSpec("oss-sound", o, "every writer, every layer, mid-depth index, scale 1: the control that must pass"),
    ]


SPECS: dict[str, CaseSpec] = {s.name: s for s in _specs()}

LEARNED = "learned"  # the learned organism's key: SmolLM2-135M-Instruct upcycled and taught refusal (audit/organisms/learned.py)


def _learned_specs() -> list[CaseSpec]:
    """Ablations of the learned organism (30 layers; MoE in 10, 12, ..., 28; dense MLPs elsewhere). The direction is the
    difference of means at the organism's best-quality index (its ``separating_index``), as `audit measure` ranks them."""
    k = LEARNED
    no = lambda c: tuple(x for x in DEFAULT if x != c)  # noqa: E731
    return [
        CaseSpec("lrn-complete", k, "every default writer, every layer, the best-quality index, scale 1: the complete ablation"),
        CaseSpec("lrn-band-half", k, "every default writer, but only the middle half of the layers (8-22 of 30)", layers=tuple(range(8, 23))),
        CaseSpec("lrn-no-routed", k, "every layer, the routed experts' down_proj left out", components=no("experts_down")),
        CaseSpec("lrn-scale-0.5", k, "every writer, every layer, scale 0.5", scale=0.5),
        CaseSpec("lrn-index-early", k, "every writer, every layer, the direction measured at index 2", measurement=2),
    ]


LEARNED_SPECS: dict[str, CaseSpec] = {s.name: s for s in _learned_specs()}  # their truth: tests/data/diagnosis_truth_learned.json
ALL_SPECS: dict[str, CaseSpec] = {**SPECS, **LEARNED_SPECS}


@dataclass
class Case:
    name: str
    ablated_dir: Path
    base_dir: Path
    config_path: Path | None  # a foreign tool's YAML (None: the manifest says it, or nothing does)
    directions_path: Path | None  # a foreign tool's measurement file (None: in the manifest, or measured on the base)
    description: str
    applied: dict = field(default_factory=dict)  # what reached the weights, by group: components, layers, measurement, scale, experts
    intent: dict | None = None  # what a foreign tool's config meant (None: the manifest's config is the intent)
    organism: dict = field(default_factory=dict)


# -- the organism side: cached base, its directions, its refusal experts ----------------------------------------------


def cases_root() -> Path:
    return cache_root() / "cases"


@contextlib.contextmanager
def _locked(root: Path, name: str):
    """An exclusive lock per cached item: concurrent test processes wait for one builder."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def organism_info(key: str) -> dict:
    """The organism behind cases ``key`` (built on first use): its path, the directions `audit measure` gives
    on its training prompts (saved beside), the mid-depth index, the cosines to r*, and the top-1 refusal
    expert per MoE layer (most picked at the last prompt token of harmful prompts)."""
    if key == LEARNED:
        from audit.organisms.learned import cached_learned

        base = cached_learned()
    else:
        family, variant, seed = ORGANISMS[key]
        base = cached_organism(family, variant, seed)
    root = cases_root()
    dest = root / f"{base.name}-c{CASES_VERSION}"
    if not (dest / "info.json").exists():
        with _locked(root, dest.name):
            if not (dest / "info.json").exists():
                with OutputDir(dest, force=True, kind="organism cache") as od:
                    _measure_organism(base, od.tmp)
                    od.commit()
    info = json.loads((dest / "info.json").read_text())
    info["directions"] = str(dest / "directions.safetensors")
    return info


def _measure_organism(base: Path, out: Path) -> None:
    md = ModelDir(base)
    th, ta = read_prompts(base, "train_harmful"), read_prompts(base, "train_harmless")
    dirs = measure_directions(md, th, ta)
    dirs.save(out / "directions.safetensors")
    meta = read_meta(base)
    L = md.layout.num_layers
    mid = L // 2 if "r_star" in meta else meta["separating_index"]  # learned: no r*; the best-quality index
    cos = []
    if "r_star" in meta:
        r_star = torch.tensor(meta["r_star"], dtype=torch.float64)
        for i in range(dirs.n):
            d = dirs.refusal_dir[i].double()
            cos.append(float(d @ r_star / d.norm()) if d.norm() > 0 else 0.0)
    model, tok, _ = load_organism(base)
    with torch.no_grad():
        ph = probe(model, tok, th, dirs.refusal_dir[mid])
        pa = probe(model, tok, ta, dirs.refusal_dir[mid])
    top1, rates = {}, {}
    for layer in ph.moe_layers:
        harm = ph.last_sel[:, layer].mean(0)  # [E]: share of harmful prompts whose last token picks e
        harmless = pa.last_sel[:, layer].mean(0)
        e = max(range(len(harm)), key=lambda k: (float(harm[k]), float(harm[k] - harmless[k])))
        top1[str(layer)] = e
        rates[str(layer)] = {"harmful": [round(float(x), 3) for x in harm], "harmless": [round(float(x), 3) for x in harmless]}
    info = {"base": str(base), "family": md.layout.family, "num_layers": L, "mid_index": mid,
            "moe_layers": md.layout.moe_layers, "n_routed_experts": md.layout.n_routed_experts,
            "cos_to_r_star": [round(c, 4) for c in cos] or None, "quality": [round(r["quality"], 5) for r in dirs.quality_table()],
            "top1_refusal_expert": top1, "last_token_pick_rates": rates,
            "present": {t: sorted(ls) for t, ls in present_groups(md.layout).items()}}
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")


def present_groups(layout) -> dict[str, set[int]]:
    """Ablation target group (writers and readers) -> layers where the model has it (embeddings: layer 0)."""
    out: dict[str, set[int]] = {}
    for role in layout.roles.values():
        for t in targets_of(role):
            if role.component == "embed":
                out.setdefault(t, set()).add(0)
            elif role.layer is not None and role.component != "mtp":
                out.setdefault(t, set()).add(role.layer)
    return out


# -- building a case ---------------------------------------------------------------------------------------------------


def build_case(name: str) -> Case:
    """The case ``name`` (one of SPECS), built on first use into $AUDIT_CACHE/cases; fast when cached."""
    if name not in ALL_SPECS:
        raise AuditError(f"unknown case {name!r}; choose one of {', '.join(ALL_SPECS)}")
    spec = ALL_SPECS[name]
    info = organism_info(spec.organism)
    key = hashlib.sha256(json.dumps([asdict(spec), Path(info["base"]).name, CASES_VERSION], sort_keys=True).encode()).hexdigest()[:10]
    root = cases_root()
    dest = root / f"{name}-{key}"
    if not (dest / "case.json").exists():
        with _locked(root, dest.name):
            if not (dest / "case.json").exists():
                with OutputDir(dest, force=True, kind="organism cache") as od:
                    _build(spec, info, od.tmp)
                    od.commit()
    return load_case(dest)


def load_case(folder: Path) -> Case:
    d = json.loads((Path(folder) / "case.json").read_text())
    opt = lambda k: Path(folder) / d[k] if d.get(k) else None  # noqa: E731
    return Case(d["name"], Path(folder) / "model", Path(d["base"]), opt("config"), opt("directions"), d["description"],
                d["applied"], d.get("intent"), d["organism"])


def _build(spec: CaseSpec, info: dict, out: Path) -> None:
    base = Path(info["base"])
    dirs = Directions.load(info["directions"])
    L, mid = info["num_layers"], info["mid_index"]
    present = {t: set(ls) for t, ls in info["present"].items()}
    meas = mid if spec.measurement is None else spec.measurement
    layers = list(range(L)) if spec.layers is None else list(spec.layers)
    config = directions = None
    intent = None
    if spec.kind == "ablate":
        cfg = AblationConfig.from_dict({"components": list(spec.components),
                                        "ablate": [{"layer": l, "measurement": meas, "scale": spec.scale} for l in layers]},
                                       source=f"case {spec.name}")
        ablate(base, cfg, out / "model", directions=dirs, progress=False)
        applied = _applied(spec.components, layers, meas, spec.scale, present)
    elif spec.kind == "notebook-experts":
        experts = {int(k): [v] for k, v in info["top1_refusal_expert"].items()}
        _notebook_experts(base, out / "model", dirs.refusal_dir[meas], experts)
        applied = _applied(DEFAULT, layers, meas, 1.0, present)
        applied["experts"] = {str(k): v for k, v in experts.items()}
    elif spec.kind == "prefix-tool":
        hit = _prefix_tool(base, out / "model", dirs.refusal_dir[meas], spec.tool_layers, L)
        config, directions = "config.yaml", "measurement.pt"
        _write_llm_abliteration(out, base, dirs, spec.tool_layers, meas)
        applied = _applied(DEFAULT, sorted(hit), meas, 1.0, present)
        intent = _applied(DEFAULT, list(spec.tool_layers), meas, 1.0, present)
    elif spec.kind == "dense-names-tool":
        _dense_names_tool(base, out / "model", dirs.refusal_dir[meas], layers)
        config, directions = "config.yaml", "measurement.pt"
        _write_llm_abliteration(out, base, dirs, layers, meas)
        applied = _applied(("attn_out",), layers, meas, 1.0, present)
        intent = _applied(DEFAULT, layers, meas, 1.0, present)
    else:
        raise AuditError(f"case {spec.name}: unknown kind {spec.kind!r}")
    meta = read_meta(base)
    doc = {"name": spec.name, "description": spec.description, "kind": spec.kind, "base": str(base), "config": config,
           "directions": directions, "applied": applied, "intent": intent, "spec": asdict(spec),
           "organism": {"family": meta["family"], "variant": meta["variant"], "seed": meta["seed"], "recipe_version": meta["recipe_version"],
                        "cache_name": base.name, "mid_index": mid, "cos_to_r_star_at_mid": info["cos_to_r_star"][mid] if info["cos_to_r_star"] else None},
           "cases_version": CASES_VERSION}
    (out / "case.json").write_text(json.dumps(doc, indent=1) + "\n")


def _applied(components, layers, measurement, scale, present) -> dict:
    """What reached the weights, by writer group (the groups the model has, each with the layers edited), and the
    components the tool or config names (so that a fix extending its layers extends them all, e.g. dense MLPs
    a band of MoE layers never reached)."""
    by_group = {c: sorted(set(layers) & present[c]) for c in components if c in present}
    return {"groups": {c: ls for c, ls in by_group.items() if ls}, "components": [c for c in components if c in present],
            "measurement": measurement, "scale": scale, "experts": None}


# -- other tools, imitated (plain code, no manifest) ---------------------------------------------------------------------


def _copy_hf_files(base: Path, out: Path) -> None:
    out.mkdir(parents=True)
    for n in HF_FILES:
        if (base / n).is_file():
            shutil.copy2(base / n, out / n)
    if (base / "model.safetensors.index.json").is_file():
        shutil.copy2(base / "model.safetensors.index.json", out / "model.safetensors.index.json")


def _rewrite(base: Path, out: Path, edit) -> set[str]:
    """Copy ``base``'s weights to ``out`` shard by shard, passing each tensor through ``edit(key, tensor) -> tensor | None``
    (None: unchanged). A notebook's way: load a shard, edit in float32, cast back, save_file. Returns the keys edited."""
    from safetensors.torch import load_file, save_file

    _copy_hf_files(base, out)
    done = set()
    for shard in sorted(base.glob("*.safetensors")):
        tensors = load_file(shard)
        for k, t in tensors.items():
            new = edit(k, t)
            if new is not None:
                tensors[k] = new.to(t.dtype).contiguous()
                done.add(k)
        save_file(tensors, out / shard.name, metadata={"format": "pt"})
    return done


def _orth_out(w: torch.Tensor, r: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """W - s r r^T W for a writer stored [hidden, in] (nn.Linear of a down / o projection), in float32."""
    wf = w.float()
    ru = (r.float() / r.float().norm())
    return wf - scale * torch.outer(ru, ru @ wf)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _notebook_experts(base: Path, out: Path, r: torch.Tensor, experts: dict[int, list[int]], writers: bool = True) -> None:
    """Every writer of every layer (``writers``; else none), but of the routed experts only ``experts[layer]``: per-expert keys
    whole, fused [E, ...] tensors (the down projection and its bias) slice by slice along their residual axis."""
    exp = re.compile(r"\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(?:down_proj|w2)\.weight$")
    fused = re.compile(r"\.mlp\.experts\.down_proj(?:_bias)?$")
    writer = re.compile(r"\.(?:self_attn\.o_proj|mlp\.down_proj|mlp\.shared_experts\.down_proj)\.weight$")
    layout = ModelDir(base).layout

    def edit(key, t):
        m = _LAYER.match(key)
        if not m:
            return None
        layer = int(m.group(1))
        e = exp.search(key)
        if e:
            return _orth_out(t, r) if int(e.group(1)) in experts.get(layer, []) else None
        if fused.search(key):
            ids = experts.get(layer, [])
            if not ids:
                return None
            axis = layout.roles[key].resid_axis  # of the whole [E, ...] tensor; the slice drops the expert axis 0
            new = t.float().clone()
            for x in ids:
                new[x] = project_out(new[x], r.float(), axis - 1)
            return new
        return _orth_out(t, r) if writers and writer.search(key) else None

    _rewrite(base, out, edit)


def _prefix_tool(base: Path, out: Path, r: torch.Tensor, layers, n_layers: int) -> set[int]:
    """An llm-abliteration-like pass: for each listed layer n, every key starting with ``model.layers.{n}`` (no dot)
    that is an o_proj or a down_proj weight is orthogonalized; returns the layers really edited."""
    hit: set[int] = set()

    def edit(key, t):
        if not (key.endswith("self_attn.o_proj.weight") or key.endswith("down_proj.weight")):
            return None
        if not any(key.startswith(f"model.layers.{n}") for n in layers):
            return None
        hit.add(int(_LAYER.match(key).group(1)))
        return _orth_out(t, r)

    _rewrite(base, out, edit)
    return hit


def _dense_names_tool(base: Path, out: Path, r: torch.Tensor, layers) -> None:
    """A dense-model tool: it edits ``self_attn.o_proj`` and ``mlp.down_proj`` of each listed layer, by exact name."""
    names = [(f"model.layers.{n}.self_attn.o_proj.weight", f"model.layers.{n}.mlp.down_proj.weight") for n in layers]
    wanted = {k for pair in names for k in pair}
    _rewrite(base, out, lambda key, t: _orth_out(t, r) if key in wanted else None)


def _write_llm_abliteration(out: Path, base: Path, dirs, layers, measurement: int) -> None:
    """The tool's YAML config (llm-abliteration's keys only) and its measurement file (a torch.save'd dict)."""
    import yaml

    n = dirs.n
    d = {"layers": n}
    for i in range(n):
        d[f"harmful_{i}"] = dirs.harmful_mean[i].clone()
        d[f"harmless_{i}"] = dirs.harmless_mean[i].clone()
        d[f"refuse_{i}"] = dirs.refusal_dir[i].clone()
    torch.save(d, out / "measurement.pt")
    cfg = {"model": str(base), "measurements": "measurement.pt", "output": str(out / "model"), "scale": 1.0,
           "ablate": [{"layer": int(l), "measurement": int(measurement), "scale": 1.0, "sparsity": 0.0} for l in layers]}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def case_names(organism: str | None = None) -> list[str]:
    """The cases of ``organism`` (a key of ORGANISMS, or LEARNED); None: the planted families' cases."""
    if organism is None:
        return list(SPECS)
    return [n for n, s in ALL_SPECS.items() if s.organism == organism]


# -- auditing a case ---------------------------------------------------------------------------------------------------

AUDIT_LIMIT = 24  # prompts per set: the matrix test's budget (about 4-8 s per case on one CPU thread)
AUDIT_MAX_NEW_TOKENS = 20  # the organisms' refusal and answers are 10-15 tokens
LEARNED_MAX_NEW_TOKENS = 32  # the learned organism's refusals take up to 25 tokens; its answers are open-ended


def foreign_dir(case: Case) -> Path:
    """The case's model as another tool would leave it: the same files (symlinks) without our manifest and directions file.
    Built once beside the case (``foreign/``); for a case made without a manifest it is the model itself."""
    if not (case.ablated_dir / MANIFEST_NAME).exists():
        return case.ablated_dir
    dest = case.ablated_dir.parent / "foreign"
    if not dest.is_dir():
        with _locked(case.ablated_dir.parent, "foreign"):
            if not dest.is_dir():
                with OutputDir(dest, force=True, kind="organism cache") as od:
                    for f in sorted(case.ablated_dir.iterdir()):
                        if f.name not in (MANIFEST_NAME, DIRECTIONS_NAME) and not f.name.startswith("."):
                            (od.tmp / f.name).symlink_to(f.resolve())
                    od.commit()
    return dest


def audit_case(name: str, foreign: bool = False, **overrides) -> tuple[dict, float]:
    """`audit run` on case ``name`` as a user would call it (base, and the foreign tool's YAML and measurement file
    where it left them), with the matrix's small budgets; returns (results, seconds). Nothing is written.

    ``foreign``: as an ablation another tool made and left without any statement of intent: no manifest, no YAML, no
    measurement file, only ``--base`` (issue 25: every case is audited both ways)."""
    import time

    case = build_case(name)
    mnt = LEARNED_MAX_NEW_TOKENS if ALL_SPECS[name].organism == LEARNED else AUDIT_MAX_NEW_TOKENS
    if foreign:
        opts = dict(model_dir=str(foreign_dir(case)), base=str(case.base_dir), limit=AUDIT_LIMIT, max_new_tokens=mnt, quiet=True)
    else:
        opts = dict(model_dir=str(case.ablated_dir), base=str(case.base_dir), config=str(case.config_path) if case.config_path else None,
                    directions=str(case.directions_path) if case.directions_path else None, limit=AUDIT_LIMIT, max_new_tokens=mnt, quiet=True)
    opts.update(capability="none", multi_turn=0, controls=False)  # the matrix judges the diagnosis; damage beyond KL is tested apart
    t0 = time.perf_counter()
    res = run_audit(RunOptions(**{**opts, **overrides}), write=False)
    return res, time.perf_counter() - t0
