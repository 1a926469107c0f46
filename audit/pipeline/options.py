"""What one `audit run` is told (RunOptions: the CLI's flags as fields) and what it keeps while it runs (RunContext:
stage times, what was cut, where each model was placed, what was checked about each server)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from audit.intent.manifest import manifest_base
from audit.outputs import check_destination
from checks.errors import AuditError


EXTEND_FACTOR = 4  # default --extend-to: four times --max-new-tokens


FIX_BUDGET = 80  # the most configs `audit fix` (and --apply-fix) simulates by default: the walk, the bypass test and the refinement


@dataclass
class RunOptions:
    model_dir: str
    base: str | None = None
    config: str | None = None
    gate: str | None = None
    harmful: str | None = None
    harmless: str | None = None
    directions: str | None = None
    out: str = "audit-out"
    force: bool = False
    max_new_tokens: int = 128
    extend_to: int | None = None  # cut-off answers that could be judged differently are generated up to this many tokens (None: EXTEND_FACTOR x max_new_tokens; 0: never)
    batch_size: int = 16
    limit: int | None = None  # at most this many prompts per set
    simulate: bool = True
    confirm_all: bool = False  # --confirm-all: generate for every fix the first-token estimate would settle (slower)
    fix_budget: int = FIX_BUDGET  # --budget: the most configs the fix search (--apply-fix, `audit fix`) simulates
    gate_overrides: dict = field(default_factory=dict)  # `audit fix --target-refusal / --max-kl`: gate limits over the gate file's
    apply_fix: str | None = None  # write the fixed ablation here, re-audit it
    device: str | None = None  # None / "cpu", a torch device, or "auto": accelerate's device map (GPUs, CPU, disk)
    dtype: str = "auto"  # --dtype: auto (the stored dtype: bf16 stays bf16), float32, bfloat16, float16
    max_memory: dict | None = None  # --max-memory (audit.model.directory.parse_max_memory), with device "auto"
    offload_folder: str | None = None  # --offload-folder: where accelerate's disk offload goes (a temporary of ours inside it)
    server: str | None = None  # OpenAI-compatible server that serves the ablated model (its completions come from there)
    served_model: str | None = None  # the name it serves it under (default: the model directory's path)
    base_server: str | None = None  # OpenAI-compatible server that serves the base model (its completions come from there)
    served_base_model: str | None = None  # the name it serves it under (default: the base directory's path)
    server_timeout: float = 300.0  # seconds one server request may take in all
    quiet: bool = False
    command: str = "audit run"
    judge: str = "rules"  # --judge: rules (default, offline), rules-only, meaning, classifier:DIR, server:URL[#MODEL] (audit/judgement/judges.py)
    second_judge: str | None = None  # --second-judge: any --judge value; the report shows where the two disagree
    capability: str | None = None  # --capability: JSONL items, lm-eval:TASK, or none (default: the embedded MMLU sample)
    capability_format: str = "chat"  # --capability-format: chat (the directory's template) or plain (lm-evaluation-harness's cloze text)
    capability_limit: int | None = None  # --capability-limit: at most this many items per task
    multi_turn: int = 16  # --multi-turn: prompts per set asked again as a second user turn (0: off)
    controls: bool = True  # --no-controls: skip the random-direction control (it also follows --no-simulate)
    control: bool = False  # --control: MODEL_DIR is the base itself (a no-op control); judged by checks/controls.py noop_check

    def cap(self) -> int:
        """The most tokens an extended answer may have (0: extension off)."""
        return EXTEND_FACTOR * self.max_new_tokens if self.extend_to is None else self.extend_to
    against: str | None = None  # a GGUF MODEL_DIR: the safetensors ablation it was converted from (checks/conversion.py)

    PATHS = ("model_dir", "base", "config", "gate", "harmful", "harmless", "directions", "against", "offload_folder", "capability")
    RECORDED = ("model_dir", "base", "config", "gate", "harmful", "harmless", "directions", "against", "max_new_tokens", "batch_size",
                "limit", "simulate", "confirm_all", "fix_budget", "gate_overrides", "device", "dtype", "max_memory", "offload_folder", "server", "served_model", "base_server",
                "served_base_model", "server_timeout", "judge", "second_judge", "extend_to", "capability", "capability_format",
                "capability_limit", "multi_turn", "controls", "control")

    def record(self) -> dict:
        """The settings that decide what a run measures, as results.json records them (``run.options``; paths made absolute,
        a prompt set given by a datasets name kept as it is): what `audit run --reproduce` runs again."""
        import os

        out = {}
        for k in self.RECORDED:
            v = getattr(self, k)
            if k in self.PATHS and v is not None and os.path.exists(v):
                v = os.path.abspath(v)
            out[k] = v
        return out

    @classmethod
    def from_record(cls, rec: dict, **changes) -> RunOptions:
        """RunOptions from ``run.options`` (unknown keys, from another version, are an error naming them)."""
        from checks.errors import AuditError

        unknown = sorted(set(rec) - set(cls.RECORDED))
        if unknown:
            raise AuditError(f"the recorded run options hold {unknown}, which this version does not know; reproduce with the version that ran it")
        rec = dict(rec)
        if rec.get("max_memory"):  # JSON made the GPU numbers strings
            rec["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in rec["max_memory"].items()}
        return cls(**{**rec, **changes})


def refuse_before_loading(opts: RunOptions, write: bool = True) -> None:
    """What the flags alone can refuse, decided before any model is read (a second, not after a run): an ablated model
    that is its own base, -o and --apply-fix that are one folder or hold one another, either of them on an input."""
    base = opts.base or manifest_base(opts.model_dir)
    if base is not None and Path(base).exists() and os.path.realpath(base) == os.path.realpath(opts.model_dir) and not opts.control:
        raise AuditError(f"{opts.model_dir}: the ablated model and its base ({'--base' if opts.base else 'its ablation manifest'}) are the "
                         "same directory: there is no ablation to audit. Pass the original model as --base, or --control to audit the base "
                         "against itself as a no-op control (it must show no change)")
    inputs = [opts.model_dir, base, opts.config, opts.gate, opts.harmful, opts.harmless, opts.directions]
    if opts.apply_fix:
        if write:
            out, fix = (Path(os.path.realpath(p)) for p in (opts.out, opts.apply_fix))
            if out == fix or out in fix.parents or fix in out.parents:
                raise AuditError(f"--apply-fix {opts.apply_fix}: {'is' if out == fix else 'lies inside or holds'} -o {opts.out}; the fixed model "
                                 "and the report go into two separate folders -- choose another --apply-fix")
        check_destination(opts.apply_fix, inputs + ([opts.out] if write else []), opts.force)
    if write:
        check_destination(opts.out, inputs + [opts.apply_fix], opts.force)


@dataclass
class RunContext:
    opts: RunOptions
    stages: dict = field(default_factory=dict)
    stages_cpu: dict = field(default_factory=dict)  # the same stages in CPU seconds of this process (steady on a shared machine)
    t0: float = field(default_factory=time.time)
    prompts_cut: dict = field(default_factory=dict)  # prompts cut to the token budget, per set
    placement: dict = field(default_factory=dict)  # per model loaded: its dtype and accelerate's device map by device
    servers: dict = field(default_factory=dict)  # per side served ("abl", "base"): what was checked about its server
    kept: dict = field(default_factory=dict)  # the diagnosis stage's simulator and search, for a caller that passed this context

    def say(self, msg: str) -> None:
        if not self.opts.quiet:
            print(msg, file=sys.stderr, flush=True)

    def stage(self, name: str, total: int | None = None, unit: str = "prompt"):
        """Time a stage into results.json. ``with`` yields ``advance(n)``: with a ``total``, a progress bar on a terminal
        (tqdm, off when stderr is not a TTY or with quiet), where a log gets the stage's name instead."""
        ctx = self

        class _S:
            def __enter__(self):
                self.bar = None
                if total and not ctx.opts.quiet:
                    from tqdm import tqdm

                    self.bar = tqdm(total=total, desc=f"[audit] {name}", unit=unit, disable=None, leave=False, file=sys.stderr)
                if self.bar is None or self.bar.disable:
                    ctx.say(f"[audit] {name} ...")
                self.t, self.cpu = time.perf_counter(), time.process_time()
                return self.advance

            def advance(self, n: int = 1) -> None:
                if self.bar is not None:
                    self.bar.update(n)

            def __exit__(self, *exc):
                ctx.stages[name] = round(time.perf_counter() - self.t, 3)
                ctx.stages_cpu[name] = round(time.process_time() - self.cpu, 3)
                if self.bar is not None:
                    self.bar.close()

        return _S()
