"""The `audit` command line: one entry point, subcommands, clean errors (exit 2, no traceback)."""

from __future__ import annotations

import argparse
import json
import sys

from checks.errors import AuditError


def _cmd_inspect(args) -> int:
    from audit.model_dir import ModelDir

    md = ModelDir(args.model_dir)
    lay = md.layout
    info = {**lay.summary(), "path": str(md.path), "dtypes": md.dtypes(), "bytes": md.nbytes, "shards": len(md.shards),
            "per_layer": {str(k): v for k, v in lay.counts().items()}}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{md.path}  family={lay.family}  layers={lay.num_layers}  hidden={lay.hidden_size}")
    print(f"  size {md.nbytes / 2**20:.1f} MiB in {len(md.shards)} shard(s); dtypes {md.dtypes()}")
    if lay.moe_layers:
        print(f"  MoE layers {_ranges(lay.moe_layers)}; dense MLP layers {_ranges(lay.dense_layers) or 'none'}")
        print(f"  routed experts {lay.n_routed_experts}, shared experts {lay.n_shared_experts}, top-k {lay.top_k}; routing: {lay.routing_rule}")
    else:
        print(f"  dense model: MLP layers {_ranges(lay.dense_layers)}")
    comps = sorted({c for v in lay.counts().values() for c in v})
    print("  tensors per component per layer:")
    print("    " + "layer".ljust(8) + "".join(c[:14].rjust(15) for c in comps))
    for layer, counts in sorted(lay.counts().items(), key=lambda kv: (kv[0] == "global", kv[0] if kv[0] != "global" else 0)):
        print("    " + str(layer).ljust(8) + "".join(str(counts.get(c, "")).rjust(15) for c in comps))
    return 0


def _ranges(xs: list[int]) -> str:
    """[1,2,3,7] -> '1-3, 7'."""
    out, start, prev = [], None, None
    for x in sorted(xs):
        if start is None:
            start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = x
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return ", ".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="audit", description="Audit (and fix) refusal-direction ablations of Mixture-of-Experts models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="map what an ablation could touch: family, layers, experts, tensors per component")
    s.add_argument("model_dir")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AuditError as e:
        print(f"audit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("audit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
