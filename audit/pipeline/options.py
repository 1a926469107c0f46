"""What one `audit run` is told (RunOptions: the CLI's flags as fields) and what it keeps while it runs (RunContext:
stage times, what was cut, where each model was placed, what was checked about each server)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field



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
    batch_size: int = 16
    limit: int | None = None  # at most this many prompts per set
    simulate: bool = True
    confirm_top: int = 2  # simulated fixes confirmed by full generation
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
    judge: str = "rules"  # --judge: rules (default, offline), rules-only, classifier:DIR, server:URL[#MODEL] (audit/judgement/judges.py)
    capability: str | None = None  # --capability: JSONL items, lm-eval:TASK, or none (default: the embedded MMLU sample)
    capability_format: str = "chat"  # --capability-format: chat (the directory's template) or plain (lm-evaluation-harness's cloze text)
    capability_limit: int | None = None  # --capability-limit: at most this many items per task
    multi_turn: int = 16  # --multi-turn: prompts per set asked again as a second user turn (0: off)
    controls: bool = True  # --no-controls: skip the random-direction control (it also follows --no-simulate)
    control: bool = False  # --control: MODEL_DIR is the base itself (a no-op control); judged by checks/controls.py noop_check


@dataclass
class RunContext:
    opts: RunOptions
    stages: dict = field(default_factory=dict)
    stages_cpu: dict = field(default_factory=dict)  # the same stages in CPU seconds of this process (steady on a shared machine)
    t0: float = field(default_factory=time.time)
    prompts_cut: dict = field(default_factory=dict)  # prompts cut to the token budget, per set
    placement: dict = field(default_factory=dict)  # per model loaded: its dtype and accelerate's device map by device
    servers: dict = field(default_factory=dict)  # per side served ("abl", "base"): what was checked about its server

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
