"""Evaluate a model on the demo's shapes questions, with the real image and with a blank one.

    python -m llava_sft.eval.run_shapes --model checkpoints/demo/stage2 --data data/demo --out checkpoints/demo/eval

Writes `answers.jsonl` / `answers_blind.jsonl` (LLaVA answer rows: question_id, prompt, text,
model_id, metadata), `shapes.json` (the score file `python -m llava_sft.eval.report` reads) and `metrics.json`:
    {"overall": {"accuracy", "accuracy_blind"}, "by_type": {TYPE: {"accuracy", "accuracy_blind"}}}
"Blind" asks the same questions with the image replaced by a blank canvas: the gap between the
two shows how much the model really uses the image.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava_sft.eval.run_vqa import answer_items, load_vqa
from llava_sft.eval.score import score_shapes_file
from llava_sft.generate import Answerer


def evaluate(model_dir: str, data_dir: str, out_dir: str, batch_size: int = 32, max_new_tokens: int = 16) -> dict:
    """The demo's `shapes` benchmark through the same runner (run_vqa) and scorer (score shapes) as the others."""
    data, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = load_vqa(data / "eval" / "questions.jsonl", data / "images")
    blank = data / "eval" / "blank.png"
    answerer = Answerer(model_dir)
    results = {}
    for name, file, run_items in (("accuracy", "answers.jsonl", items),
                                  ("accuracy_blind", "answers_blind.jsonl", [dict(it, image=blank) for it in items])):
        (out / file).unlink(missing_ok=True)  # a fresh evaluation, not a continuation of an older model's
        answer_items(answerer, run_items, out / file, batch_size, max_new_tokens)
        results[name] = score_shapes_file(out / file, data / "eval" / "answers.jsonl")
    metrics = {
        "overall": {k: round(v["accuracy"], 4) for k, v in results.items()},
        "by_type": {t: {k: round(results[k]["by_type"][t]["accuracy"], 4) for k in results}
                    for t in results["accuracy"]["by_type"]},
        "n": results["accuracy"]["n"],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "shapes.json").write_text(json.dumps({**results["accuracy"], "blind": results["accuracy_blind"]}, indent=2))
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
