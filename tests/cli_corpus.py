"""A corpus of command lines a careless user (or a broken file) gives the CLI, with the exit code each must get.

Shared by tests/test_cli_corpus.py (every case in-process: no traceback may escape ``audit.cli.main``) and
scripts/cli_corpus.py (every case as a real subprocess, with the table the issue asks for). ``build(root)``
makes the workspace: tiny models of a few families, an ablated copy, configs, prompt files and every kind of
broken input. ``inputs(root)`` are the files no case may change. Expected codes: 0 fine, 1 gate/check
failed, 2 bad input (a message naming the file and the fix, never a traceback).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    code: int  # expected exit code
    says: str = ""  # a phrase the message must contain (case-insensitive), "" for no check
    slow: bool = False  # runs a model: the in-process test runs these too, the quick mode skips them


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _raw_shard(path: Path, header: dict, data: bytes) -> Path:
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


def build(root: Path) -> dict:
    """The workspace under ``root``: returns named paths."""
    from audit.ablation.ablate import ablate
    from audit.intent.config import AblationConfig
    from audit.forward.measure import measure_directions
    from audit.model.directory import ModelDir
    from audit.organisms.tiny import build_tiny, tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    p = {}
    p["base"] = build_tiny("qwen3_moe", root / "models" / "base", tok, shard_bytes=40_000)
    p["glm"] = build_tiny("glm4_moe", root / "models" / "glm", tok, dtype=torch.bfloat16)
    harmful = root / "prompts" / "harmful.txt"
    harmless = root / "prompts" / "harmless.txt"
    harmful.parent.mkdir(parents=True)
    harmful.write_text("the cat writes a short poem today.\nthe river explains the budget again?\na chef builds the bridge.\n")
    harmless.write_text("the teacher plans a song.\nour team paints the garden map.\na student cooks the recipe.\n")
    p["harmful"], p["harmless"] = harmful, harmless
    huge = root / "prompts" / "huge.txt"
    huge.write_text("the cat " * 125_000 + "\n")  # one 1,000,000-character prompt
    p["huge"] = huge
    dirs = measure_directions(ModelDir(p["base"]), harmful.read_text().splitlines(), harmless.read_text().splitlines())
    p["dirs"] = dirs.save(root / "dirs.safetensors")
    cfg = root / "cfg.yaml"
    cfg.write_text(f"measurements: {p['dirs']}\nablate:\n  - {{layer: '0-2', measurement: 1}}\n")
    p["cfg"] = cfg
    p["abl"] = root / "models" / "abl"
    ablate(p["base"], AblationConfig.from_dict({"measurements": str(p["dirs"]), "ablate": [{"layer": "0-2", "measurement": 1}]},
                                             source=str(cfg)), p["abl"], directions=dirs, progress=False)
    p["abl_foreign"] = _copy(p["abl"], root / "models" / "abl_foreign")  # as another tool writes it: no manifest, no directions
    for f in ("ablation-manifest.json", "directions.safetensors", ".moe-ablation-audit"):
        (p["abl_foreign"] / f).unlink()
    # -- broken model directories
    bad = root / "bad"
    bad.mkdir()
    p["file_not_dir"] = bad / "weights.txt"
    p["file_not_dir"].write_text("x")
    p["no_config"] = _copy(p["glm"], bad / "no_config")
    (p["no_config"] / "config.json").unlink()
    p["bad_json"] = _copy(p["glm"], bad / "bad_json")
    (p["bad_json"] / "config.json").write_text("{not json")
    p["no_type"] = _copy(p["glm"], bad / "no_type")
    (p["no_type"] / "config.json").write_text(json.dumps({"hidden_size": 32}))
    p["unknown_arch"] = _copy(p["glm"], bad / "unknown_arch")
    c = json.loads((p["glm"] / "config.json").read_text())
    (p["unknown_arch"] / "config.json").write_text(json.dumps({**c, "model_type": "made_up_moe"}))
    p["no_weights"] = _copy(p["glm"], bad / "no_weights")
    (p["no_weights"] / "model.safetensors").unlink()
    p["only_pickle"] = _copy(p["no_weights"], bad / "only_pickle")
    torch.save({"w": torch.zeros(2)}, p["only_pickle"] / "pytorch_model.bin")
    p["pickle_named_st"] = _copy(p["no_weights"], bad / "pickle_named_st")
    torch.save({"w": torch.zeros(2)}, p["pickle_named_st"] / "model.safetensors")
    p["truncated"] = _copy(p["glm"], bad / "truncated")
    f = p["truncated"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    headers = {
        "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12),
        "reversed": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8),
        "negative": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, 8),
        "gap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, 16),
        "shape_vs_bytes": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8),
        "unknown_dtype": ({"a": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}}, 8),
        "trailing": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 20),
    }
    for name, (h, n) in headers.items():
        d = _copy(p["no_weights"], bad / f"hdr_{name}")
        _raw_shard(d / "model.safetensors", h, bytes(n))
        p[f"hdr_{name}"] = d
    d = _copy(p["glm"], bad / "hdr_huge_len")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[0:8] = struct.pack("<Q", 10**12)
    f.write_bytes(bytes(data))
    p["hdr_huge_len"] = d
    d = _copy(p["glm"], bad / "hdr_garbage")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:24] = b"{garbage garbage"
    f.write_bytes(bytes(data))
    p["hdr_garbage"] = d
    p["index_missing"] = _copy(p["base"], bad / "index_missing")
    sorted(p["index_missing"].glob("*.safetensors"))[0].unlink()
    p["index_escape"] = _copy(p["base"], bad / "index_escape")
    idx = json.loads((p["index_escape"] / "model.safetensors.index.json").read_text())
    idx["weight_map"][next(iter(idx["weight_map"]))] = "../../evil.safetensors"
    (p["index_escape"] / "model.safetensors.index.json").write_text(json.dumps(idx))
    p["index_bad_json"] = _copy(p["base"], bad / "index_bad_json")
    (p["index_bad_json"] / "model.safetensors.index.json").write_text("{")
    p["no_tokenizer"] = _copy(p["base"], bad / "no_tokenizer")
    for t in p["no_tokenizer"].glob("tokenizer*"):
        t.unlink()
    # a Hugging Face cache snapshot: files are symlinks into ../../blobs
    repo = root / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(p["base"].iterdir())):
        if f.is_file():
            shutil.copy(f, blobs / f"{i:04d}blob")
            (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"{i:04d}blob")
    p["hf_snapshot"] = snap
    # -- configs, gates, directions, prompts
    cfgs = root / "cfgs"
    cfgs.mkdir()
    texts = {
        "bad_yaml": "ablate: [{layer: 1", "not_mapping": "- 1\n- 2\n", "unknown_key": "ablate: [{layer: 1}]\nwibble: 3\n",
        "empty_ablate": "ablate: []\n", "negative_scale": "ablate: [{layer: 1, scale: -1}]\n", "negative_global": "scale: -0.5\nablate: [{layer: 1}]\n",
        "text_scale": "ablate: [{layer: 1, scale: high}]\n", "layer_out_of_range": f"measurements: {p['dirs']}\nablate: [{{layer: 40}}]\n",
        "bad_range": "ablate: [{layer: '5-2'}]\n", "sparsity": "ablate: [{layer: 1, sparsity: 2}]\n",
        "unknown_component": "components: [experts]\nablate: [{layer: 1}]\n",
        "measurement_out_of_range": f"measurements: {p['dirs']}\nablate: [{{layer: 1, measurement: 99}}]\n",
        "no_directions": "measurements: nowhere.safetensors\nablate: [{layer: 1}]\n",
        "gate_unknown": "max_refusal: 0.1\n", "gate_text": "max_kl: high\n", "gate_waive": "waive: [everything]\n",
        "gate_must": "must_ablate: [experts]\n", "gate_list": "- 1\n",
    }
    for k, v in texts.items():
        (cfgs / f"{k}.yaml").write_text(v)
        p[f"cfg_{k}"] = cfgs / f"{k}.yaml"
    p["dirs_pickle"] = root / "dirs_pickle.safetensors"
    torch.save({"w": torch.zeros(3)}, p["dirs_pickle"])
    p["dirs_garbage"] = root / "dirs_garbage.safetensors"
    p["dirs_garbage"].write_bytes(b"\x00" * 64)
    from audit.intent.directions import Directions

    g = torch.Generator().manual_seed(0)
    wrong = Directions(*(torch.randn(dirs.n, dirs.hidden_size + 8, generator=g) for _ in range(3)))
    p["dirs_wrong_size"] = wrong.save(root / "dirs_wrong_size.safetensors")
    pr = root / "prompts"
    (pr / "empty.txt").write_text("\n\n")
    (pr / "bad.jsonl").write_text('{"prompt": "a"}\n{broken\n')
    (pr / "nocol.csv").write_text("question\nwhat?\n")
    p["p_empty"], p["p_bad_jsonl"], p["p_nocol"] = pr / "empty.txt", pr / "bad.jsonl", pr / "nocol.csv"
    comp = root / "completions"
    comp.mkdir()
    (comp / "ok.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "I'm sorry, but I can't help with that."}) + "\n" for i in range(3000)))
    (comp / "bad.jsonl").write_text('{"completion": "x"}\nnot json\n')
    (comp / "nocol.jsonl").write_text('{"text": "x"}\n')
    (comp / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    p["c_ok"], p["c_bad"], p["c_nocol"], p["c_binary"] = comp / "ok.jsonl", comp / "bad.jsonl", comp / "nocol.jsonl", comp / "binary.jsonl"
    p["results_bad"] = root / "results_bad.json"
    p["results_bad"].write_text("{oops")
    p["results_new"] = root / "results_new.json"
    p["results_new"].write_text(json.dumps({"schema_version": "9.0", "checks": {}}))
    # -- destinations
    dest = root / "dest"
    dest.mkdir()
    p["user_folder"] = dest / "user"
    p["user_folder"].mkdir()
    (p["user_folder"] / "thesis.tex").write_text("years of work")
    p["user_file"] = dest / "notes.txt"
    p["user_file"].write_text("mine")
    p["out"] = root / "out"  # fresh outputs go below here
    return {k: Path(v) for k, v in p.items()}


def inputs(root: Path) -> dict[str, str]:
    """sha256 of every file no case may touch (everything but root/out)."""
    out = {}
    for f in sorted(root.rglob("*")):
        if f.is_file() and not f.is_symlink() and (root / "out") not in f.parents:
            out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def cases(p: dict) -> list[Case]:
    """Every case, over the workspace ``p`` (from ``build``)."""
    o = p["out"]
    C: list[Case] = []

    def add(name, code, *argv, says="", slow=False):
        C.append(Case(name, tuple(str(a) for a in argv), code, says, slow))

    broken = ["file_not_dir", "no_config", "bad_json", "no_type", "unknown_arch", "no_weights", "only_pickle", "pickle_named_st", "truncated",
              "hdr_overlap", "hdr_reversed", "hdr_negative", "hdr_gap", "hdr_shape_vs_bytes", "hdr_unknown_dtype", "hdr_trailing", "hdr_huge_len",
              "hdr_garbage", "index_missing", "index_escape", "index_bad_json"]
    says = {"file_not_dir": "not a directory", "no_config": "config.json", "bad_json": "not valid json", "no_type": "model_type",
            "unknown_arch": "unknown architecture", "no_weights": "no *.safetensors", "only_pickle": "pickle", "pickle_named_st": "corrupt",
            "truncated": "truncated", "hdr_overlap": "overlaps", "hdr_reversed": "data_offsets", "hdr_negative": "data_offsets", "hdr_gap": "gap",
            "hdr_shape_vs_bytes": "needs", "hdr_unknown_dtype": "unknown dtype", "hdr_trailing": "after the last tensor", "hdr_huge_len": "corrupt",
            "hdr_garbage": "header", "index_missing": "missing", "index_escape": "outside the model directory", "index_bad_json": "not a valid index"}
    for b in broken:
        add(f"inspect {b}", 2, "inspect", p[b], says=says[b])
        add(f"static {b} as ablated", 2, "static", p[b], "--base", p["base"], "-o", o / f"s-{b}", says=says[b])
        add(f"static {b} as base", 2, "static", p["abl"], "--base", p[b], "-o", o / f"sb-{b}", says=says[b])
        add(f"ablate {b}", 2, "ablate", p[b], "--config", p["cfg"], "-o", o / f"a-{b}", says=says[b])
        add(f"run {b}", 2, "run", p[b], "--base", p["base"], "-o", o / f"r-{b}", "--no-simulate", says=says[b])
    add("inspect missing", 2, "inspect", o.parent / "missing-model", says="no such directory")
    add("inspect hf snapshot", 0, "inspect", p["hf_snapshot"])
    add("static hf snapshot base", 0, "static", p["abl"], "--base", p["hf_snapshot"], "-o", o / "s-hf", "--directions", p["dirs"], slow=True)
    add("run base without tokenizer", 2, "run", p["abl"], "--base", p["no_tokenizer"], "-o", o / "r-notok", "--no-simulate", "--limit", "2",
        says="tokenizer")
    # configs
    cfg_says = {"bad_yaml": "not valid yaml", "not_mapping": "mapping", "unknown_key": "unknown key", "empty_ablate": "non-empty",
                "negative_scale": "negative", "negative_global": "negative", "text_scale": "not of type 'number'", "layer_out_of_range": "out of range",
                "bad_range": "empty or negative", "sparsity": "sparsity", "unknown_component": "components[0]: unknown \"experts\"",
                "measurement_out_of_range": "not in the directions file", "no_directions": "no such"}
    for k, s in cfg_says.items():
        own = k in ("no_directions", "layer_out_of_range", "measurement_out_of_range")  # the config names its measurements
        add(f"ablate config {k}", 2, "ablate", p["base"], "--config", p[f"cfg_{k}"], "-o", o / f"ac-{k}", *(() if own else ("--directions", p["dirs"])),
            says=s)
        add(f"static config {k}", 2, "static", p["abl_foreign"], "--base", p["base"], "--config", p[f"cfg_{k}"], "-o", o / f"sc-{k}", says=s)
    add("ablate config missing", 2, "ablate", p["base"], "--config", o / "nope.yaml", "-o", o / "ac-missing", says="no such config")
    for k, s in (("dirs_pickle", "measurement"), ("dirs_garbage", "directions"), ("dirs_wrong_size", "size")):
        add(f"ablate {k}", 2, "ablate", p["base"], "--config", p["cfg"], "--directions", p[k], "-o", o / f"ad-{k}", says=s)
        add(f"static {k}", 2, "static", p["abl"], "--base", p["base"], "--directions", p[k], "-o", o / f"sd-{k}", says=s)
    add("ablate directions missing", 2, "ablate", p["base"], "--config", p["cfg"], "--directions", o / "none.safetensors", "-o", o / "ad-none", says="no such")
    for k, s in (("gate_unknown", "unknown key(s) 'max_refusal'"), ("gate_text", "max_kl: \"high\" is not allowed"), ("gate_waive", "waive"), ("gate_must", "must_ablate"),
                 ("gate_list", "mapping")):
        add(f"run {k}", 2, "run", p["abl"], "--gate", p[f"cfg_{k}"], "-o", o / f"rg-{k}", "--no-simulate", "--limit", "2", says=s)
    add("run gate missing", 2, "run", p["abl"], "--gate", o / "nogate.yaml", "-o", o / "rg-missing", "--no-simulate", says="no such gate")
    # prompts
    for k, s in (("p_empty", "empty"), ("p_bad_jsonl", "not valid json"), ("p_nocol", "no prompt column")):
        add(f"measure harmful {k}", 2, "measure", p["base"], "--harmful", p[k], "-o", o / f"m-{k}.safetensors", says=s)
        add(f"run harmful {k}", 2, "run", p["abl"], "--harmful", p[k], "-o", o / f"rp-{k}", "--no-simulate", says=s)
    add("measure prompts folder", 2, "measure", p["base"], "--harmful", p["harmful"].parent, "-o", o / "m-dir.safetensors", says="is a folder, not a harmful prompt file")
    add("measure prompts missing", 2, "measure", p["base"], "--harmful", o / "nothing.txt", "-o", o / "m-none.safetensors", says="no such")
    add("measure one 1M-char prompt", 0, "measure", p["base"], "--harmful", p["huge"], "--harmless", p["harmless"], "-o", o / "m-huge.safetensors", slow=True)
    # numbers
    for flag in ("--max-new-tokens", "--batch-size", "--limit"):
        for v in ("0", "-5", "many"):
            add(f"run {flag} {v}", 2, "run", p["abl"], flag, v, "-o", o / "r-num")
    add("measure --limit -5", 2, "measure", p["base"], "--limit", "-5", "-o", o / "m-lim.safetensors")
    add("measure --batch-size 0", 2, "measure", p["base"], "--batch-size", "0", "-o", o / "m-bs.safetensors")
    add("run --max-new-tokens beyond context", 2, "run", p["abl"], "--max-new-tokens", "100000", "-o", o / "r-ctx", "--no-simulate", says="context")
    # devices, memory, servers (issue 18): refused before any model loads
    for v in ("0", "-1", "soon"):
        add(f"run --server-timeout {v}", 2, "run", p["abl"], "--server-timeout", v, "-o", o / "r-num")
    add("run --dtype float8", 2, "run", p["abl"], "--dtype", "float8", "-o", o / "r-dt")
    for spec, s in (("cpu=lots", "not a size"), ("gpu0=1GB", "unknown device"), ("cpu", "device=size"), ("cpu=1GB,cpu=2GB", "twice")):
        add(f"run --max-memory {spec}", 2, "run", p["abl"], "--device", "auto", "--max-memory", spec, "-o", o / "r-mm", says=s)
    add("run --max-memory without --device auto", 2, "run", p["abl"], "--max-memory", "cpu=1GB", "-o", o / "r-mm", "--no-simulate",
        says="--device auto")
    add("run --offload-folder inside an input", 2, "run", p["abl"], "--device", "auto", "--offload-folder", p["abl"] / "off", "-o", o / "r-off",
        "--no-simulate", says="never go into an input")
    add("run --server not a url", 2, "run", p["abl"], "--server", "localhost:8000", "-o", o / "r-srv", "--no-simulate", says="not an http")
    add("run --base-server down", 2, "run", p["abl"], "--base-server", "http://127.0.0.1:9", "-o", o / "r-srv", "--no-simulate",
        says="cannot reach the server at http://127.0.0.1:9/v1 (--base-server)")
    add("run --served-base-model without --base-server", 2, "run", p["abl"], "--served-base-model", "b", "-o", o / "r-srv", "--no-simulate",
        says="no --base-server")
    # destinations: never into, onto or around an input; --force only over our own outputs
    models = p["base"].parent
    for cmd in (("static", p["abl"], "--base", p["base"]), ("ablate", p["base"], "--config", p["cfg"]), ("run", p["abl"], "--no-simulate")):
        name = cmd[0]
        for label, dest in (("= input", p["abl"] if name != "ablate" else p["base"]), ("inside input", (p["abl"] if name != "ablate" else p["base"]) / "x"),
                            ("holds inputs", models), ("holds inputs (root)", models.parent)):
            for force in ((), ("--force",)):
                add(f"{name} -o {label} {' '.join(force)}".strip(), 2, *cmd, "-o", dest, *force, says="the input")
        add(f"{name} -o user folder", 2, *cmd, "-o", p["user_folder"], says="not empty")
        add(f"{name} -o user folder --force", 2, *cmd, "-o", p["user_folder"], "--force", says="not written by this tool")
        add(f"{name} -o under a file", 2, *cmd, "-o", p["user_file"] / "out", says="is a file")
        add(f"{name} -o a file", 2, *cmd, "-o", p["user_file"], "--force", says="not a folder")
    add("measure -o folder --force", 2, "measure", p["base"], "-o", p["user_folder"], "--force", says="is a folder")
    add("measure -o user file --force", 2, "measure", p["base"], "-o", p["user_file"], "--force", says="not written by this tool")
    add("measure -o user file", 2, "measure", p["base"], "-o", p["user_file"], says="exists")
    add("measure -o inside input", 2, "measure", p["base"], "-o", p["base"] / "d.safetensors", says="the input")
    add("measure -o the prompts", 2, "measure", p["base"], "--harmful", p["harmful"], "-o", p["harmful"], "--force", says="the input")
    add("report missing", 2, "report", o / "none" / "results.json", says="no such results")
    add("report bad json", 2, "report", p["results_bad"], says="not valid json")
    add("report newer schema", 2, "report", p["results_new"], says="newer")
    add("classify -o = input", 2, "classify", p["c_ok"], "-o", p["c_ok"], says="the input")
    add("classify -o user file", 2, "classify", p["c_ok"], "-o", p["user_file"], says="exists")
    add("classify -o user file --force", 2, "classify", p["c_ok"], "-o", p["user_file"], "--force", says="not written by this tool")
    add("classify missing", 2, "classify", o / "none.jsonl", says="no such completions file")
    add("classify bad jsonl", 2, "classify", p["c_bad"], says="not a json object")
    add("classify no column", 2, "classify", p["c_nocol"], says="no usable column")
    add("classify binary", 2, "classify", p["c_binary"], says="not utf-8")
    # things that work
    add("static ok", 0, "static", p["abl"], "-o", o / "ok-static", slow=True)
    add("static foreign with its config", 0, "static", p["abl_foreign"], "--base", p["base"], "--config", p["cfg"], "-o", o / "ok-foreign", slow=True)
    add("static foreign, intent inferred", 0, "static", p["abl_foreign"], "--base", p["base"], "--directions", p["dirs"], "-o", o / "ok-inferred",
        slow=True)
    add("static ok again without --force", 2, "static", p["abl"], "-o", o / "ok-static", says="--force", slow=True)
    add("static ok again --force", 0, "static", p["abl"], "-o", o / "ok-static", "--force", slow=True)
    add("report ok", 0, "report", o / "ok-static", slow=True)
    add("report -o file", 2, "report", o / "ok-static", "-o", p["user_file"], says="is a file", slow=True)
    add("classify ok", 0, "classify", p["c_ok"], "-o", o / "judged.jsonl")
    add("classify ok again --force", 0, "classify", p["c_ok"], "-o", o / "judged.jsonl", "--force")
    add("measure ok", 0, "measure", p["base"], "--harmful", p["harmful"], "--harmless", p["harmless"], "-o", o / "m.safetensors", slow=True)
    add("measure ok again --force", 0, "measure", p["base"], "--harmful", p["harmful"], "--harmless", p["harmless"], "-o", o / "m.safetensors",
        "--force", slow=True)
    add("ablate ok", 0, "ablate", p["base"], "--config", p["cfg"], "-o", o / "abl2", "--quiet", slow=True)
    add("run tiny", 1, "run", p["abl"], "-o", o / "run-tiny", "--no-simulate", "--limit", "2", "--max-new-tokens", "4", slow=True)
    add("run tiny offloaded to disk", 1, "run", p["abl"], "-o", o / "run-tiny-off", "--no-simulate", "--limit", "2", "--max-new-tokens", "4",
        "--device", "auto", "--max-memory", "cpu=20KB", slow=True)
    return C
