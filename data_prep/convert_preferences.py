"""Public visual preference sets -> our preference records (llava_sft/data/preference.py), with a count of what was
dropped and why.

    python -m data_prep.convert_preferences --format rlaif_v --input RLAIF-V-Dataset_000.parquet \\
        --out data/rlaif_v.json --image-dir data/rlaif_v_images

Formats, each from its published field layout (the source named; tests/test_preference_data.py writes records in
each layout and converts them):

  rlaif_v     openbmb/RLAIF-V-Dataset (Hugging Face dataset card, "Data fields"): parquet rows of `ds_name`,
              `image` ({"bytes", "path"}), `question`, `chosen`, `rejected`, `origin_dataset`, `origin_split`, `idx`,
              `image_path`. The image bytes are written to --image-dir as <idx>.<format>; the question gets a
              leading "<image>\\n" (the rows hold the bare question).
  vlfeedback  MMInstruction/VLFeedback (vlfeedback_80k.jsonl; dataset card and VLFeedback.py): `id`, `prompt`,
              `models`, `img_path`, `completions` = [{"model", "response", "annotations": {"Helpfulness",
              "Visual Faithfulness", "Ethical Considerations": {"Rating": "1".."5", "Rationale"}}}]. A response's
              score is the mean of its aspect ratings (as Silkie's run_dpo.py); `--pairs best_worst` (default) pairs
              the best with the worst response (the first in file order where scores tie at the top or bottom, as
              LLaVA-NeXT's conversion does), `--pairs all` every two responses with different scores (Silkie's
              380K pairs). Equal best and worst scores: dropped, counted as ties; a rating that is not a number
              drops that response (counted), as Silkie's code skips it.
  povid       YiyangAiLab/POVID_preference_data_for_VLLMs (github YiyangZhou/POVID README, train_dpo.py): LLaVA
              records {id, image, conversations, rejected_conversations}, the last gpt turn of each the chosen and
              the rejected reply. Turns before it that differ between the two: dropped, counted ("diverging
              prefix": the pair would compare two prompts).
  onevision   LLaVA-NeXT's DPO format (docs/LLaVA_OneVision_Chat.md, llava/train/train_dpo.py): {id, image,
              prompt, chosen, rejected} (+ "answer", unused). As train_dpo.py: every "<image>" is taken out of the
              prompt and one "<image>\\n" put first -- here only when the record has an image (train_dpo.py adds it to
              text-only records too and feeds a blank image; our loader needs as many placeholders as images).
"""
from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter
from pathlib import Path

IMAGE = "<image>"
FORMATS = ("rlaif_v", "vlfeedback", "povid", "onevision")


def read_rows(path: Path) -> list[dict]:
    """Rows of a .parquet (pyarrow), .jsonl or .json file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise SystemExit(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
        return pq.read_table(path).to_pylist()
    text = path.read_text()
    if text.lstrip()[:1] == "[":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def with_image_first(text: str, has_image: bool) -> str:
    text = text.replace(IMAGE, "").strip()
    return f"{IMAGE}\n{text}" if has_image else text


def record(sample_id, image, prompt: str, chosen: str, rejected: str) -> dict:
    out = {"id": str(sample_id)}
    if image:
        out["image"] = image
    out.update(conversations=[{"from": "human", "value": with_image_first(prompt, bool(image))}], chosen=chosen,
               rejected=rejected)
    return out


# ------------------------------------------------------------------------------------------------ formats
def convert_rlaif_v(rows, dropped: Counter, image_dir: Path | None = None) -> list[dict]:
    out = []
    for n, row in enumerate(rows):
        sample_id = row.get("idx") or f"rlaif-v-{n}"
        image = row.get("image")
        if isinstance(image, dict) and image.get("bytes"):
            if image_dir is None:
                raise SystemExit("rlaif_v rows carry their image bytes: pass --image-dir to write them")
            name = f"{sample_id}{_suffix(image['bytes'], image.get('path'))}"
            image_dir.mkdir(parents=True, exist_ok=True)
            (image_dir / name).write_bytes(image["bytes"])
            path = name
        else:
            path = (image or {}).get("path") if isinstance(image, dict) else image or row.get("image_path")
        if not path:
            dropped["no image"] += 1
            continue
        out.append(record(sample_id, path, row["question"], row["chosen"], row["rejected"]))
    return out


def _suffix(data: bytes, name: str | None) -> str:
    if name and Path(name).suffix:
        return Path(name).suffix
    return ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"


def convert_vlfeedback(rows, dropped: Counter, pairs: str = "best_worst") -> list[dict]:
    out = []
    for row in rows:
        scored = []
        for k, completion in enumerate(row.get("completions") or []):
            try:
                ratings = [float(a["Rating"]) for a in completion["annotations"].values()]
            except (KeyError, TypeError, ValueError):
                dropped["response with a rating that is not a number"] += 1
                continue
            scored.append((sum(ratings) / len(ratings), k, completion["response"]))
        if len(scored) < 2:
            dropped["fewer than two rated responses"] += 1
            continue
        if pairs == "all":
            made = [(a, b) if a[0] > b[0] else (b, a) for a, b in itertools.combinations(scored, 2) if a[0] != b[0]]
            dropped["tie (equal scores)"] += sum(a[0] == b[0] for a, b in itertools.combinations(scored, 2))
        else:
            best = max(scored, key=lambda s: (s[0], -s[1]))  # the first of the best
            worst = min(scored, key=lambda s: (s[0], s[1]))  # the first of the worst
            if best[0] == worst[0]:
                dropped["tie (equal scores)"] += 1
                continue
            made = [(best, worst)]
        for chosen, rejected in made:
            suffix = "" if pairs != "all" else f"-{chosen[1]}-{rejected[1]}"
            out.append(record(f"{row['id']}{suffix}", row.get("img_path") or row.get("image"), row["prompt"],
                              chosen[2], rejected[2]))
    return out


def convert_povid(rows, dropped: Counter) -> list[dict]:
    out = []
    for n, row in enumerate(rows):
        chosen, rejected = row.get("conversations") or [], row.get("rejected_conversations") or []
        if not chosen or not rejected or chosen[-1].get("from") != "gpt" or rejected[-1].get("from") != "gpt":
            dropped["not a conversation ending with a gpt reply on both sides"] += 1
            continue
        if chosen[:-1] != rejected[:-1]:
            dropped["diverging prefix"] += 1
            continue
        item = {"id": str(row.get("id", f"povid-{n}"))}
        if row.get("image"):
            item["image"] = row["image"]
        item.update(conversations=chosen[:-1], chosen=chosen[-1]["value"], rejected=rejected[-1]["value"])
        out.append(item)
    return out


def convert_onevision(rows, dropped: Counter) -> list[dict]:
    out = []
    for n, row in enumerate(rows):
        if not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
            dropped["missing prompt, chosen or rejected"] += 1
            continue
        out.append(record(row.get("id", f"ov-{n}"), row.get("image"), row["prompt"], row["chosen"], row["rejected"]))
    return out


def convert(fmt: str, rows: list[dict], image_dir: Path | None = None, pairs: str = "best_worst"):
    """-> (records, Counter of dropped rows by reason)."""
    dropped: Counter = Counter()
    if fmt == "rlaif_v":
        records = convert_rlaif_v(rows, dropped, image_dir)
    elif fmt == "vlfeedback":
        records = convert_vlfeedback(rows, dropped, pairs)
    elif fmt == "povid":
        records = convert_povid(rows, dropped)
    elif fmt == "onevision":
        records = convert_onevision(rows, dropped)
    else:
        raise ValueError(f"unknown format {fmt!r}: {', '.join(FORMATS)}")
    same = [r for r in records if r["chosen"].strip() == r["rejected"].strip()]
    if same:  # the loader refuses them by name; dropping them here is what the user would do
        dropped["chosen and rejected the same"] += len(same)
        records = [r for r in records if r["chosen"].strip() != r["rejected"].strip()]
    return records, dropped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--input", required=True, type=Path, help=".parquet, .jsonl or .json")
    parser.add_argument("--out", required=True, type=Path, help="the preference JSON to write")
    parser.add_argument("--image-dir", type=Path, help="rlaif_v: where the embedded images are written")
    parser.add_argument("--pairs", choices=("best_worst", "all"), default="best_worst", help="vlfeedback pairing")
    args = parser.parse_args(argv)
    records, dropped = convert(args.format, read_rows(args.input), args.image_dir, args.pairs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1, ensure_ascii=False))
    print(f"{args.out}: {len(records)} preference pairs from {args.input}"
          + "".join(f"\n  dropped {n}: {reason}" for reason, n in sorted(dropped.items())))


if __name__ == "__main__":
    main()
