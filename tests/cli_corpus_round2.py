"""Issue 26's careless and hostile inputs (round two), as real `audit` subprocesses against a scratch folder.

The scratch folder holds ``base/`` (a tiny base model), ``ours/`` (an `audit ablate` output of it), ``abl/`` (the same
ablation as another tool leaves it: no manifest, no marker), ``st/`` (an `audit static` output of ours), and every broken
or hostile input the issue lists. Each case names the point of the issue it reproduces, the exit code it must get (2 with
a message naming the file or flag; 0 or 1 where the input is valid) and, where the point says so, how fast a refusal must
come. Around every case the scratch tree is hashed: nothing outside the outputs a valid case may create is written,
changed or deleted (a refused case may create nothing at all). Fake OpenAI-compatible servers (tests/fake_openai.py) run
in the calling process for the server and judge cases.

tests/test_cli_corpus.py runs each point as a test; scripts/cli_corpus.py --round 2 prints the table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fake_openai import Behaviour, fake_server

DEEP = 100_000  # levels of nesting in the deep-JSON cases (Python's json gives up near 1,000: RecursionError)


@dataclass(frozen=True)
class Case:
    point: int  # the issue's numbered point
    name: str
    argv: tuple[str, ...]
    code: int  # the exit code it must get
    says: str = ""  # a phrase the message must hold (case-insensitive)
    seconds: float | None = None  # the whole process (start to exit) within this many seconds
    fsize: int | None = None  # RLIMIT_FSIZE: a write past this many bytes fails (EFBIG), as on a full disk
    check: Callable[[], str | None] | None = field(default=None, compare=False)  # a further condition: None, or why it failed


@dataclass
class Outcome:
    case: Case
    code: int
    text: str
    seconds: float
    changed: list[str]  # paths outside the case's outputs that were written, changed or deleted
    problems: list[str]

    @property
    def held(self) -> bool:
        return not self.problems


# -- the scratch folder -----------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    return d


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def build(root: Path) -> dict[str, Path]:
    """The scratch folder under ``root``: returns named paths."""
    from audit.ablation.ablate import ablate
    from audit.forward.measure import measure_directions
    from audit.intent.config import AblationConfig
    from audit.intent.directions import Directions
    from audit.model.directory import ModelDir
    from audit.organisms.tiny import build_tiny, tiny_tokenizer
    from audit.pipeline.write import write_static
    from audit.weights.static_audit import results_document, static_audit

    root.mkdir(parents=True)
    p: dict[str, Path] = {}
    p["base"] = build_tiny("qwen3_moe", root / "base", tiny_tokenizer(), shard_bytes=40_000)
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "harmful.txt").write_text("the cat writes a short poem today.\nthe river explains the budget again?\na chef builds the bridge.\n")
    (prompts / "harmless.txt").write_text("the teacher plans a song.\nour team paints the garden map.\na student cooks the recipe.\n")
    p["harmful"], p["harmless"] = prompts / "harmful.txt", prompts / "harmless.txt"
    dirs = measure_directions(ModelDir(p["base"]), p["harmful"].read_text().splitlines(), p["harmless"].read_text().splitlines())
    p["dirs"] = dirs.save(root / "dirs.safetensors")
    p["cfg"] = root / "cfg.yaml"
    p["cfg"].write_text(f"measurements: {p['dirs']}\nablate:\n  - {{layer: '0-2', measurement: 1}}\n")
    ablate(p["base"], AblationConfig.from_dict({"measurements": str(p["dirs"]), "ablate": [{"layer": "0-2", "measurement": 1}]},
                                               source=str(p["cfg"])), root / "ours", directions=dirs, progress=False)
    p["ours"] = root / "ours"
    p["abl"] = _copy(p["ours"], root / "abl")  # as another tool leaves it: no manifest, no directions, no marker
    for f in ("ablation-manifest.json", "directions.safetensors", ".moe-ablation-audit"):
        (p["abl"] / f).unlink()
    res = static_audit(p["ours"])
    p["st"] = write_static(results_document(res, p["ours"], p["base"], time.time()), root / "st").parent
    comp = root / "completions"
    comp.mkdir()
    p["comp"] = comp / "ok.jsonl"
    p["comp"].write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"Sure, here is how you do it, step {i}: first you take the"})
                                 + "\n" for i in range(3)))
    p["comp_42"] = comp / "number.jsonl"
    p["comp_42"].write_text('{"completion": "Sure, here it is."}\n{"completion": 42}\n')
    p["comp_deep"] = comp / "deep.jsonl"
    p["comp_deep"].write_text('{"completion": ' + "[" * DEEP + "]" * DEEP + "}\n")
    bad = root / "bad"
    bad.mkdir()
    # -- model directories broken in the ways the issue lists
    p["deep_config"] = _copy(p["base"], bad / "deep_config")
    (p["deep_config"] / "config.json").write_text('{"model_type": "qwen3_moe", "x": ' + "[" * DEEP + "]" * DEEP + "}")
    p["deep_index"] = _copy(p["base"], bad / "deep_index")
    (p["deep_index"] / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * DEEP + "]" * DEEP + "}")
    p["deep_header"] = bad / "deep_header"
    p["deep_header"].mkdir()
    for f in p["base"].iterdir():
        if not f.name.endswith((".safetensors", ".index.json")):
            shutil.copy(f, p["deep_header"] / f.name)
    header = ('{"a": ' + "[" * DEEP + "]" * DEEP + "}").encode()
    (p["deep_header"] / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    p["loop"] = _copy(p["base"], bad / "loop")
    shard = sorted(p["loop"].glob("*.safetensors"))[0]
    shard.unlink()
    shard.symlink_to(shard.name)  # a symlink to itself
    for name, changes in (("layers_1e9", {"num_hidden_layers": 10**9}), ("layers_neg", {"num_hidden_layers": -3}),
                          ("experts_text", {"num_experts": "eight"})):
        p[name] = _edit_config(_copy(p["base"], bad / name), **changes)
    templates = {"tpl_escape": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
                 "tpl_range": "{% for i in range(10000000) %}x{% endfor %}",
                 "tpl_recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
                 "tpl_slow": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"}
    for name, text in templates.items():
        p[name] = _copy(p["base"], bad / name)
        (p[name] / "chat_template.jinja").write_text(text)
    p["abl_other_template"] = _copy(p["ours"], bad / "abl_other_template")
    (p["abl_other_template"] / ".moe-ablation-audit").unlink()  # a user's copy of our ablation, its template edited
    t = (p["abl_other_template"] / "chat_template.jinja").read_text()
    (p["abl_other_template"] / "chat_template.jinja").write_text(t.replace("<|assistant|>", "<|user|>"))
    # -- configs and gates
    laughs = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join(['lol'] * 10)}]\n" for i in range(9))
    texts = {
        "cfg_scale308": f"measurements: {p['dirs']}\nablate: [{{layer: 1, measurement: 1, scale: 1.0e+308}}]\n",
        "cfg_scale1e30": f"measurements: {p['dirs']}\nscale: 1.0e+30\nablate: [{{layer: 1, measurement: 1}}]\n",
        "cfg_dup_scale": f"measurements: {p['dirs']}\nscale: 1.0\nablate: [{{layer: 1, measurement: 1}}]\nscale: 0.5\n",
        "cfg_laughs": laughs + f"measurements: {p['dirs']}\nmodel: *l8\nablate: [{{layer: 1, measurement: 1}}]\n",
        "cfg_range": f"measurements: {p['dirs']}\nablate: [{{layer: '0-99999999999', measurement: 1}}]\n",
        "cfg_deep": "ablate: " + "[" * DEEP + "]" * DEEP + "\n",
        "gate_neg": "max_refusal_after: -0.5\n", "gate_5": "max_refusal_after: 5\n",
        "gate_laughs": laughs + "optional: *l8\n", "gate_deep": "optional: " + "[" * DEEP + "]" * DEEP + "\n",
    }
    for k, v in texts.items():
        p[k] = root / "yaml" / f"{k}.yaml"
        p[k].parent.mkdir(exist_ok=True)
        p[k].write_text(v)
    p["cfg_50mb"] = root / "yaml" / "big.yaml"
    with open(p["cfg_50mb"], "wb") as f:
        f.write(b"ablate:\n" + b"  - {layer: 1}\n" * (50 * 2**20 // 15))
    p["fifo"] = root / "fifo.yaml"
    os.mkfifo(p["fifo"])
    # -- directions files
    zero = Directions(*(torch.ones(dirs.n, dirs.hidden_size) for _ in range(3)))
    zero.refusal_dir = torch.zeros_like(zero.refusal_dir)  # what another tool may write: every direction zero
    p["dirs_zero"] = _save_unchecked(zero, root / "dirs_zero.safetensors")
    nan = Directions(dirs.refusal_dir.clone(), dirs.harmful_mean, dirs.harmless_mean)
    nan.refusal_dir[1, 0] = float("nan")
    p["dirs_nan"] = _save_unchecked(nan, root / "dirs_nan.safetensors")
    # -- destinations
    p["dest"] = root / "dest"
    p["dest"].mkdir()
    pid = _dead_pid()
    (p["dest"] / f".x.jsonl.tmp-{pid}-notes.partial").write_text("a user's notes that happen to match the pattern")
    (p["dest"] / f".x.jsonl.tmp-{pid}-mine").mkdir()
    (p["dest"] / f".x.jsonl.tmp-{pid}-mine" / "thesis.tex").write_text("years of work")
    p["user_folder"] = root / "user"
    p["user_folder"].mkdir()
    (p["user_folder"] / "notes.txt").write_text("mine")
    (root / "cwd").mkdir()  # the processes' working folder: a default output landing here would show
    (root / "out").mkdir()
    p["out"] = root / "out"
    return p


def _save_unchecked(d, path: Path) -> Path:
    """A directions file as another tool could write it (our loader is what must refuse it)."""
    from safetensors.torch import save_file

    save_file({"refusal_dir": d.refusal_dir, "harmful_mean": d.harmful_mean, "harmless_mean": d.harmless_mean}, str(path),
              metadata={"format": "moe-ablation-audit directions v1"})
    return path


@contextlib.contextmanager
def servers():
    """Fake OpenAI-compatible servers giving the issue's hostile answers; yields {name: URL} and the redirect target's
    Behaviour (its requests must stay empty)."""
    chat = lambda content, usage=None: json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content},  # noqa: E731
                                                                 "finish_reason": "stop"}], "usage": usage or {"completion_tokens": 3}}).encode()
    deep = ("[" * DEEP + "]" * DEEP).encode()
    target = Behaviour(models=["m"])
    kinds = {
        "models_list": {"/v1/models": (200, b'[{"id": "m"}]', {})},
        "models_deep": {"/v1/models": (200, deep, {})},
        "content_dict": {"/v1/chat/completions": (200, chat({"text": "Sure."}), {})},
        "chat_deep": {"/v1/chat/completions": (200, deep, {})},
        "usage_lots": {"/v1/chat/completions": (200, chat("Sure, here it is.", {"completion_tokens": "lots"}), {})},
        "tokenize_list": {"/tokenize": (200, b"[]", {})},
        "tokenize_text": {"/tokenize": (200, b'{"tokens": ["x"]}', {})},
        "tokenize_inf": {"/tokenize": (200, b'{"tokens": [1e400]}', {})},
        "tokenize_inf_list": {"/tokenize": (200, b"[1e400]", {})},
    }
    with contextlib.ExitStack() as stack:
        urls = {"target": stack.enter_context(fake_server(target))}
        for name, raw in kinds.items():
            b = Behaviour(models=["m"])
            b.raw = raw
            urls[name] = stack.enter_context(fake_server(b))
        b = Behaviour(models=["m"])
        b.raw = {path: (307, b"", {"Location": urls["target"] + path}) for path in ("/v1/models", "/v1/chat/completions")}
        urls["redirect"] = stack.enter_context(fake_server(b))
        yield urls, target


# -- the cases --------------------------------------------------------------------------------------------------------


def cases(p: dict[str, Path], urls: dict[str, str], target: Behaviour) -> list[Case]:
    o = p["out"]
    C: list[Case] = []

    def add(point, name, code, *argv, says="", seconds=None, fsize=None, check=None):
        C.append(Case(point, name, tuple(str(a) for a in argv), code, says, seconds, fsize, check))

    def absent(*paths):
        return lambda: next((f"{q} exists" for q in paths if q.exists() or q.is_symlink()), None)

    def mode(path, want):
        return lambda: None if path.is_file() and path.stat().st_mode & 0o777 == want else f"{path} mode {oct(path.stat().st_mode & 0o777) if path.exists() else 'missing'}"

    results = p["st"] / "results.json"
    srv = ("--no-simulate", "--limit", "2", "--max-new-tokens", "4", "--served-model", "m")
    # 1. audit report writes only into a new folder or a folder of results of ours
    add(1, "report -o a user's model folder", 2, "report", results, "-o", p["base"], says="did not write")
    add(1, "report -o an ablation of ours", 2, "report", results, "-o", p["ours"], says="ablated model this tool wrote, not a folder of results")
    add(1, "report -o a user's folder", 2, "report", results, "-o", p["user_folder"], says="did not write")
    add(1, "report beside its results (a folder of ours)", 0, "report", results)
    add(1, "report -o a new folder", 0, "report", results, "-o", o / "report")
    # 2. never into an input found through a manifest
    add(2, "static ours -o base/sub (base from the manifest)", 2, "static", p["ours"], "-o", p["base"] / "sub", says="lies inside the input",
        seconds=1.0)
    add(2, "run ours -o base/sub (base from the manifest)", 2, "run", p["ours"], "-o", p["base"] / "sub", says="lies inside the input", seconds=1.0)
    add(2, "static ours -o ours/sub", 2, "static", p["ours"], "-o", p["ours"] / "sub", says="lies inside the input", seconds=1.0)
    # 3. stale-temporary cleanup removes only what carries our marker (dest/ holds a user's look-alikes)
    add(3, "classify -o beside files that match the temporaries' pattern", 0, "classify", p["comp"], "-o", p["dest"] / "x.jsonl")
    add(3, "classify -o again, --force (its own output replaced)", 0, "classify", p["comp"], "-o", p["dest"] / "x.jsonl", "--force")
    # 4. a write that fails (EFBIG, as a full disk) leaves nothing: no -o, no temporary
    add(4, "ablate, a shard past the file-size limit", 2, "ablate", p["base"], "--config", p["cfg"], "-o", o / "efbig-abl", "--quiet",
        says="efbig-abl: could not be written (File too large)", fsize=20_000, check=absent(o / "efbig-abl"))
    add(4, "static, results.json past the limit", 2, "static", p["ours"], "-o", o / "efbig-st", says="efbig-st: could not be written",
        fsize=2_000, check=absent(o / "efbig-st"))
    add(4, "measure, the directions file past the limit", 2, "measure", p["base"], "-o", o / "efbig.safetensors", "--limit", "2",
        says="efbig.safetensors: could not be written", fsize=1_000)
    add(4, "classify, the output past the limit", 2, "classify", p["comp"], "-o", o / "efbig.jsonl", says="efbig.jsonl: could not be written",
        fsize=100)
    # 5-7. the LLM judge's client: no redirects, answers of another shape are exit 2 (6, its deadline: tests/test_judges.py)
    nothing_sent = lambda: None if not target.requests else f"the redirect was followed: {target.requests[:2]}"  # noqa: E731
    add(5, "judge server redirecting /models", 2, "classify", p["comp"], "--judge", f"server:{urls['redirect']}",
        says="redirects are never followed", check=nothing_sent)
    add(5, "judge server redirecting chat completions", 2, "classify", p["comp"], "--judge", f"server:{urls['redirect']}#m",
        says="redirects are never followed", check=nothing_sent)
    add(7, "judge server: a list from /models", 2, "classify", p["comp"], "--judge", f"server:{urls['models_list']}",
        says="answered GET /v1/models with JSON of another shape")
    add(7, "judge server: content a dict", 2, "classify", p["comp"], "--judge", f"server:{urls['content_dict']}",
        says="choices[0].message.content")
    add(7, "judge server: deeply nested JSON", 2, "classify", p["comp"], "--judge", f"server:{urls['chat_deep']}#m", says="nested too deeply")
    add(7, "judge server: deeply nested /models", 2, "classify", p["comp"], "--judge", f"server:{urls['models_deep']}", says="nested too deeply")
    # 8. --server answers of another shape
    for kind, says in (("tokenize_list", "answered POST /tokenize with JSON of another shape"), ("tokenize_text", "tokens[0]"),
                       ("tokenize_inf", "tokens[0]"), ("tokenize_inf_list", "answered POST /tokenize with JSON of another shape"),
                       ("usage_lots", "usage.completion_tokens"), ("content_dict", "choices[0].message.content"),
                       ("models_deep", "nested too deeply")):
        add(8, f"--server: {kind}", 2, "run", p["ours"], "--server", urls[kind], *srv, "-o", o / f"srv-{kind}", says=says)
    # 9. deep nesting: exit 2 naming the file, never RecursionError
    add(9, "config.json nested deeply", 2, "inspect", p["deep_config"], says="config.json: not valid JSON")
    add(9, "the index nested deeply", 2, "inspect", p["deep_index"], says="model.safetensors.index.json: not a valid index")
    add(9, "a shard header nested deeply", 2, "inspect", p["deep_header"], says="model.safetensors: corrupt safetensors header")
    add(9, "an ablation YAML nested deeply", 2, "ablate", p["base"], "--config", p["cfg_deep"], "-o", o / "a-deep", says="cfg_deep.yaml: nested")
    add(9, "a gate YAML nested deeply", 2, "run", p["ours"], "--gate", p["gate_deep"], "-o", o / "r-deep", says="gate_deep.yaml: nested")
    add(9, "a classify JSONL nested deeply", 2, "classify", p["comp_deep"], says="deep.jsonl:1: not a JSON object per line")
    # 10. a shard that is a symlink loop
    add(10, "inspect a symlink-loop shard", 2, "inspect", p["loop"], says="is a symlink loop")
    add(10, "static, the ablated side a symlink loop", 2, "static", p["loop"], "--base", p["base"], "-o", o / "s-loop", says="is a symlink loop")
    add(10, "static, the base a symlink loop", 2, "static", p["ours"], "--base", p["loop"], "-o", o / "s-loop2", says="is a symlink loop")
    # 11. chat templates that try to escape the sandbox or loop
    for name in ("tpl_escape", "tpl_range", "tpl_recursion", "tpl_slow"):
        add(11, f"measure with {name}", 2, "measure", p[name], "-o", o / f"{name}.safetensors", "--limit", "2",
            says=f"{name}/chat_template.jinja: the chat template")
    # 12-14. values
    add(12, "scale 1.0e+308", 2, "ablate", p["base"], "--config", p["cfg_scale308"], "-o", o / "a-308", says="ablate[0].scale: 1e+308 is not allowed")
    add(13, "a billion laughs under model:", 2, "ablate", p["base"], "--config", p["cfg_laughs"], "-o", o / "a-laughs",
        says="anchors and aliases", seconds=30)
    add(13, "a billion laughs in the gate's optional:", 2, "run", p["ours"], "--gate", p["gate_laughs"], "-o", o / "r-laughs",
        says="anchors and aliases", seconds=30)
    add(13, "a 50 MB YAML", 2, "ablate", p["base"], "--config", p["cfg_50mb"], "-o", o / "a-big", says="big.yaml: 52,428,", seconds=30)
    add(13, "layer '0-99999999999'", 2, "ablate", p["base"], "--config", p["cfg_range"], "-o", o / "a-range", says="ablate[0].layer",
        seconds=30)
    add(14, "a global scale 1.0e+30", 2, "ablate", p["base"], "--config", p["cfg_scale1e30"], "-o", o / "a-1e30", says="scale: 1e+30 is not allowed")
    add(14, "scale given twice", 2, "ablate", p["base"], "--config", p["cfg_dup_scale"], "-o", o / "a-dup", says="key 'scale' is given twice")
    add(14, "gate max_refusal_after -0.5", 2, "run", p["ours"], "--gate", p["gate_neg"], "-o", o / "r-neg", says="max_refusal_after: -0.5 is not allowed")
    add(14, "gate max_refusal_after 5", 2, "run", p["ours"], "--gate", p["gate_5"], "-o", o / "r-5", says="max_refusal_after: 5 is not allowed")
    add(14, "static with an all-zero directions file", 2, "static", p["abl"], "--base", p["base"], "--directions", p["dirs_zero"],
        "-o", o / "s-zero", says="dirs_zero.safetensors: every refusal direction is zero")
    add(14, "ablate with an all-zero directions file", 2, "ablate", p["base"], "--config", p["cfg"], "--directions", p["dirs_zero"],
        "-o", o / "a-zero", says="dirs_zero.safetensors: every refusal direction is zero")
    add(14, "classify a completion that is a number", 2, "classify", p["comp_42"], says="row 2: 'completion' is 42, not text")
    # 15. inspect cross-checks config.json against the weights
    add(15, "inspect num_hidden_layers 1e9", 2, "inspect", p["layers_1e9"], says="num_hidden_layers 1000000000, but the weights hold layers 0..2")
    add(15, "inspect num_hidden_layers -3", 2, "inspect", p["layers_neg"], says="num_hidden_layers is -3, not a positive integer")
    add(15, "inspect num_experts 'eight'", 2, "inspect", p["experts_text"], says="num_experts is 'eight'")
    # 16. the rest
    add(16, "--apply-fix equal to -o", 2, "run", p["ours"], "-o", o / "same", "--apply-fix", o / "same", says="--apply-fix", seconds=1.0)
    add(16, "--apply-fix inside -o", 2, "run", p["ours"], "-o", o / "r-in", "--apply-fix", o / "r-in" / "fixed", says="--apply-fix", seconds=1.0)
    add(16, "the same directory as base and ablated", 2, "run", p["abl"], "--base", p["abl"], "-o", o / "r-same", says="same directory",
        seconds=1.0)
    add(16, "ours named as its own base", 2, "run", p["ours"], "--base", p["ours"], "-o", o / "r-same2", says="same directory", seconds=1.0)
    add(16, "a directions file honours the umask", 0, "measure", p["base"], "-o", o / "umask.safetensors", "--limit", "2",
        check=mode(o / "umask.safetensors", 0o644))
    add(16, "an ablation's files honour the umask", 0, "ablate", p["base"], "--config", p["cfg"], "-o", o / "umask-abl", "--quiet",
        check=mode(o / "umask-abl" / "directions.safetensors", 0o644))
    add(16, "a FIFO as --config", 2, "ablate", p["base"], "--config", p["fifo"], "-o", o / "a-fifo", says="fifo.yaml: is a named pipe (FIFO)")
    add(16, "a FIFO as --gate", 2, "run", p["ours"], "--gate", p["fifo"], "-o", o / "r-fifo", says="fifo.yaml: is a named pipe (FIFO)")
    add(16, "a FIFO as --harmful", 2, "measure", p["base"], "--harmful", p["fifo"], "-o", o / "m-fifo.safetensors", says="is a named pipe (FIFO)")
    add(16, "a FIFO to classify", 2, "classify", p["fifo"], says="is a named pipe (FIFO)")
    add(16, "a NaN directions file names the file", 2, "static", p["abl"], "--base", p["base"], "--directions", p["dirs_nan"], "-o", o / "s-nan",
        says="dirs_nan.safetensors: refusal_dir holds NaN")
    add(16, "an ablation whose chat template differs from its base's", 2, "run", p["abl_other_template"], "--base", p["base"], "-o",
        o / "r-tpl", "--no-simulate", "--limit", "2", says="chat template formats prompts differently from its base's")
    return C


# -- running ----------------------------------------------------------------------------------------------------------


class Snapshot:
    """What the scratch tree holds: every path's kind and, for files, a sha256 (re-hashed only when its stat changed)."""

    def __init__(self):
        self._hashes: dict[tuple, str] = {}

    def take(self, root: Path) -> dict[str, tuple]:
        out = {}
        for dirpath, dirs, files in os.walk(root):
            for name in dirs + files:
                f = Path(dirpath) / name
                st = f.lstat()
                rel = str(f.relative_to(root))
                if f.is_symlink():
                    out[rel] = ("link", os.readlink(f))
                elif f.is_dir():
                    out[rel] = ("dir", st.st_mode & 0o7777)
                elif f.is_file():
                    key = (rel, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                    if key not in self._hashes:
                        self._hashes[key] = hashlib.sha256(f.read_bytes()).hexdigest()
                    out[rel] = ("file", self._hashes[key], st.st_mode & 0o7777)
                else:
                    out[rel] = ("special", st.st_mode)
        return out


def outputs(case: Case, root: Path) -> list[str]:
    """What a case may create or change (relative to ``root``): its -o / --apply-fix paths when its input is valid; nothing
    when it must be refused."""
    if case.code not in (0, 1):
        return []
    a = case.argv
    out = [a[i + 1] for i, x in enumerate(a[:-1]) if x in ("-o", "--out", "--output", "--apply-fix")]
    if a[0] == "report" and not out:
        out = [str(Path(a[1]).parent)]
    return [os.path.relpath(x, root) for x in out]


def run_case(case: Case, root: Path, snap: Snapshot, env: dict) -> Outcome:
    before = snap.take(root)

    def limits():
        os.umask(0o022)
        if case.fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.fsize, case.fsize))

    t = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "audit.cli", *case.argv], cwd=root / "cwd", env=env, capture_output=True, text=True,
                           preexec_fn=limits, timeout=max(120.0, case.seconds or 0))
        code, text = p.returncode, p.stderr + p.stdout
    except subprocess.TimeoutExpired:
        code, text = -1, "(killed after 120 s)"
    seconds = time.monotonic() - t
    after = snap.take(root)
    allowed = outputs(case, root)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and not any(k == a or k.startswith(a + os.sep) for a in allowed))
    problems = []
    if code != case.code:
        problems.append(f"exit {code}, want {case.code}")
    if case.says and case.says.lower() not in text.lower():
        problems.append(f"message lacks {case.says!r}")
    if "Traceback" in text:
        problems.append("a traceback reached the terminal")
    if case.seconds is not None and seconds > case.seconds:
        problems.append(f"took {seconds:.1f} s, want <= {case.seconds:g} s")
    if changed:
        problems.append(f"wrote outside its outputs: {changed[:5]}")
    why = case.check() if case.check is not None else None
    if why:
        problems.append(why)
    return Outcome(case, code, text, seconds, changed, problems)


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "AUDIT_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def table(outcomes: list[Outcome]) -> str:
    """The issue's table: cases, held, short, exit-3 count, writes outside outputs."""
    held = sum(o.held for o in outcomes)
    return ("| cases | held | short | exit 3 | writes outside outputs |\n|---|---|---|---|---|\n"
            f"| {len(outcomes)} | {held} | {len(outcomes) - held} | {sum(o.code == 3 for o in outcomes)} | {sum(bool(o.changed) for o in outcomes)} |")
