"""Other tools' files, read as they are: llm-abliteration's measurement file and YAML config.

The measurement file is a ``torch.save`` dict: ``layers`` (an int) and, per hidden-state index i,
``harmful_i``, ``harmless_i``, ``refuse_i`` (and in some versions ``refusenorm_i``) tensors. It is a
pickle, so it is loaded with ``weights_only=True`` (plain tensors and containers only, no code), then
every value is checked to be a tensor or a number; anything else is refused. The YAML config is the
one audit/intent/config.py reads (its format is a subset of ours).
"""

from __future__ import annotations

import os

import torch

from audit.user_files import regular_file
from checks.errors import AuditError

KEY_PREFIXES = ("harmful_", "harmless_", "refuse_", "refusenorm_")


def read_measurement(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """llm-abliteration's measurement file -> ({refusal_dir, harmful_mean, harmless_mean: [n, H]}, metadata), type-checked.

    audit.intent.directions.load_measurement wraps this as Directions (index i = hidden_states[i])."""
    path = regular_file(path, "measurement")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- an untrusted file: whatever the loader raises (pickle, zip, safetensors by suffix), it is bad input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AuditError(f"{path}: refused: not a measurement of plain tensors ({first[:200]}). Measurement files are loaded with "
                         "weights_only=True and never fully unpickled; re-create it with llm-abliteration's measure.py or `audit measure`") from None
    if not isinstance(d, dict):
        raise AuditError(f"{path}: not an llm-abliteration measurement: a {type(d).__name__}, expected a dict with 'layers', 'refuse_N', ...")
    for k, v in d.items():
        if not isinstance(k, str):
            raise AuditError(f"{path}: key {k!r} is not a string; not an llm-abliteration measurement")
        if k == "layers":
            if isinstance(v, bool) or not isinstance(v, (int, torch.Tensor)):
                raise AuditError(f"{path}: 'layers' must be an integer, got {type(v).__name__}")
            continue
        if not k.startswith(KEY_PREFIXES):
            continue  # extra entries are allowed but must still be plain
        if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
            raise AuditError(f"{path}: {k!r} is a {type(v).__name__}{'' if not isinstance(v, torch.Tensor) else ' of ' + str(v.dtype)}, expected a float tensor")
    if "layers" not in d:
        raise AuditError(f"{path}: not an llm-abliteration measurement (no 'layers' entry)")
    n = int(d["layers"])
    if n <= 0:
        raise AuditError(f"{path}: 'layers' is {n}; expected the number of measured hidden-state indices")
    try:
        stack = {
            "refusal_dir": torch.stack([d[f"refuse_{i}"].float().flatten() for i in range(n)]),
            "harmful_mean": torch.stack([d[f"harmful_{i}"].float().flatten() for i in range(n)]),
            "harmless_mean": torch.stack([d[f"harmless_{i}"].float().flatten() for i in range(n)]),
        }
    except KeyError as e:
        raise AuditError(f"{path}: llm-abliteration measurement lacks {e.args[0]!r} (it says layers={n})") from None
    except RuntimeError as e:
        raise AuditError(f"{path}: the measured vectors do not share one size ({e})") from None
    return stack, {"source": f"llm-abliteration {path.name}"}
