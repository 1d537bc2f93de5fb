"""Evaluate a model on the demo's shapes questions, with the real image and with a blank one.

    python -m llava_sft.eval.run_shapes --model checkpoints/demo/stage2 --data data/demo --out checkpoints/demo/eval

Writes `answers.jsonl` / `answers_blind.jsonl` (LLaVA answer rows: question_id, prompt, text,
model_id, metadata) and `metrics.json`:
    {"overall": {"accuracy", "accuracy_blind"}, "by_type": {TYPE: {"accuracy", "accuracy_blind"}}}
"Blind" asks the same questions with the image replaced by a blank canvas: the gap between the
two shows how much the model really uses the image.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from llava_sft.eval.shapes import load_jsonl, score_shapes
from llava_sft.generate import Answerer


def answer_all(answerer: Answerer, questions: list[dict], image_dir: Path, blank: Image.Image | None,
               batch_size: int, max_new_tokens: int, desc: str) -> list[dict]:
    rows = []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc):
        chunk = questions[start:start + batch_size]
        images = [blank if blank is not None else Image.open(image_dir / q["image"]).convert("RGB") for q in chunk]
        texts = answerer.answer([q["text"] for q in chunk], images, max_new_tokens=max_new_tokens)
        for q, text in zip(chunk, texts):
            rows.append({"question_id": q["question_id"], "prompt": q["text"], "text": text,
                         "model_id": answerer.model_id, "metadata": {"category": q.get("category"), "blind": blank is not None}})
    return rows


def evaluate(model_dir: str, data_dir: str, out_dir: str, batch_size: int = 32, max_new_tokens: int = 16) -> dict:
    data, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    questions = load_jsonl(data / "eval" / "questions.jsonl")
    answers = load_jsonl(data / "eval" / "answers.jsonl")
    answerer = Answerer(model_dir)
    blank = Image.open(data / "eval" / "blank.png").convert("RGB")
    results = {}
    for name, blank_image in (("accuracy", None), ("accuracy_blind", blank)):
        rows = answer_all(answerer, questions, data / "images", blank_image, batch_size, max_new_tokens, name)
        file = out / ("answers.jsonl" if blank_image is None else "answers_blind.jsonl")
        file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        results[name] = score_shapes({r["question_id"]: r["text"] for r in rows}, answers)
    metrics = {
        "overall": {k: round(v["accuracy"], 4) for k, v in results.items()},
        "by_type": {t: {k: round(results[k]["by_type"][t]["accuracy"], 4) for k in results}
                    for t in results["accuracy"]["by_type"]},
        "n": results["accuracy"]["n"],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def format_table(metrics: dict) -> str:
    lines = [f"{'type':<10} {'accuracy':>9} {'blind':>9}", "-" * 30]
    for t, m in metrics["by_type"].items():
        lines.append(f"{t:<10} {m['accuracy']:>9.3f} {m['accuracy_blind']:>9.3f}")
    lines += ["-" * 30, f"{'overall':<10} {metrics['overall']['accuracy']:>9.3f} {metrics['overall']['accuracy_blind']:>9.3f}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="directory written by data_prep.make_shapes")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    metrics = evaluate(args.model, args.data, args.out, args.batch_size)
    print(format_table(metrics))
    print(f"metrics written to {Path(args.out) / 'metrics.json'}")


if __name__ == "__main__":
    main()
