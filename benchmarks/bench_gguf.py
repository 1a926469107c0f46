"""The static audit of a GGUF file against the same audit of its safetensors source, side by side in one run.

Builds (or reuses, in --dir) bench_static.py's synthetic qwen3_moe base + ablated pair (bf16, --gb per model), converts
the ablated model to GGUF (--types, e.g. Q8_0,Q6_K; tests/helpers_gguf.py writes it as llama.cpp's converter and
quantizer do), then, each in a fresh subprocess with the page cache warm:

- ``static_audit(ABLATED, BASE)``: the safetensors source against its base (what `audit static` does today);
- ``static_audit(MODEL.gguf, BASE)``: the GGUF against the same base (every tensor decoded block by block, judged
  within its type's rounding, the changed ones read again for their floors and the edit's direction);
- the same with ``against=ABLATED``: the source streamed too, and the conversion check.

Prints CPU seconds, wall seconds and peak RSS of each, and the ratios to the safetensors audit; also the conversion
check's verdict (every edit kept). Peak RSS is this process's high-water mark (VmHWM) in the child.

    python benchmarks/bench_gguf.py --gb 1 --dir /tmp/bench_gguf --types Q8_0,Q6_K
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from audit.weights.static_audit import static_audit
from checks import native
native.kernels()
c0, t0 = time.process_time(), time.perf_counter()
res = static_audit({model!r}, {base!r}, directions={dirs!r}, against={against!r})
out = {{"cpu": time.process_time() - c0, "wall": time.perf_counter() - t0,
       "status": {{k: r.status for k, r in res.items()}}, "conversion": res["conversion"].summary if "conversion" in res else None}}
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        out["rss_mb"] = int(line.split()[1]) / 1024
print("RESULT" + json.dumps(out))
"""


def child(model, base, dirs, against=None) -> dict:
    code = CHILD.format(root=str(ROOT), model=str(model), base=str(base), dirs=str(dirs), against=None if against is None else str(against))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUDIT_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(line[6:])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0, help="size of each model (bench_static.py rounds up to whole layers)")
    ap.add_argument("--dir", default="/tmp/bench_gguf")
    ap.add_argument("--types", default="Q8_0,Q6_K")
    args = ap.parse_args()
    from bench_static import build
    from helpers_gguf import write_gguf

    base, abl, dirs = build(Path(args.dir), args.gb)
    files = {}
    for q in args.types.split(","):
        f = Path(args.dir) / f"ablated-{q}.gguf"
        if not f.is_file():
            t0 = time.perf_counter()
            write_gguf(abl, f, q)
            print(f"converted to {q} in {time.perf_counter() - t0:.0f} s ({f.stat().st_size / 1e9:.2f} GB)", flush=True)
        files[q] = f
    for p in [*base.iterdir(), *abl.iterdir(), *files.values()]:  # warm the page cache
        with open(p, "rb", buffering=0) as fh:
            while fh.read(1 << 24):
                pass
    rows = [("safetensors source", child(abl, base, dirs))]
    for q, f in files.items():
        rows.append((f"GGUF {q}", child(f, base, dirs)))
        rows.append((f"GGUF {q} --against source", child(f, base, dirs, against=abl)))
    ref = rows[0][1]
    print(f"\n{'':30s} {'CPU s':>8s} {'wall s':>8s} {'peak RSS MB':>12s} {'CPU / source':>13s}  statuses")
    for name, r in rows:
        print(f"{name:30s} {r['cpu']:8.1f} {r['wall']:8.1f} {r['rss_mb']:12.0f} {r['cpu'] / ref['cpu']:13.2f}  {r['status']}"
              + (f"  [{r['conversion']}]" if r["conversion"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
