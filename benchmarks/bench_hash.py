"""The hashing stage (SHA-256 of every input file) against `sha256sum` of the same files, side by side in one run.

Builds (or reuses, cached in --dir) bench_static.py's synthetic qwen3_moe base + ablated pair (bf16, 1 GB shards,
--gb per model), reads every file once to warm the page cache, then times, alternating, --repeat times each:

- ``sha256sum FILE...``: coreutils, one process (what a user would run);
- ``sha256sum`` in 2 processes (``xargs -P 2``): the parallelism our stage uses;
- ``audit.model.hashes.hash_inputs`` with 1 and with 2 worker threads, nothing taken from file names (``reuse_hf=False``,
  as `audit verify` hashes).

Every digest is checked equal to sha256sum's. Prints GB/s (wall) and CPU seconds per GB for each, and the ratios of
ours to sha256sum's. On a machine shared with other work read the CPU seconds; the wall times move with the load.

    python benchmarks/bench_hash.py --gb 3.5 --dir /tmp/bench_static --repeat 3
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def sha256sum(files: list[Path], procs: int) -> tuple[dict, float, float]:
    """(digests, wall s, CPU s) of coreutils sha256sum over ``files`` in ``procs`` processes."""
    c0, t0 = _children_cpu(), time.perf_counter()
    if procs == 1:
        out = subprocess.run(["sha256sum", *map(str, files)], capture_output=True, text=True, check=True).stdout
    else:
        out = subprocess.run(["xargs", "-0", "-P", str(procs), "-n", "1", "sha256sum"], input="\0".join(map(str, files)),
                             capture_output=True, text=True, check=True).stdout
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    digests = {}
    for line in out.splitlines():
        digest, name = line.split(maxsplit=1)
        digests[os.path.realpath(name.lstrip("*"))] = digest
    return digests, wall, cpu


def ours(files: list[Path], workers: int) -> tuple[dict, float, float]:
    from audit.model.hashes import hash_inputs

    c0, t0 = time.process_time(), time.perf_counter()
    h = hash_inputs([("file", f.parent, f.name) for f in files], reuse_hf=False, workers=workers)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {os.path.realpath(Path(x["root"]) / x["name"]): x["sha256"] for x in h["files"]}, wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=3.5, help="size of each model (bench_static.py rounds up to whole layers; 3.5: an 11-layer 7.65 GB pair)")
    ap.add_argument("--dir", default="/tmp/bench_static")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from bench_static import build

    base, abl, dfile = build(Path(args.dir), args.gb)
    files = sorted(p for d in (base, abl) for p in d.iterdir() if p.is_file()) + [dfile]
    total = sum(f.stat().st_size for f in files)
    print(f"{len(files)} files, {total / 1e9:.2f} GB (the base + ablated pair of bench_static.py); warming the page cache ...", flush=True)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 24):
                pass
    ref = None
    rows: dict[str, list[tuple[float, float]]] = {}
    runs = [("sha256sum, 1 process", lambda: sha256sum(files, 1)), ("sha256sum, 2 processes", lambda: sha256sum(files, 2)),
            ("ours, 1 thread", lambda: ours(files, 1)), ("ours, 2 threads (the default)", lambda: ours(files, 2))]
    for _ in range(args.repeat):
        for name, fn in runs:
            digests, wall, cpu = fn()
            ref = ref or digests
            assert digests == ref, f"{name}: digests differ from sha256sum's"
            rows.setdefault(name, []).append((wall, cpu))
    print(f"\n{'':32s} {'GB/s (wall, best)':>18s} {'GB/s (wall, median)':>20s} {'CPU s / GB':>11s}")
    best = {}
    for name, xs in rows.items():
        walls = sorted(w for w, _ in xs)
        cpus = sorted(c for _, c in xs)
        best[name] = (total / walls[0] / 1e9, total / walls[len(walls) // 2] / 1e9, cpus[len(cpus) // 2] / (total / 1e9))
        print(f"{name:32s} {best[name][0]:18.2f} {best[name][1]:20.2f} {best[name][2]:11.3f}")
    s1, s2, o1, o2 = (best[n] for n, _ in runs)
    print(f"\nours (2 threads) / sha256sum (1 process): {o2[1] / s1[1]:.2f}x the throughput (median wall), "
          f"{o2[2] / s1[2]:.2f}x the CPU per GB")
    print(f"ours (1 thread) / sha256sum (1 process): {o1[1] / s1[1]:.2f}x the throughput, {o1[2] / s1[2]:.2f}x the CPU per GB")
    print(f"ours (2 threads) / sha256sum (2 processes): {o2[1] / s2[1]:.2f}x the throughput")
    print("every digest equal to sha256sum's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
