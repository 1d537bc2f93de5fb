"""What Stage 3 (DPO) changes, measured: reward accuracy on held-out preference pairs, and object hallucination
in answers.

    python -m llava_sft.eval.preferences --model checkpoints/demo/stage3 --reference checkpoints/demo/stage2 \\
        --pairs data/demo/preferences_eval.json --images data/demo/images --out checkpoints/demo/eval3/pairs.json

* reward accuracy (TRL's rewards/accuracies on pairs never trained on): the share of pairs whose implicit reward
  beta (log pi(y_w) - log pi_ref(y_w)) exceeds the rejected reply's, the log-probs computed as in training
  (data/preference.py renders both sides with the model's template, model/dpo.py's sum over the last reply);
  per pair kind when the pairs carry one (make_preferences' "kind").
* absent-object "yes" rate (`yes_on_absent`): among the demo's existence questions whose answer is "no", the share
  answered "yes" -- POPE's measure of object hallucination (Li et al., 2023), on run_shapes' answers.
* invented objects in descriptions (`invented_objects`, `--describe DATA`): CHAIR's sentence-level measure.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from llava_sft.eval.shapes import normalize_answer


def yes_on_absent(answers_file: Path, gold_file: Path) -> dict:
    """{"rate", "n"}: the share of "yes" answers to the existence questions whose true answer is "no"."""
    gold = [json.loads(line) for line in Path(gold_file).read_text().splitlines() if line.strip()]
    absent = {int(r["question_id"]) for r in gold if r["category"] == "exists" and normalize_answer(r["answer"]) == "no"}
    answers = {int(r["question_id"]): r["text"] for r in
               map(json.loads, Path(answers_file).read_text().splitlines()) if int(r["question_id"]) in absent}
    yes = sum([w.strip(",;:") for w in normalize_answer(text).split()[:1]] == ["yes"] for text in answers.values())
    return {"rate": yes / len(absent) if absent else 0.0, "n": len(absent)}


def invented_objects(model_dir: Path, data: Path, n: int = 150, batch_size: int = 30) -> dict:
    """CHAIR-style object hallucination in descriptions (Rohrbach et al., 2018), on the demo's held-out images:
    the model describes each of the first `n` eval images ("Describe the image briefly."); {"invented": share of
    descriptions naming a colour-shape object the image does not hold, "exact": share naming exactly its objects}.
    The objects are the data's vocabularies (manifest.json) and ground truth (meta.jsonl)."""
    import re

    from PIL import Image

    from llava_sft.generate import Answerer

    data = Path(data)
    vocab = json.loads((data / "manifest.json").read_text())["vocab"]
    pattern = re.compile(r"\b({})\s+({})\b".format("|".join(vocab["color"]), "|".join(vocab["shape"])))
    meta = [r for r in map(json.loads, (data / "meta.jsonl").read_text().splitlines()) if r["split"] == "eval"][:n]
    answerer, said = Answerer(model_dir), []
    for start in range(0, len(meta), batch_size):
        part = meta[start:start + batch_size]
        images = [Image.open(data / "images" / r["image"]).convert("RGB") for r in part]
        said += answerer.answer(["Describe the image briefly."] * len(part), images, max_new_tokens=60)
    invented = exact = 0
    for record, text in zip(meta, said, strict=True):
        truth = {(s["color"], s["shape"]) for s in record["shapes"]}
        named = set(pattern.findall(text.lower()))
        invented += bool(named - truth)
        exact += named == truth
    return {"invented": invented / len(meta), "exact": exact / len(meta), "n": len(meta)}


def sequence_logps(model_dir: Path, pairs: list[dict], image_folder: Path, batch_pairs: int = 16) -> dict[str, list]:
    """{pair id: [chosen log-prob, rejected log-prob]} under the saved model at `model_dir`."""
    import torch
    from PIL import Image

    from llava_sft.data.anyres import image_token_counts
    from llava_sft.data.dataset import Collator, image_list
    from llava_sft.data.images import ImageProcessor
    from llava_sft.data.preference import normalize_record, pair_sides, tokenize_pair
    from llava_sft.data.templates import get_template
    from llava_sft.model.llava import LlavaModel

    model, tokenizer, saved = LlavaModel.from_pretrained(model_dir)
    model.text_only_anchor = "none"
    processor = ImageProcessor.from_saved(saved["image"])
    template = get_template(saved.get("template") or saved["model"]["template"], saved["model"].get("system_prompt"),
                            tokenizer=tokenizer)
    samples = []
    for record in map(normalize_record, pairs):
        names = image_list(record, record["id"])
        loaded = []
        for name in names:
            with Image.open(image_folder / name) as image:  # as the training loader (data/dataset.py)
                image.load()
                loaded.append(processor.tiles(image, len(names) == 1))
        (c_ids, c_labels), (r_ids, r_labels) = tokenize_pair(record, tokenizer, template, len(names), record["id"])
        sizes = [size for _, size, _ in loaded]
        samples.append({"id": record["id"], "chosen_ids": torch.tensor(c_ids), "chosen_labels": torch.tensor(c_labels),
                        "rejected_ids": torch.tensor(r_ids), "rejected_labels": torch.tensor(r_labels),
                        "images": torch.cat([p for p, _, _ in loaded]) if loaded else
                        torch.zeros(0, 3, processor.size, processor.size), "image_sizes": sizes,
                        "image_tokens": torch.tensor(image_token_counts(sizes, model.tokens_per_image, model.anyres)),
                        "truncated": 0})
    collate, out = Collator(tokenizer.pad_token_id, pair_sides), {}
    for start in range(0, len(samples), batch_pairs):
        batch = collate(samples[start:start + batch_pairs])
        extras = {"image_sizes": batch["image_sizes"]}
        if "image_index" in batch:
            extras["image_index"] = batch["image_index"]
        with torch.no_grad():
            logps, _ = model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"],
                             return_logps=True, **extras)
        for k, sample_id in enumerate(batch["ids"]):
            out[str(sample_id)] = [float(logps[2 * k]), float(logps[2 * k + 1])]
    return out


def reward_accuracy(model_dir: Path, reference_dir: Path, pairs_file: Path, image_folder: Path) -> dict:
    """{"accuracy", "n", "margin", "by_kind": {kind: accuracy}} of the policy at `model_dir` against its reference."""
    pairs = json.loads(Path(pairs_file).read_text())
    policy = sequence_logps(Path(model_dir), pairs, Path(image_folder))
    reference = sequence_logps(Path(reference_dir), pairs, Path(image_folder))
    wins, margins, kinds = [], [], defaultdict(list)
    for pair in pairs:
        (pc, pr), (rc, rr) = policy[str(pair["id"])], reference[str(pair["id"])]
        margin = (pc - rc) - (pr - rr)  # beta x this is TRL's rewards/margins; its sign does not depend on beta
        wins.append(margin > 0)
        margins.append(margin)
        kinds[pair.get("kind", "all")].append(margin > 0)
    return {"accuracy": sum(wins) / len(wins), "n": len(wins), "mean_log_ratio_margin": sum(margins) / len(margins),
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="the DPO-trained model directory")
    ap.add_argument("--reference", required=True, type=Path, help="the model it started from")
    ap.add_argument("--pairs", required=True, type=Path, help="held-out preference pairs (JSON)")
    ap.add_argument("--images", required=True, type=Path, help="their image folder")
    ap.add_argument("--out", required=True, type=Path, help="metrics JSON to write")
    ap.add_argument("--describe", type=Path, metavar="DATA",
                    help="also CHAIR-style invented objects in descriptions of DATA's eval images, both models")
    args = ap.parse_args(argv)
    result = reward_accuracy(args.model, args.reference, args.pairs, args.images)
    if args.describe:
        result["descriptions"] = {"model": invented_objects(args.model, args.describe),
                                  "reference": invented_objects(args.reference, args.describe)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
