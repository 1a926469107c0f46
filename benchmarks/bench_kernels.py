"""pair_stats per element: the C kernels (audit/weights/native.py) against the torch path, side by side, per layout.

Each layout is a stack of bf16 tensor pairs too large for the caches (--mb per model), the ablated side
with r projected out, so every pair takes the changed-tensor path (norms, products with 3 directions,
D D^T r); "unchanged" times the projections an untouched writer gets. One torch thread, as in the audit.
Prints ns per element of one model and torch / kernels (target: > 1 wherever the kernels build;
a compiler that vectorizes badly shows here first).

    python benchmarks/bench_kernels.py [--mb 192] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audit.weights import native  # noqa: E402
from checks.linalg import project_out  # noqa: E402
from audit.weights.pair_stats import pair_stats  # noqa: E402
from checks.projection import floor_can_matter  # noqa: E402

H = 2048
LAYOUTS = {  # name: (shape of one tensor, residual axis, experts axis, experts)
    "writer [H, I]": ((H, 768), 0, None, 0),
    "o_proj [H, H]": ((H, H), 0, None, 0),
    "reader [I, H]": ((768, H), 1, None, 0),
    "fused writer [E, H, I]": ((8, H, 768), 1, 0, 8),
    "gpt-oss writer [E, I, H]": ((8, 768, H), 2, 0, 8),
}


def _time(fn, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=192, help="bytes of one model's tensors per layout")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if native.kernels() is None:
        print("the C kernels do not build here (no C compiler, or AUDIT_NATIVE=0): nothing to compare")
        return 1
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    r = torch.nn.functional.normalize(torch.randn(H, generator=g), dim=0)
    dirs = {"local": r, "ablated": torch.nn.functional.normalize(torch.randn(H, generator=g), dim=0)}
    hints = [r]
    for name, (shape, axis, ea, ne) in LAYOUTS.items():
        n = max(1, (args.mb << 20) // (2 * math.prod(shape)))
        w0 = [torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g) for _ in range(n)]
        w1 = [project_out(w.float(), r, axis).bfloat16() for w in w0]
        el = n * math.prod(shape)
        row = {"layout": name, "tensors": n}
        for path, flag in (("kernels", True), ("torch", False)):
            changed = _time(lambda: [pair_stats(a, b, axis, dirs, ea, ne, hints=hints, floor_needed=floor_can_matter, native=flag)
                                     for a, b in zip(w0, w1)], args.repeat)
            same = _time(lambda: [pair_stats(a, a, axis, {"local": r}, ea, ne, identical=True, native=flag) for a in w0], args.repeat)
            row[f"{path}_changed_ns"] = round(changed / el * 1e9, 3)
            row[f"{path}_unchanged_ns"] = round(same / el * 1e9, 3)
        row["changed_torch_over_kernels"] = round(row["torch_changed_ns"] / row["kernels_changed_ns"], 2)
        row["unchanged_torch_over_kernels"] = round(row["torch_unchanged_ns"] / row["kernels_unchanged_ns"], 2)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
