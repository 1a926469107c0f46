"""Prompt sets for measuring and probing refusal: one loader for every command.

A source is either nothing (the embedded sets in audit/data/, written for this project), a local
file (.txt one prompt per line; .jsonl / .json / .csv / .parquet with a ``prompt``, ``instruction``
or ``text`` column, or plain strings), or a ``datasets`` name (``owner/name`` or
``owner/name:split``) when a hub is reachable. Blank entries are dropped; an empty set is an error.
A file with a ``category`` column also gives each prompt's category (``load_categories``): refusal rates
are then broken down by it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import signal
import threading
from pathlib import Path

from audit.user_files import regular_file
from checks.errors import AuditError

KINDS = ("harmful", "harmless")
COLUMNS = ("prompt", "instruction", "text")
DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def default_path(kind: str) -> Path:
    """The embedded prompt file for ``kind`` (harmful / harmless)."""
    if kind not in KINDS:
        raise AuditError(f"unknown prompt kind {kind!r}; use one of {', '.join(KINDS)}")
    return DATA_DIR / f"{kind}.txt"


def load_prompts(src: str | Path | None, kind: str) -> list[str]:
    """The prompts of ``src`` (None: the embedded ``kind`` set). Raises AuditError when empty or unreadable."""
    if src is None:
        src = default_path(kind)
    path = Path(src)
    if path.exists() or path.is_symlink():
        prompts = _read_file(regular_file(path, f"{kind} prompt"))  # a folder, a FIFO or a device is said to be what it is
    else:
        prompts = _read_dataset(str(src))
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise AuditError(f"{src}: the {kind} prompt set is empty; give a file with at least one prompt")
    return prompts


CATEGORY = "category"


def load_categories(src: str | Path | None) -> list[str | None] | None:
    """The ``category`` of each prompt ``load_prompts(src)`` returns (same order, same blanks dropped), from a JSONL, JSON,
    CSV or Parquet file with a ``category`` column; None when the source has no such column."""
    if src is None or not Path(src).is_file() or Path(src).suffix.lower() not in (".jsonl", ".json", ".csv", ".parquet"):
        return None
    path = Path(src)
    try:
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        elif path.suffix.lower() == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, dict) and CATEGORY in rows:  # {"prompt": [...], "category": [...]} column form
                col = next((c for c in COLUMNS if c in rows), None)
                rows = [{col: a, CATEGORY: b} for a, b in zip(rows.get(col) or [], rows[CATEGORY])] if col else []
        elif path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
    except Exception:  # load_prompts reads the same file and names what is wrong with it
        return None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows) or not any(CATEGORY in r for r in rows):
        return None
    col = next((c for c in COLUMNS if c in rows[0]), None)
    if col is None:
        return None
    return [(str(r[CATEGORY]) if r.get(CATEGORY) not in (None, "") else None) for r in rows
            if isinstance(r.get(col), str) and r[col].strip()]


def _column(rows: list[dict], where: str) -> list[str]:
    if not rows:
        return []
    for col in COLUMNS:
        if col in rows[0]:
            return [r.get(col) for r in rows]
    raise AuditError(f"{where}: no prompt column; name one of {', '.join(COLUMNS)} (columns found: {', '.join(map(str, rows[0]))})")


def _strings_or_rows(items: list, where: str) -> list[str]:
    if all(isinstance(x, str) for x in items):
        return items
    if all(isinstance(x, dict) for x in items):
        return _column(items, where)
    raise AuditError(f"{where}: expected strings or objects with a {'/'.join(COLUMNS)} field")


def _read_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            items = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except (ValueError, RecursionError) as e:
                        raise AuditError(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', None) or e or 'nested too deeply'})") from None
            return _strings_or_rows(items, str(path))
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"prompt": [...]} column form
                data = next((data[c] for c in COLUMNS if c in data), None)
            if not isinstance(data, list):
                raise AuditError(f"{path}: expected a JSON list of prompts (or of objects with a {'/'.join(COLUMNS)} field)")
            return _strings_or_rows(data, str(path))
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return _column(list(csv.DictReader(f)), str(path))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            col = next((c for c in COLUMNS if c in table.column_names), None)
            if col is None:
                raise AuditError(f"{path}: no prompt column; name one of {', '.join(COLUMNS)} (found: {', '.join(table.column_names)})")
            return [str(x) if x is not None else "" for x in table.column(col).to_pylist()]
        return path.read_text(encoding="utf-8").splitlines()  # .txt and anything else: one prompt per line
    except AuditError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise AuditError(f"{path}: cannot read prompts ({type(e).__name__}: {e})") from None
    except Exception as e:  # pyarrow's own error types
        raise AuditError(f"{path}: cannot read prompts ({type(e).__name__}: {e})") from None


def _read_dataset(name: str) -> list[str]:
    """A ``datasets`` hub name, ``owner/name[:split]``; only when the hub is reachable."""
    if "/" not in name or name.startswith((".", "/")):
        raise AuditError(f"{name}: no such prompt file (and not a datasets name like owner/name[:split])")
    repo, _, split = name.partition(":")
    try:
        from datasets import load_dataset

        ds = load_dataset(repo, split=split or "train")
    except Exception as e:
        raise AuditError(
            f"{name}: no such local file, and the datasets hub could not provide it ({type(e).__name__}: {e}). "
            "Pass a local .txt/.jsonl/.csv/.parquet file instead."
        ) from None
    col = next((c for c in COLUMNS if c in ds.column_names), None)
    if col is None:
        raise AuditError(f"{name}: no prompt column; needs one of {', '.join(COLUMNS)} (found: {', '.join(ds.column_names)})")
    return list(ds[col])


def as_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string is one user turn; a list of {"role", "content"} dicts is taken as it is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return prompt
    raise AuditError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


TEMPLATE_SECONDS = 10  # one prompt's rendering through a chat template; a template that loops longer is refused


def second_turn(first_prompt: str, first_answer: str, prompt: str) -> list[dict]:
    """A conversation whose second user turn is ``prompt``, after a first exchange (``first_prompt`` and the model's own
    ``first_answer``): formatted, like every prompt, by the model directory's chat template (format_prompts)."""
    return [{"role": "user", "content": first_prompt}, {"role": "assistant", "content": first_answer}, {"role": "user", "content": prompt}]


def conversations(prompts: list[str], first_prompts: list[str], first_answers: list[str], n: int) -> list[list[dict]]:
    """Up to ``n`` second-turn conversations: prompt i after the first exchange i + 1 (cyclic), so that no conversation
    asks the same thing twice when the two lists are one."""
    if not first_prompts:
        return []
    k = len(first_prompts)
    return [second_turn(first_prompts[(i + 1) % k], first_answers[(i + 1) % k], p) for i, p in enumerate(prompts[:n])]


def format_prompts(tokenizer, prompts: list) -> list[str]:
    """Each prompt in the tokenizer's chat template, ending with the assistant's cue: the one place prompts are formatted.

    The template is the model directory's (transformers renders it in jinja2's sandbox): one that fails, tries to leave
    the sandbox, or loops (past the sandbox's range limit, or longer than TEMPLATE_SECONDS) is an AuditError naming it."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise AuditError("the tokenizer has no chat template; prompts must be formatted as the model was trained")
    out = []
    for p in prompts:
        try:
            with _time_limit(TEMPLATE_SECONDS):
                out.append(tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True))
        except _TooLong:
            raise AuditError(f"{_template_file(tokenizer)}: the chat template ran for more than {TEMPLATE_SECONDS} s on one prompt (a loop?); "
                             "use the model's own chat template") from None
        except Exception as e:  # noqa: BLE001 -- a user's template: jinja2's errors (SecurityError, ...), OverflowError, RecursionError
            raise AuditError(f"{_template_file(tokenizer)}: the chat template failed on a prompt ({type(e).__name__}: {str(e)[:200]}); "
                             "use the model's own chat template") from None
    return out


def _template_file(tokenizer) -> str:
    """Where a tokenizer's chat template was read from, for a message."""
    d = Path(getattr(tokenizer, "name_or_path", "") or ".")
    return str(d / "chat_template.jinja") if (d / "chat_template.jinja").is_file() else f"{d / 'tokenizer_config.json'} (chat_template)"


class _TooLong(BaseException):
    """Raised into a template's rendering when its time is up (a BaseException: no template code can catch it)."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _TooLong in this block after ``seconds`` (main thread only, where a timer signal can interrupt it)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None):
        yield
        return

    def expired(*_):
        raise _TooLong()

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of each formatted prompt (no second BOS: the template has its own)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in format_prompts(tokenizer, prompts)]


MAX_PROMPT_TOKENS = 2048  # a refusal probe needs the request, not a book: caps probe and generation work per prompt


def context_length(config: dict) -> int | None:
    """The model's context in tokens, from its config.json (None when it does not say)."""
    for k in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        v = config.get(k) if isinstance(config, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def token_budget(config: dict, max_new_tokens: int = 0) -> int:
    """How many tokens a formatted prompt may take: the context minus the answer, at most MAX_PROMPT_TOKENS."""
    ctx = context_length(config)
    if ctx is None:
        return MAX_PROMPT_TOKENS
    budget = ctx - max_new_tokens
    if budget < 8:
        raise AuditError(f"--max-new-tokens {max_new_tokens} leaves {budget} of the model's {ctx} context tokens for the prompt; "
                         "lower --max-new-tokens")
    return min(budget, MAX_PROMPT_TOKENS)


def fit_to_context(tokenizer, prompts: list[str], max_tokens: int) -> tuple[list[str], int]:
    """Each prompt cut so that, chat-formatted, it takes at most ``max_tokens`` tokens; returns (prompts, how many were cut).

    The start of a prompt is kept (the request); characters far past any budget are dropped before
    tokenizing, so a pathological input costs no more than a long one.
    """
    out, cut = [], 0
    overhead = len(tokenizer(format_prompts(tokenizer, [""])[0], add_special_tokens=False)["input_ids"])
    room = max(1, max_tokens - overhead - 8)  # 8: tokens can merge differently at the template's seams
    for p in prompts:
        text = p[: room * 32]  # no tokenizer makes tokens of more than ~32 characters on average
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > room or len(text) < len(p):
            text = tokenizer.decode(ids[:room], skip_special_tokens=True)
            cut += 1
        out.append(text)
    return out, cut
