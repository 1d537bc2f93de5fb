"""Answer a LLaVA question file with a saved model: the LLaVA-1.5 evaluation protocol, batched,
resumable and shardable.

    python -m llava_sft.eval.run_vqa --model DIR --questions Q.jsonl --image-folder IMAGES --answers OUT.jsonl
    # over 8 GPUs, then merge in chunk order:
    for k in 0..7: CUDA_VISIBLE_DEVICES=k python -m llava_sft.eval.run_vqa ... --num-chunks 8 --chunk-idx k \
        --answers OUT/chunk_k.jsonl &
    python -m llava_sft.eval.run_vqa --merge OUT.jsonl OUT/chunk_0.jsonl ... OUT/chunk_7.jsonl

Protocol (LLaVA's model_vqa_loader / model_vqa_science / model_vqa_mmbench): the model's saved chat
template (vicuna_v1 for LLaVA-1.5) and image preprocessing, "<image>\\n" + question, greedy decoding,
`max_new_tokens` 128 (1024 for `--mode longform`: LLaVA-Bench, MM-Vet). Batches are left-padded and
decoded with the KV cache; batched greedy answers equal unbatched ones (tested).

Modes:
  vqa       JSONL rows {question_id, image, text, category?} (VQAv2, GQA, VizWiz, TextVQA, POPE, MME, SEED...)
  longform  the same, max_new_tokens 1024
  scienceqa LLaVA's ScienceQA JSON ([{id, image?, conversations}]): the human turn without "<image>", plus
            "\\nAnswer with the option's letter from the given choices directly."; text-only questions get
            no image
  mmbench   MMBench TSV (index, question, hint, A-D, category, base64 image): hint + question + "A. ..."
            lines + the single-letter instruction (Chinese for --lang cn); `--all-rounds` asks every circular
            rotation of the options (round_id 0..n-1), as circular evaluation needs
Answer rows: {question_id, prompt, text, answer_id, model_id, metadata} (+ round_id, options, option_char
for mmbench). Rows already in OUT are skipped, so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import math
import sys
import uuid
from pathlib import Path

from PIL import Image
from tqdm import tqdm

SINGLE_LETTER = {"en": "Answer with the option's letter from the given choices directly.", "cn": "请直接回答选项字母。"}
MAX_NEW_TOKENS = {"vqa": 128, "scienceqa": 128, "mmbench": 128, "longform": 1024}


# ------------------------------------------------------------------------- question files -> items
# An item: {"key", "question_id", "prompt" (question text, no image token), "image" (path | PIL | None), "extra"}
def load_vqa(path: Path, image_folder: Path) -> list[dict]:
    items = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        q = json.loads(line)
        image = image_folder / q["image"] if q.get("image") else None
        items.append({"key": str(q["question_id"]), "question_id": q["question_id"], "prompt": q["text"],
                      "image": image, "extra": {}})
    return items


def load_scienceqa(path: Path, image_folder: Path, single_pred_prompt: bool = True) -> list[dict]:
    items = []
    for q in json.loads(path.read_text()):
        text = q["conversations"][0]["value"].replace("<image>", "").strip()
        if single_pred_prompt:
            text = text + "\n" + SINGLE_LETTER["en"]
        image = image_folder / q["image"] if q.get("image") else None
        if image is not None:  # recorded in the prompt, as the reference does (its IMG subset is found by it)
            text = "<image>\n" + text
        items.append({"key": str(q["id"]), "question_id": q["id"], "prompt": text, "image": image, "extra": {}})
    return items


def _missing(value) -> bool:
    return value is None or str(value).strip() == "" or str(value).strip().lower() == "nan"


def load_mmbench(path: Path, lang: str = "en", all_rounds: bool = True) -> list[dict]:
    csv.field_size_limit(sys.maxsize)  # base64 images
    letters = "ABCD"
    items = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            options = [row[c] for c in letters if c in row and not _missing(row[c])]
            chars = list(letters[:len(options)])
            image = Image.open(io.BytesIO(base64.b64decode(row["image"]))).convert("RGB")
            for round_id in range(len(options) if all_rounds else 1):
                question = row["question"]
                if not _missing(row.get("hint")):
                    question = row["hint"] + "\n" + question
                for char, option in zip(letters, options, strict=False):
                    question += "\n" + char + ". " + option
                items.append({"key": f"{row['index']}/{round_id}", "question_id": int(row["index"]),
                              "prompt": question, "image": image, "instruction": SINGLE_LETTER[lang],
                              "extra": {"round_id": round_id, "options": list(options), "option_char": list(chars)}})
                options, chars = options[1:] + options[:1], chars[1:] + chars[:1]
    return items


def row_key(row: dict) -> str:
    return f"{row['question_id']}/{row['round_id']}" if "round_id" in row else str(row["question_id"])


def get_chunk(items: list, num_chunks: int, chunk_idx: int) -> list:
    """LLaVA's split: ceil-sized contiguous chunks, so merging in chunk order restores the file order."""
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx {chunk_idx} is not in [0, {num_chunks})")
    size = math.ceil(len(items) / num_chunks) if items else 1
    return items[chunk_idx * size:(chunk_idx + 1) * size]


# ------------------------------------------------------------------------------------- which model answered
def model_stamp(model_dir: str | Path) -> dict:
    """Which model made a set of answers: its resolved path and a fingerprint of its weights (each weight file's
    name, size, first and last MiB, and the model config), so that a retrained model at the same path differs."""
    root = Path(model_dir).resolve()
    digest = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")):
        size = f.stat().st_size
        digest.update(f"{f.relative_to(root)}:{size}".encode())
        with f.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read())
    return {"model": str(root), "weights_sha256": digest.hexdigest()[:16]}


def stamp_file(answers: Path) -> Path:
    return answers.with_name(answers.name + ".model.json")


def check_stamp(answers: Path, stamp: dict) -> None:
    """Resuming `answers` is only for the model that wrote them (issue: a second model folder also named `stage2`
    got the first one's POPE score without a word)."""
    has_rows = answers.is_file() and any(line.strip() for line in answers.read_text().splitlines())
    sidecar = stamp_file(answers)
    if has_rows:
        written = json.loads(sidecar.read_text()) if sidecar.is_file() else None
        if written != stamp:
            who = f"{written['model']} (weights {written['weights_sha256']})" if written else "an unrecorded model"
            raise SystemExit(f"{answers} holds answers made by {who}, not {stamp['model']} (weights "
                             f"{stamp['weights_sha256']}): use another results directory, or delete the file to "
                             f"answer again")
    answers.parent.mkdir(parents=True, exist_ok=True)
    sidecar.write_text(json.dumps(stamp))


# ------------------------------------------------------------------------------------- running
def answer_items(answerer, items: list[dict], out_file: Path, batch_size: int = 16, max_new_tokens: int = 128,
                 temperature: float = 0.0, stamp: dict | None = None) -> int:
    """Answer the items not yet in `out_file` (appending, one flush per batch); returns how many were answered.
    `stamp` (model_stamp): resuming a file that another model wrote is refused."""
    if stamp is not None:
        check_stamp(out_file, stamp)
    done = set()
    if out_file.is_file():
        done = {row_key(json.loads(line)) for line in out_file.read_text().splitlines() if line.strip()}
    todo = [it for it in items if it["key"] not in done]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with out_file.open("a") as f:
        for start in tqdm(range(0, len(todo), batch_size), desc=f"answering {out_file.name}", disable=not todo):
            batch = todo[start:start + batch_size]
            images = [Image.open(it["image"]).convert("RGB") if isinstance(it["image"], Path) else it["image"]
                      for it in batch]
            questions = [it["prompt"] + ("\n" + it["instruction"] if it.get("instruction") else "") for it in batch]
            texts = answerer.answer(questions, images, max_new_tokens=max_new_tokens, temperature=temperature)
            for it, text in zip(batch, texts, strict=True):
                row = {"question_id": it["question_id"], **({"round_id": it["extra"]["round_id"]}
                                                            if "round_id" in it["extra"] else {}),
                       "prompt": it["prompt"], "text": text, "answer_id": uuid.uuid4().hex,
                       "model_id": answerer.model_id, "metadata": {}}
                row.update({k: v for k, v in it["extra"].items() if k != "round_id"})
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
    return len(todo)


def merge_answers(out_file: Path, chunk_files: list[Path]) -> int:
    """Concatenate chunk answer files in the given (chunk) order, keeping the first row per question."""
    seen, rows = set(), []
    for chunk in chunk_files:
        for line in Path(chunk).read_text().splitlines():
            if line.strip() and (key := row_key(json.loads(line))) not in seen:
                seen.add(key)
                rows.append(line)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("".join(r + "\n" for r in rows))
    stamps = {stamp_file(Path(c)).read_text() for c in chunk_files if stamp_file(Path(c)).is_file()}
    if len(stamps) > 1:
        raise SystemExit(f"the chunks {[str(c) for c in chunk_files]} were answered by different models")
    if stamps:
        stamp_file(out_file).write_text(stamps.pop())
    return len(rows)


def load_items(mode: str, questions: Path, image_folder: Path | None, lang: str = "en", all_rounds: bool = True) -> list[dict]:
    if mode in ("vqa", "longform"):
        return load_vqa(questions, image_folder or Path("."))
    if mode == "scienceqa":
        return load_scienceqa(questions, image_folder or Path("."))
    if mode == "mmbench":
        return load_mmbench(questions, lang, all_rounds)
    raise ValueError(f"unknown --mode {mode!r}; choose from {sorted(MAX_NEW_TOKENS)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="saved model directory")
    ap.add_argument("--questions", type=Path, help="question file (JSONL; JSON for scienceqa; TSV for mmbench)")
    ap.add_argument("--image-folder", type=Path, default=None)
    ap.add_argument("--answers", type=Path, required=True, help="answers JSONL (appended to: resumable)")
    ap.add_argument("--mode", default="vqa", choices=sorted(MAX_NEW_TOKENS))
    ap.add_argument("--lang", default="en", choices=sorted(SINGLE_LETTER), help="mmbench instruction language")
    ap.add_argument("--all-rounds", action=argparse.BooleanOptionalAction, default=True,
                    help="mmbench: ask every circular rotation of the options")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--num-chunks", type=int, default=1)
    ap.add_argument("--chunk-idx", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="CHUNK", help="merge these chunk files into --answers")
    args = ap.parse_args(argv)
    if args.merge:
        print(f"{merge_answers(args.answers, args.merge)} answers -> {args.answers}")
        return
    if not args.model or not args.questions:
        ap.error("--model and --questions are required (unless --merge)")
    from llava_sft.generate import Answerer

    items = get_chunk(load_items(args.mode, args.questions, args.image_folder, args.lang, args.all_rounds),
                      args.num_chunks, args.chunk_idx)
    answerer = Answerer(args.model, args.device)
    n = answer_items(answerer, items, args.answers, args.batch_size,
                     args.max_new_tokens or MAX_NEW_TOKENS[args.mode], args.temperature, stamp=model_stamp(args.model))
    print(f"{n} new answers ({len(items) - n} already there) -> {args.answers}")


if __name__ == "__main__":
    main()
