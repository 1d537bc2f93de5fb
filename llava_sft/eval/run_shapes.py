"""Evaluate a model on the demo's shapes questions, with the real image and with a blank one.

    python -m llava_sft.eval.run_shapes --model checkpoints/demo/stage2 --data data/demo --out checkpoints/demo/eval

Writes `answers.jsonl` / `answers_blind.jsonl` (LLaVA answer rows: question_id, prompt, text,
model_id, metadata), `shapes.json` (the score file `python -m llava_sft.eval.report` reads) and `metrics.json`:
    {"overall": {"accuracy", "accuracy_blind"}, "by_type": {TYPE: {"accuracy", "accuracy_blind"}},
     "binding": {TYPE: {"n", "right", "another_shape", "first_shape", "neither"}},   (eval.shapes.binding_report)
     "features": {"tower" | "projector": {"cell", "color", "shape", "n"}},            (eval.shapes.feature_signal)
     "lookup": {TYPE: {"n", "chance", "layer", "head", "offset", "token", "share", "image_mass"}}}  (attention_lookup)
"features": how much of the variance of a shape's image token (tower output, then projector output) its cell,
colour and shape explain -- an answer can only copy what the token carries with weight.
"lookup": whether some attention head finds the object a question asks about: the head and question token whose
image attention puts the largest share on the asked shape's token (among the image's shapes; `chance`: what
attending to every shape alike gives).
"Blind" asks the same questions with the image replaced by a blank canvas: the gap between the
two shows how much the model really uses the image.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from llava_sft.constants import IMAGE_TOKEN_INDEX
from llava_sft.data.tokenize import tokenize_prompt
from llava_sft.eval.run_vqa import answer_items, load_vqa
from llava_sft.eval.score import score_shapes_file
from llava_sft.eval.shapes import asked_shape, binding_report, feature_signal, load_jsonl
from llava_sft.generate import Answerer


def evaluate(model_dir: str, data_dir: str, out_dir: str, batch_size: int = 32, max_new_tokens: int = 16,
             template: str | None = None, blind: bool = True) -> dict:
    """The demo's `shapes` benchmark through the same runner (run_vqa) and scorer (score shapes) as the others.
    `template` prompts with another chat template than the model was trained with; `blind=False` skips the
    blank-image pass (its keys are then absent)."""
    data, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = load_vqa(data / "eval" / "questions.jsonl", data / "images")
    blank = data / "eval" / "blank.png"
    answerer = Answerer(model_dir, template=template)
    results = {}
    passes = [("accuracy", "answers.jsonl", items)]
    if blind:
        passes.append(("accuracy_blind", "answers_blind.jsonl", [dict(it, image=blank) for it in items]))
    for name, file, run_items in passes:
        (out / file).unlink(missing_ok=True)  # a fresh evaluation, not a continuation of an older model's
        answer_items(answerer, run_items, out / file, batch_size, max_new_tokens)
        results[name] = score_shapes_file(out / file, data / "eval" / "answers.jsonl")
    metrics = {
        "overall": {k: round(v["accuracy"], 4) for k, v in results.items()},
        "by_type": {t: {k: round(results[k]["by_type"][t]["accuracy"], 4) for k in results}
                    for t in results["accuracy"]["by_type"]},
        "n": results["accuracy"]["n"],
    }
    if (data / "meta.jsonl").is_file():  # which shape's attribute the answers name, on images of 2-3 shapes
        metrics["binding"] = binding_report({r["question_id"]: r["text"] for r in load_jsonl(out / "answers.jsonl")},
                                            load_jsonl(data / "eval" / "answers.jsonl"),
                                            load_jsonl(data / "eval" / "questions.jsonl"),
                                            [m for m in load_jsonl(data / "meta.jsonl") if m["split"] == "eval"])
        signal = token_signal(answerer, data)
        if signal:
            metrics["features"] = signal
            metrics["lookup"] = attention_lookup(answerer, data)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    blind_result = {"blind": results["accuracy_blind"]} if blind else {}
    (out / "shapes.json").write_text(json.dumps({**results["accuracy"], **blind_result}, indent=2))
    return metrics


@torch.no_grad()
def token_signal(answerer: Answerer, data: Path, batch_size: int = 64) -> dict:
    """eval.shapes.feature_signal of the eval images' tokens after the frozen tower and after the projector; {} when
    the tower does not give one token per grid cell (9)."""
    meta = [m for m in load_jsonl(data / "meta.jsonl") if m["split"] == "eval" and m["shapes"]]
    model = answerer.model
    by_stage: dict[str, dict[str, list]] = {"tower": {}, "projector": {}}
    for start in range(0, len(meta), batch_size):
        chunk = meta[start:start + batch_size]
        pixels = torch.stack([answerer.processor(Image.open(data / "images" / m["image"]).convert("RGB"))
                              for m in chunk]).to(answerer.device)
        tower = model.vision_tower(pixels)
        if tower.shape[1] != 9:
            print(f"features: not measured, the tower gives {tower.shape[1]} tokens per image (the demo's grid: 9)")
            return {}
        projected = model.projector(tower.to(next(model.projector.parameters(), tower).dtype))
        for i, m in enumerate(chunk):
            by_stage["tower"][m["image"]] = tower[i].float().tolist()
            by_stage["projector"][m["image"]] = projected[i].float().tolist()
    return {stage: feature_signal(feats, meta) for stage, feats in by_stage.items()}


@torch.no_grad()
def attention_lookup(answerer: Answerer, data: Path, last: int = 8, min_mass: float = 0.2) -> dict:
    """Per colour / shape / position question type, on the eval images of 2-3 shapes (eval.shapes.asked_shape):
    the attention of the prompt's last `last` tokens (the question's end, where its identifying words are, to the
    token that predicts the answer) on the 9 image tokens, in every layer and head. For each (layer, head, token)
    the share of its attention on the shapes that goes to the asked one, averaged over the questions; reported is
    the best one among those that put at least `min_mass` of their attention on the image. `offset` counts back
    from the token that predicts the answer (0) and `token` is that token in the type's last question (the
    templates end alike). Read with eager attention, which returns the weights; the model's own is restored."""
    model, tokenizer = answerer.model, answerer.tokenizer
    if getattr(model, "anyres", None) is not None:
        print("lookup: not measured, an AnyRes model's images are tiled (the demo's grid: 9 tokens of one view)")
        return {}
    meta = {m["image"]: m["shapes"] for m in load_jsonl(data / "meta.jsonl") if m["split"] == "eval"}
    answers = {int(a["question_id"]): a["answer"] for a in load_jsonl(data / "eval" / "answers.jsonl")}
    sums: dict[str, list] = {}  # category -> [share sum [L,H,K], mass sum [L,H,K], chance sum, n, tokens]
    previous = model.attn_implementation
    model.llm.set_attn_implementation("eager")
    try:
        for q in load_jsonl(data / "eval" / "questions.jsonl"):
            shapes = meta.get(q["image"], [])
            target = asked_shape(q["category"], q["text"], answers[int(q["question_id"])], shapes)
            if len(shapes) < 2 or target is None:
                continue
            tokens = tokenize_prompt(answerer.prompt_for(q["text"]), tokenizer)
            ids = torch.tensor([tokens], device=answerer.device)
            pixels = answerer.processor(Image.open(data / "images" / q["image"]).convert("RGB"))[None]
            batch = model.embed(ids, torch.ones_like(ids), pixels.to(answerer.device))
            if batch.inputs_embeds.shape[1] != len(tokens) + 8:  # the demo's grid: 9 tokens for the one placeholder
                print(f"lookup: not measured, an image gives {batch.inputs_embeds.shape[1] - len(tokens) + 1} tokens "
                      f"(the demo's grid: 9)")
                return {}
            out = model.llm(inputs_embeds=batch.inputs_embeds, output_attentions=True, use_cache=False)
            start = tokens.index(IMAGE_TOKEN_INDEX)
            weights = torch.stack([a[0, :, -last:, start:start + 9].float() for a in out.attentions])  # [L,H,K,9]
            cells = [s["cell"] for s in shapes]
            on_shapes = weights[..., cells].sum(-1).clamp_min(1e-12)
            entry = sums.setdefault(q["category"], [0.0, 0.0, 0.0, 0, None])
            entry[0] = entry[0] + weights[..., target["cell"]] / on_shapes
            entry[1] = entry[1] + weights.sum(-1)
            entry[2] += 1 / len(shapes)
            entry[3] += 1
            names = tokenizer.convert_ids_to_tokens([max(t, 0) for t in tokens[-last:]])  # the image's id is < 0
            entry[4] = [name if t >= 0 else "<image>" for t, name in zip(tokens[-last:], names, strict=True)]
    finally:
        model.llm.set_attn_implementation(previous)
    report = {}
    for category, (share, mass, chance, n, tokens) in sorted(sums.items()):
        share, mass = share / n, mass / n
        found = best_lookup(share, mass, min_mass)
        if found is None:  # no head looks at the image: nothing to name (image_mass: the most any one puts there)
            report[category] = {"n": n, "chance": round(chance / n, 4), "layer": None, "head": None,
                                "offset": None, "token": None, "share": None,
                                "image_mass": round(float(mass.max()), 4), "min_mass": min_mass}
            continue
        layer, head, k = found
        report[category] = {"n": n, "chance": round(chance / n, 4), "layer": layer, "head": head,
                            "offset": k - (last - 1), "token": tokens[k].lstrip("\u2581"),
                            "share": round(float(share[layer, head, k]), 4),
                            "image_mass": round(float(mass[layer, head, k]), 4)}
    return report


def best_lookup(share: torch.Tensor, mass: torch.Tensor, min_mass: float) -> tuple[int, int, int] | None:
    """(layer, head, token) of the largest `share` [L, H, K] among those whose image attention `mass` is at least
    `min_mass` (a head that barely looks at the image would score a large share of almost nothing); None when
    none does."""
    if not bool((mass >= min_mass).any()):
        return None
    share = torch.where(mass >= min_mass, share, torch.full_like(share, -1.0))
    return tuple(int(i) for i in torch.unravel_index(share.argmax(), share.shape))


def format_table(metrics: dict) -> str:
    lines = [f"{'type':<10} {'accuracy':>9} {'blind':>9}", "-" * 30]
    for t, m in metrics["by_type"].items():
        lines.append(f"{t:<10} {m['accuracy']:>9.3f} {m.get('accuracy_blind', float('nan')):>9.3f}")
    overall = metrics["overall"]
    lines += ["-" * 30, f"{'overall':<10} {overall['accuracy']:>9.3f} {overall.get('accuracy_blind', float('nan')):>9.3f}"]
    for t, b in metrics.get("binding", {}).items():
        lines.append(f"{t} on 2-3 shapes (n {b['n']}): right {b['right']:.2f}, another shape's {b['another_shape']:.2f} "
                     f"(the first shape's {b['first_shape']:.2f}), neither {b['neither']:.2f}")
    for stage, share in metrics.get("features", {}).items():
        lines.append(f"{stage} tokens of the shapes (n {share['n']}): variance explained by cell {share['cell']:.3f} "
                     f"(chance {8 / max(share['n'] - 1, 1):.3f}), colour {share['color']:.3f}, shape {share['shape']:.3f}")
    for t, b in metrics.get("lookup", {}).items():
        if b["layer"] is None:
            lines.append(f"look-up, {t} on 2-3 shapes (n {b['n']}): no head puts {b['min_mass']} of its attention on "
                         f"the image (the most: {b['image_mass']:.2f})")
            continue
        lines.append(f"look-up, {t} on 2-3 shapes (n {b['n']}): layer {b['layer']} head {b['head']}, at the question "
                     f"token {b['offset']} from the answer ('{b['token']}' in the last one), gives the asked shape "
                     f"{b['share']:.2f} of its attention on the shapes (chance {b['chance']:.2f}; "
                     f"{b['image_mass']:.2f} of it on the image)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="directory written by data_prep.make_shapes")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--template", default=None, help="prompt with this chat template instead of the model's own")
    ap.add_argument("--no-blind", action="store_true", help="skip the blank-image pass")
    args = ap.parse_args()
    metrics = evaluate(args.model, args.data, args.out, args.batch_size, template=args.template,
                       blind=not args.no_blind)
    print(format_table(metrics))
    print(f"metrics written to {Path(args.out) / 'metrics.json'}")


if __name__ == "__main__":
    main()
