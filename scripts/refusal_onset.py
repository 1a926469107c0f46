"""Where refusals start: how many tokens of an answer the judge needs before it reads a refusal.

    python scripts/refusal_onset.py --gptfuzz GPTFUZZ_DIR --rbr RBR_DIR --jailjudge JAILBREAKEVAL_DIR [--organisms]

For every human-labelled refusal of the public sources (scripts/judge_data.py), the answer is cut after
k tokens for k in ``CUTS`` and judged by the default judge with the cut-off flag set, as ``audit run``
judges an answer that hit --max-new-tokens. Printed per source: the share of refusals already read as
refusals at each k, and the share whose judgement at k is still not the full answer's. Tokens are the
all-MiniLM-L6-v2 WordPiece tokenizer's (the [meaning] extra): a stand-in for the audited model's own,
which splits English into a similar number of pieces. ``--organisms`` adds the organisms' refusals
(base: at the first token; delayed: after its opening). This measurement chose --max-new-tokens'
default (README, The refusal judge).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from judge_data import load_public  # noqa: E402

CUTS = (8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def onset_table(rows: list[dict], tok, judge) -> dict:
    """Per k: the share of ``rows`` (refusals) judged refusal when cut after k tokens, and the share judged as the whole answer is."""
    full = judge.many([r["completion"] for r in rows], [r["prompt"] for r in rows])
    ids = [tok(r["completion"], add_special_tokens=False)["input_ids"] for r in rows]
    out = {"rows": len(rows), "full_refusal": sum(j.label == "refusal" for j in full) / max(1, len(rows)),
           "tokens_median": sorted(map(len, ids))[len(ids) // 2] if ids else None, "cuts": {}}
    for k in CUTS:
        cut = [tok.decode(x[:k]) if len(x) > k else r["completion"] for x, r in zip(ids, rows)]
        js = judge.many(cut, [r["prompt"] for r in rows], [len(x) > k for x in ids])
        out["cuts"][k] = {"refusal": round(sum(j.label == "refusal" for j in js) / max(1, len(rows)), 4),
                          "as_whole": round(sum(a.label == b.label for a, b in zip(js, full)) / max(1, len(rows)), 4)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gptfuzz", required=True)
    ap.add_argument("--rbr", required=True)
    ap.add_argument("--jailjudge", required=True)
    ap.add_argument("--organisms", action="store_true", help="also the base and delayed glm4_moe organisms' refusals")
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from audit.judgement.encoder import encoder_dir
    from audit.judgement.judges import make_judge

    tok = AutoTokenizer.from_pretrained(str(encoder_dir()), local_files_only=True)
    judge = make_judge("rules")
    rows = [r for r in load_public(a.gptfuzz, a.rbr, a.jailjudge) if r["label"] == "refusal"]
    result = {src: onset_table([r for r in rows if r["source"] == src], tok, judge) for src in dict.fromkeys(r["source"] for r in rows)}
    if a.organisms:
        from audit.forward.generate import LocalBackend
        from audit.organisms.build import cached_organism, load_organism, read_prompts

        for variant in ("base", "delayed"):
            model, otok, _ = load_organism(cached_organism("glm4_moe", variant, 0))
            prompts = read_prompts(cached_organism("glm4_moe", variant, 0), "harmful")[:48]
            comps = LocalBackend(model, otok).complete(prompts, 96, batch_size=16)
            result[f"organism glm4_moe/{variant}"] = onset_table([{"prompt": p, "completion": c.answer} for p, c in zip(prompts, comps)], tok, judge)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
