"""Concept-balanced caption filtering (the CC3M-595K method of LLaVA's Stage-1 data).

    python -m data_prep.filter_concepts --data cc3m_chat.json --out cc3m_balanced.json \\
        [--extractor auto|rule|spacy] [--min-freq 3] [--cap 100] [--seed 0] [--report report.json]

Input: a LLaVA-format JSON list (the caption is the first "gpt" turn, as in LLaVA-CC3M-Pretrain
chat.json or blip_laion_cc_sbu_558k.json) or a JSONL file with a "caption" field per line. Output: the
selected records, unchanged and in input order, in the input's format. Records without a caption are
skipped and counted.

Method (`balanced_select`, independent of the extractor):
1. extract the noun phrases ("concepts") of every caption (`data_prep/concepts.py`: spaCy noun
   chunks when installed, else a rule-based extractor) and count, for each concept, the captions
   containing it;
2. concepts in fewer than --min-freq captions are rare and ignored, so a caption whose concepts are
   all rare (or which has none) is never selected;
3. going through the frequent concepts from the least to the most frequent (ties by name), each
   concept brings its captions into the subset until --cap of its captions are in it: captions
   already selected for rarer concepts count, the rest are drawn at random (seeded) among its
   captions not yet selected. Rare concepts are kept whole, very frequent ones are bounded, so the
   subset covers many concepts evenly.

The report (printed, and as JSON with --report) gives the concept coverage before and after: distinct
concepts, frequent concepts covered, captions per concept (max / p50 / p90), the top concepts.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from data_prep.concepts import make_extractor


def concept_counts(phrases: list[list[str]]) -> Counter:
    """Captions per concept (a concept counted once per caption)."""
    return Counter(p for ps in phrases for p in set(ps))


def balanced_select(phrases: list[list[str]], min_freq: int = 3, cap: int = 100, seed: int = 0) -> list[int]:
    """Indices (sorted) of the selected captions; `phrases[i]` are the concepts of caption i."""
    counts = concept_counts(phrases)
    captions_of: dict[str, list[int]] = defaultdict(list)
    for i, ps in enumerate(phrases):
        for p in dict.fromkeys(ps):
            captions_of[p].append(i)
    rng = random.Random(seed)
    selected: set[int] = set()
    for concept in sorted((c for c in counts if counts[c] >= min_freq), key=lambda c: (counts[c], c)):
        idx = captions_of[concept]
        have = sum(i in selected for i in idx)
        if have >= cap:
            continue
        remaining = [i for i in idx if i not in selected]
        selected.update(rng.sample(remaining, min(cap - have, len(remaining))))
    return sorted(selected)


def _dist(values) -> dict:
    if not len(values):
        return {"max": 0, "p50": 0, "p90": 0}
    a = np.asarray(list(values))
    return {"max": int(a.max()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90))}


def _top(counts: Counter, n: int) -> list[list]:
    return [[c, k] for c, k in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def coverage_report(phrases: list[list[str]], selected: list[int], min_freq: int, cap: int, top: int = 10) -> dict:
    before, after = concept_counts(phrases), concept_counts([phrases[i] for i in selected])
    frequent = {c for c, n in before.items() if n >= min_freq}
    return {
        "captions": {"before": len(phrases), "after": len(selected),
                     "without_concepts": sum(not ps for ps in phrases),
                     "only_rare_concepts": sum(bool(ps) and all(before[p] < min_freq for p in ps) for ps in phrases)},
        "min_freq": min_freq, "cap": cap,
        "concepts": {"before": len(before), "after": len(after)},
        "frequent_concepts": {"before": len(frequent), "covered_after": len(frequent & set(after)),
                              "coverage": round(len(frequent & set(after)) / max(1, len(frequent)), 4)},
        "captions_per_frequent_concept": {"before": _dist([before[c] for c in frequent]),
                                          "after": _dist([after.get(c, 0) for c in frequent])},
        "top_concepts": {"before": _top(before, top), "after": _top(after, top)},
    }


def format_report(report: dict) -> str:
    c, k, f = report["captions"], report["concepts"], report["frequent_concepts"]
    b, a = report["captions_per_frequent_concept"]["before"], report["captions_per_frequent_concept"]["after"]
    rows = [("", "before", "after"),
            ("captions", c["before"], c["after"]),
            ("distinct concepts", k["before"], k["after"]),
            (f"concepts in >= {report['min_freq']} captions", f["before"], f["covered_after"]),
            ("captions per such concept: max", b["max"], a["max"]),
            ("                           p50", b["p50"], a["p50"]),
            ("                           p90", b["p90"], a["p90"])]
    w = max(len(str(r[0])) for r in rows)
    lines = [f"{r[0]:<{w}}  {r[1]!s:>10}  {r[2]!s:>10}" for r in rows]
    lines.append(f"dropped: {c['without_concepts']} captions without any noun phrase, {c['only_rare_concepts']} with "
                 f"only rare ones; frequent-concept coverage {f['coverage']:.1%} (cap {report['cap']})")
    for when in ("before", "after"):
        lines.append(f"top concepts {when}: " + ", ".join(f"{p} {n}" for p, n in report["top_concepts"][when]))
    return "\n".join(lines)


def read_captions(path: Path) -> tuple[list, list[str | None], str]:
    """(records, caption per record or None, 'json' | 'jsonl')."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        caps = [r.get("caption") if isinstance(r, dict) else None for r in records]
        return records, [c if isinstance(c, str) and c.strip() else None for c in caps], "jsonl"
    records = json.loads(text)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA records (or a .jsonl file with 'caption')")
    caps = []
    for r in records:
        turns = r.get("conversations") if isinstance(r, dict) else None
        gpt = [t.get("value") for t in turns or [] if isinstance(t, dict) and t.get("from") == "gpt"]
        caps.append(gpt[0] if gpt and isinstance(gpt[0], str) and gpt[0].strip() else None)
    return records, caps, "json"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m data_prep.filter_concepts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="LLaVA JSON, or JSONL with a 'caption' per line")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--extractor", default="auto", choices=("auto", "rule", "spacy"))
    ap.add_argument("--spacy-model", default="en_core_web_sm")
    ap.add_argument("--workers", type=int, default=1, help="spaCy processes")
    ap.add_argument("--min-freq", type=int, default=3, help="concepts in fewer captions are rare")
    ap.add_argument("--cap", type=int, default=100, help="captions per concept at most (selected for it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", type=Path, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    try:
        records, captions, fmt = read_captions(args.data)
        extractor_name, extract = make_extractor(args.extractor, args.spacy_model, args.workers)
    except ValueError as e:
        raise SystemExit(f"filter_concepts: {e}") from None
    usable = [i for i, c in enumerate(captions) if c is not None]
    print(f"filter_concepts: {len(usable)} captions, extractor {extractor_name}", file=sys.stderr)
    phrases = extract([captions[i] for i in usable])
    picked = balanced_select(phrases, args.min_freq, args.cap, args.seed)
    selected = [usable[j] for j in picked]
    report = coverage_report(phrases, picked, args.min_freq, args.cap)
    report.update({"data": str(args.data), "out": str(args.out), "extractor": extractor_name, "seed": args.seed,
                   "skipped": {"record without a caption": len(records) - len(usable)}})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = [records[i] for i in selected]
    if fmt == "jsonl":
        args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    else:
        args.out.write_text(json.dumps(kept, indent=1, ensure_ascii=False), encoding="utf-8")
    if args.report:
        args.report.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(format_report(report))
    if report["skipped"]["record without a caption"]:
        print(f"skipped: {report['skipped']['record without a caption']} record(s) without a caption")
    print(f"-> {args.out}: {len(kept)} of {len(records)} records")
    return report


if __name__ == "__main__":
    main()
