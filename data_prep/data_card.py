"""A data card for LLaVA-format JSON: what a dataset is made of, at a glance.

    python -m data_prep.data_card llava_v1_5_mix665k.json [MORE.json ...] [--png card.png] [--json card.json] \\
        [--top 20] [--near-dup 0.8]

Printed as tables, saved as a PNG sheet of histograms (`--png`, default: next to the first input,
`<name>.card.png`) and optionally as JSON:
  * samples by source and by kind: the record's "source" field (set by `data_prep.mix_data`), else
    the first directory of its image path ("coco", "gqa", "ocr_vqa", ...), "(no dir)" for bare file
    names, "text-only" without image; by kind when records carry a "kind" (`data_prep.gen_instruct`);
  * rounds (question-answer pairs) per sample and answer length in words (mean, p50, p90, p99, max);
  * the share of text-only samples;
  * the most frequent questions (human turns without `<image>`, whitespace collapsed) and the share of
    distinct ones, a measure of diversity;
  * exact and near duplicates (same image(s) and the same or nearly the same conversation, see
    `data_prep/dedup.py`), with example ids.
Records that are not {"conversations": [...]} are counted as bad and left out of the statistics.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from data_prep.dedup import find_duplicates
from llava_sft.constants import IMAGE_PLACEHOLDER


def source_of(record: dict) -> str:
    if record.get("source"):
        return str(record["source"])
    image = record.get("image")
    if not image:
        return "text-only"
    first = image[0] if isinstance(image, list) else str(image)
    return first.split("/")[0] if "/" in first else "(no dir)"


def question_text(value: str) -> str:
    return " ".join(value.replace(IMAGE_PLACEHOLDER, " ").split())


def _dist(values: list[int]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {"mean": round(float(a.mean()), 2), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": int(a.max())}


def data_card(records: list, top: int = 20, near_dup: float = 0.8) -> tuple[dict, dict]:
    """(card, raw values for the plots)."""
    good = [r for r in records if isinstance(r, dict) and isinstance(r.get("conversations"), list)]
    groups: dict[str, dict[str, list]] = {"source": defaultdict(list), "kind": defaultdict(list)}
    rounds, answer_words, questions = [], [], Counter()
    for r in good:
        turns = [t for t in r["conversations"] if isinstance(t, dict) and isinstance(t.get("value"), str)]
        n_rounds = sum(t.get("from") == "gpt" for t in turns)
        words = [len(t["value"].split()) for t in turns if t.get("from") == "gpt"]
        rounds.append(n_rounds)
        answer_words += words
        questions.update(question_text(t["value"]) for t in turns if t.get("from") == "human")
        for name, key in (("source", source_of(r)), ("kind", r.get("kind"))):
            if key is not None:
                groups[name][str(key)].append((n_rounds, words, not r.get("image")))
    n_questions = sum(questions.values())
    duplicates = find_duplicates(good, near_dup)
    dup_examples = {how: [[good[i].get("id"), good[j].get("id")] for i, (h, j) in sorted(duplicates.items())
                          if h == how][:10] for how in ("exact", "near")}

    def table(members: dict[str, list]) -> dict:
        return {k: {"samples": len(v), "share": round(len(v) / max(1, len(good)), 4),
                    "text_only": sum(t for _, _, t in v), "mean_rounds": round(float(np.mean([n for n, _, _ in v])), 2),
                    "mean_answer_words": round(float(np.mean([w for _, ws, _ in v for w in ws] or [0])), 1)}
                for k, v in sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0]))}

    text_only = sum(not r.get("image") for r in good)
    card = {
        "samples": len(good), "bad_records": len(records) - len(good),
        "text_only": text_only, "text_only_share": round(text_only / max(1, len(good)), 4),
        "by_source": table(groups["source"]), "by_kind": table(groups["kind"]),
        "rounds": _dist(rounds), "answer_words": _dist(answer_words),
        "questions": {"total": n_questions, "distinct": len(questions),
                      "distinct_share": round(len(questions) / max(1, n_questions), 4),
                      "most_frequent": [[q, n] for q, n in questions.most_common(top)]},
        "duplicates": {"exact": sum(h == "exact" for h, _ in duplicates.values()),
                       "near": sum(h == "near" for h, _ in duplicates.values()),
                       "near_threshold": near_dup if near_dup <= 1 else None, "examples": dup_examples},
    }
    return card, {"rounds": rounds, "answer_words": answer_words}


def format_card(card: dict, name: str) -> str:
    lines = [f"{name}: {card['samples']} samples, {card['text_only']} text-only ({card['text_only_share']:.1%})"
             + (f", {card['bad_records']} bad records left out" if card["bad_records"] else "")]
    for title, rows in (("source", card["by_source"]), ("kind", card["by_kind"])):
        if not rows:
            continue
        w = max(len(title), *(len(k) for k in rows))
        lines.append(f"{title:<{w}}  {'samples':>9}  {'share':>6}  {'text-only':>9}  {'rounds':>6}  {'answer words':>12}")
        lines += [f"{k:<{w}}  {v['samples']:>9}  {v['share']:>6.1%}  {v['text_only']:>9}  {v['mean_rounds']:>6.2f}  "
                  f"{v['mean_answer_words']:>12.1f}" for k, v in rows.items()]
    for key, title in (("rounds", "rounds per sample"), ("answer_words", "answer words")):
        d = card[key]
        if d:
            lines.append(f"{title}: mean {d['mean']}, p50 {d['p50']:g}, p90 {d['p90']:g}, p99 {d['p99']:g}, max {d['max']}")
    q = card["questions"]
    lines.append(f"questions: {q['total']} human turns, {q['distinct']} distinct ({q['distinct_share']:.1%}); "
                 "most frequent:")
    lines += [f"  {n:>8}  {n / max(1, q['total']):>6.1%}  {text[:100]}" for text, n in q["most_frequent"]]
    d = card["duplicates"]
    near = f"near {d['near']} (Jaccard >= {d['near_threshold']})" if d["near_threshold"] is not None else "near: not checked"
    lines.append(f"duplicates: exact {d['exact']}, {near}")
    for how in ("exact", "near"):
        if d["examples"][how]:
            lines.append(f"  {how}: " + ", ".join(f"{i} = {j}" for i, j in d["examples"][how]))
    return "\n".join(lines)


def plot_card(card: dict, values: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    src = card["by_source"]
    axes[0, 0].barh(list(src)[::-1], [v["samples"] for v in src.values()][::-1])
    axes[0, 0].set_title("samples by source")
    if values["rounds"]:
        top = max(values["rounds"])
        axes[0, 1].hist(values["rounds"], bins=np.arange(min(values["rounds"]) - 0.5, top + 1.5, 1))
    axes[0, 1].set_title("rounds per sample")
    if values["answer_words"]:
        axes[1, 0].hist(values["answer_words"], bins=50, log=True)
    axes[1, 0].set_title("answer length (words, log count)")
    common = card["questions"]["most_frequent"][:15]
    axes[1, 1].barh([q[:45] + ("..." if len(q) > 45 else "") for q, _ in common][::-1], [n for _, n in common][::-1])
    axes[1, 1].tick_params(axis="y", labelsize=7)
    axes[1, 1].set_title("most frequent questions")
    fig.suptitle(f"{title}: {card['samples']} samples, {card['text_only_share']:.1%} text-only, "
                 f"{card['duplicates']['exact']} exact / {card['duplicates']['near']} near duplicates")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m data_prep.data_card", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, nargs="+", help="LLaVA-format JSON file(s), read as one dataset")
    ap.add_argument("--png", type=Path, help="histogram sheet (default: <first input>.card.png)")
    ap.add_argument("--json", type=Path, help="also write the card as JSON here")
    ap.add_argument("--top", type=int, default=20, help="most frequent questions listed")
    ap.add_argument("--near-dup", type=float, default=0.8, help="Jaccard threshold of near duplicates (>1: off)")
    args = ap.parse_args(argv)
    records = []
    for path in args.data:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise SystemExit(f"data_card: {path}: expected a JSON list of LLaVA records")
        records += data
    card, values = data_card(records, args.top, args.near_dup)
    name = " + ".join(p.name for p in args.data)
    print(format_card(card, name))
    png = args.png or args.data[0].with_suffix(".card.png")
    plot_card(card, values, png, name)
    print(f"-> {png}")
    if args.json:
        args.json.write_text(json.dumps(card, indent=2, ensure_ascii=False), encoding="utf-8")
    return card


if __name__ == "__main__":
    main()
