"""Multiple-choice items scored by log-likelihood on one loaded model: the capability check's forward pass.

Items come from a JSONL file (``question``, ``choices``, ``answer``: an index, a letter or the choice's text; optional
``task``), the embedded default (audit/data/capability_mmlu.jsonl: 150 MMLU test items, docs/capability-data-card.md),
or ``lm-eval:TASK``: lm-evaluation-harness builds the task's requests and computes its own per-item ``acc`` /
``acc_norm`` from the log-likelihoods this module returns (its tasks are never re-implemented here).

Scoring is lm-evaluation-harness's: the log-probability of a choice's tokens given the context, summed, the pair
encoded as context + continuation with trailing spaces of the context moved into the continuation. The context is,
by ``fmt``, the question as a user turn in the directory's chat template with the choice as the start of the
assistant's answer (``chat``, the default: how every other pass of the audit talks to the model), or lm-evaluation-
harness's ARC / MMLU cloze text ``Question: ...\\nAnswer:`` followed by `` choice`` (``plain``). Sequences are batched
by length with left padding and only the continuation's logits are computed (``logits_to_keep``); an item that does
not fit the model's context is not scored and is counted. One model is resident at a time: the caller runs this in
each model's own pass, and what crosses between the two is per-item correctness.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from audit.model.loading import input_device
from audit.model.prompts import DATA_DIR, format_prompts
from checks.capability import choice_correct
from checks.errors import AuditError

DEFAULT_ITEMS = DATA_DIR / "capability_mmlu.jsonl"
FORMATS = ("chat", "plain")
LM_EVAL = "lm-eval:"


@dataclass(frozen=True)
class Item:
    question: str
    choices: tuple[str, ...]
    answer: int
    task: str


def capability_source(spec: str | None) -> str | None:
    """What ``--capability`` names: None (the embedded default's path), ``none`` (off), a file, or ``lm-eval:TASK``."""
    if spec is None:
        return str(DEFAULT_ITEMS)
    if spec.strip().lower() == "none":
        return None
    if spec.startswith(LM_EVAL):
        if not spec[len(LM_EVAL):].strip():
            raise AuditError(f"--capability {spec!r}: name the lm-evaluation-harness task, e.g. lm-eval:arc_easy")
        return spec
    if not Path(spec).is_file():
        raise AuditError(f"--capability {spec}: no such file; give a JSONL file of items (question, choices, answer), "
                         "lm-eval:TASK, or none")
    return spec


def load_items(path: str | Path) -> dict[str, list[Item]]:
    """The items of a JSONL file, grouped by their ``task`` (default: the file's name). AuditError names the line."""
    path = Path(path)
    tasks: dict[str, list[Item]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AuditError(f"--capability {path}: cannot read it ({type(e).__name__}: {e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--capability {path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AuditError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("choices"), list):
            raise AuditError(f"{where}: each line must be an object with question (text), choices (a list of texts) and answer")
        choices = row["choices"]
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise AuditError(f"{where}: choices must be two or more non-empty texts")
        item = Item(row["question"], tuple(choices), _answer_index(row.get("answer"), choices, where), str(row.get("task") or path.stem))
        tasks.setdefault(item.task, []).append(item)
    if not tasks:
        raise AuditError(f"--capability {path}: no items; each line is {{\"question\": ..., \"choices\": [...], \"answer\": 0}}")
    return tasks


def _answer_index(answer, choices: list[str], where: str) -> int:
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, int) and 0 <= answer < len(choices):
        return answer
    if isinstance(answer, str):
        a = answer.strip()
        if len(a) == 1 and a.upper().isalpha() and ord(a.upper()) - 65 < len(choices):
            return ord(a.upper()) - 65
        if a in choices:
            return choices.index(a)
    raise AuditError(f"{where}: answer {answer!r} names no choice; give its index (0..{len(choices) - 1}), its letter, or its text")


def requests_for(item: Item, fmt: str, tok) -> list[tuple[str, str]]:
    """(context, continuation) per choice of ``item`` in format ``fmt`` (see the module docstring)."""
    if fmt == "chat":
        ctx = format_prompts(tok, [item.question])[0]
        return [(ctx, c) for c in item.choices]
    if fmt == "plain":
        return [(f"Question: {item.question}\nAnswer:", " " + c) for c in item.choices]
    raise AuditError(f"--capability-format {fmt!r}: use one of {', '.join(FORMATS)}")


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's pair encoding: the context's trailing spaces go with the continuation; the continuation's
    tokens are what encoding the whole adds to the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):] if whole[: len(ctx)] == ctx else []
    if not cont:  # the tokenizer merged across the seam: encode the continuation on its own
        cont = tok(continuation, add_special_tokens=False)["input_ids"]
    return ctx, cont


TOKENS_PER_ROW = 64  # a batch holds at most batch_size x this many tokens: long items go in smaller batches (bounded activations)


def _batches(order: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """``order`` (longest first) cut into batches of at most ``batch_size`` sequences and batch_size x TOKENS_PER_ROW padded
    tokens: a batch of MMLU questions costs no more memory than a batch of the probes' prompts (one sequence at least)."""
    budget, out, cur = batch_size * TOKENS_PER_ROW, [], []
    for i in order:
        width = max([lengths[j] for j in cur] + [lengths[i]])
        if cur and (len(cur) == batch_size or width * (len(cur) + 1) > budget):
            out.append(cur)
            cur = []
        cur.append(i)
    return out + ([cur] if cur else [])


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim; nothing elsewhere). Batches of varying lengths
    leave freed blocks glibc keeps, about 0.6 GB over 40 MMLU choices on a 1.5 GB model, which the next model's load
    would sit on top of; measured in benchmarks/bench_run_memory.py."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _keep(model, k: int) -> dict:
    try:
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {"logits_to_keep": k} if takes else {}


@torch.inference_mode()
def loglikelihoods(model, tok, requests: list[tuple[str, str]], batch_size: int = 16, max_len: int | None = None,
                   progress=None, truncate: bool = False) -> list[tuple[float, bool] | None]:
    """Per (context, continuation): (summed log-probability of the continuation's tokens, whether each is the greedy
    token), or None where context + continuation is longer than ``max_len`` tokens (not scored; with ``truncate`` the
    context is cut from the left instead, as lm-evaluation-harness does). float32 log-softmax."""
    enc = [_encode_pair(tok, c, x) for c, x in requests]
    if truncate and max_len is not None:
        enc = [(c[max(0, len(c) + len(x) - 1 - max_len):], x) for c, x in enc]
    out: list[tuple[float, bool] | None] = [None] * len(enc)
    fits = [i for i, (c, x) in enumerate(enc) if x and (max_len is None or len(c) + len(x) - 1 <= max_len)]
    order = sorted(fits, key=lambda i: -(len(enc[i][0]) + len(enc[i][1])))
    dev = input_device(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for idx in _batches(order, [len(enc[i][0]) + len(enc[i][1]) - 1 for i in range(len(enc))], batch_size):
        seqs = [(enc[i][0] + enc[i][1])[:-1] for i in idx]
        width = max(map(len, seqs))
        k = max(len(enc[i][1]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in seqs], device=dev)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], device=dev)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **_keep(model, k)).logits[:, -k:, :]
        for row, i in enumerate(idx):
            cont = enc[i][1]
            lp = torch.log_softmax(logits[row, k - len(cont):].float(), dim=-1)
            target = torch.tensor(cont, device=lp.device)
            ll = float(lp.gather(-1, target[:, None]).sum())
            out[i] = (ll, bool((lp.argmax(-1) == target).all()))
        del logits
        trim_heap()
        if progress is not None:
            progress(len(idx))
    return out


def score_items(model, tok, tasks: dict[str, list[Item]], fmt: str = "chat", batch_size: int = 16, max_len: int | None = None,
                progress=None) -> dict[str, dict]:
    """Per task: {"correct": checks.capability.choice_correct(...) over the items scored, "scored": their indices,
    "skipped": how many did not fit, "chance", "questions"}. Items are scored whole or not at all."""
    out = {}
    for name, items in tasks.items():
        reqs = [requests_for(it, fmt, tok) for it in items]
        flat = loglikelihoods(model, tok, [r for rs in reqs for r in rs], batch_size, max_len, progress)
        per, k = [], 0
        for it in items:
            per.append(flat[k:k + len(it.choices)])
            k += len(it.choices)
        scored = [i for i, p in enumerate(per) if all(x is not None for x in p)]
        correct = choice_correct([[x[0] for x in per[i]] for i in scored], [[len(c) for c in items[i].choices] for i in scored],
                                 [items[i].answer for i in scored])
        out[name] = {"correct": correct, "scored": scored, "skipped": len(items) - len(scored),
                     "chance": sum(1 / len(items[i].choices) for i in scored) / len(scored) if scored else 0.0,
                     "questions": [items[i].question for i in scored]}
    return out


def n_requests(tasks: dict[str, list[Item]]) -> int:
    return sum(len(it.choices) for items in tasks.values() for it in items)


# -- lm-evaluation-harness: its tasks, its metrics, our forward pass ------------------------------------------------------


def lm_eval_scores(model, tok, spec: str, batch_size: int = 16, max_len: int | None = None, limit: int | None = None) -> dict[str, dict]:
    """Per lm-evaluation-harness task of ``lm-eval:TASK``: its own per-item ``acc`` / ``acc_norm`` on this model, in the
    form score_items returns. AuditError when lm_eval is not installed or cannot load the task's data (offline)."""
    name = spec[len(LM_EVAL):].strip()
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise AuditError(f"--capability {spec}: lm-evaluation-harness is not installed; pip install 'moe-ablation-audit[lm-eval]' "
                         "(or pass --capability FILE with JSONL items)") from None
    path = Path(name)
    own = path.suffix in (".yaml", ".yml")  # a task YAML of one's own: only its folder is indexed (the harness's 14k tasks take a minute)
    if own and not path.is_file():
        raise AuditError(f"--capability {spec}: no such task YAML file")
    manager = TaskManager(include_path=str(path.parent), include_defaults=False) if own else _default_manager(TaskManager)
    task = path.stem if own else name
    if task not in manager.all_tasks:
        raise AuditError(f"--capability {spec}: lm-evaluation-harness knows no task {task!r} (a task name such as arc_easy, or a task YAML file)")
    lm = _HarnessLM(model, tok, batch_size, max_len)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True, num_fewshot=None,
                                      bootstrap_iters=0, verbosity="ERROR")
    except AuditError:
        raise
    except Exception as e:  # the task's data: a hub download, a missing file
        raise AuditError(f"--capability {spec}: lm-evaluation-harness could not load or run the task ({type(e).__name__}: {str(e)[:300]}). "
                         "Its data usually comes from the Hugging Face hub, which this run cannot reach: run where it can (or with the "
                         "data in HF_DATASETS_CACHE), or pass --capability FILE with JSONL items") from None
    out = {}
    for tname, samples in (res.get("samples") or {}).items():
        samples = sorted(samples, key=lambda s: s["doc_id"])
        if not samples or "acc" not in samples[0]:
            raise AuditError(f"--capability {spec}: task {tname!r} is not a multiple-choice (log-likelihood) task with an acc metric")
        n_choices = [len(s["arguments"]) for s in samples]
        bad = sum(1 for s in samples for r in s.get("filtered_resps") or [] if _nonfinite(r))
        out[tname] = {"correct": {"acc": [bool(s["acc"]) for s in samples], "acc_norm": [bool(s.get("acc_norm", s["acc"])) for s in samples],
                                  "nonfinite": bad},
                      "scored": [s["doc_id"] for s in samples], "skipped": lm.skipped, "chance": sum(1 / k for k in n_choices) / len(n_choices),
                      "questions": [str(s["arguments"][0][0])[-300:] for s in samples]}
    return out


_MANAGERS: dict = {}


def _default_manager(cls):
    """lm-evaluation-harness's index of its own tasks, built once per process (both models' passes use it)."""
    if "default" not in _MANAGERS:
        _MANAGERS["default"] = cls()
    return _MANAGERS["default"]


def _nonfinite(r) -> bool:
    x = r[0] if isinstance(r, (list, tuple)) else r
    return isinstance(x, float) and not (x == x and abs(x) != float("inf"))


def _harness_base():
    from lm_eval.api.model import LM

    return LM


class _HarnessLM:
    """Our forward pass as an lm-evaluation-harness model (log-likelihood requests only). Built lazily: lm_eval is optional."""

    def __new__(cls, model, tok, batch_size, max_len):
        base = _harness_base()

        class HarnessLM(base):
            skipped = 0  # contexts are cut from the left instead (lm-evaluation-harness's own rule)

            def __init__(self):
                super().__init__()

            def loglikelihood(self, requests, disable_tqdm: bool = False):
                scores = loglikelihoods(model, tok, [r.args for r in requests], batch_size, max_len, truncate=True)
                if any(x is None for x in scores):
                    raise AuditError("--capability lm-eval: a choice alone is longer than the model's context; pick another task")
                return scores

            def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
                raise AuditError("--capability lm-eval: only multiple-choice (log-likelihood) tasks are supported, not perplexity tasks")

            def generate_until(self, requests, disable_tqdm: bool = False):
                raise AuditError("--capability lm-eval: only multiple-choice (log-likelihood) tasks are supported, not generation tasks")

        return HarnessLM()


@dataclass
class CapabilitySpec:
    """What ``--capability`` asks for, ready to score on each model in its own pass: items (a file's, or the embedded
    default) or an lm-evaluation-harness task; ``fmt``: chat or plain; ``max_len``: the model's context in tokens."""

    source: str
    fmt: str = "chat"
    max_len: int | None = None
    limit: int | None = None  # at most this many items per task
    tasks: dict[str, list[Item]] | None = None

    @classmethod
    def from_flag(cls, spec: str | None, fmt: str = "chat", max_len: int | None = None, limit: int | None = None) -> "CapabilitySpec | None":
        """None for ``--capability none``; files are read now, so a bad file fails before any model loads."""
        if fmt not in FORMATS:
            raise AuditError(f"--capability-format {fmt!r}: use one of {', '.join(FORMATS)}")
        src = capability_source(spec)
        if src is None:
            return None
        tasks = None if src.startswith(LM_EVAL) else {k: v[:limit] for k, v in load_items(src).items()}
        return cls(src, fmt, max_len, limit, tasks)

    @property
    def default(self) -> bool:
        return Path(self.source) == DEFAULT_ITEMS

    def total(self) -> int | None:
        return n_requests(self.tasks) if self.tasks is not None else None

    def score(self, model, tok, batch_size: int = 16, progress=None) -> dict[str, dict]:
        if self.tasks is None:
            return lm_eval_scores(model, tok, self.source, batch_size, self.max_len, self.limit)
        return score_items(model, tok, self.tasks, self.fmt, batch_size, self.max_len, progress)
