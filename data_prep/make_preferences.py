"""Preference pairs in the demo's shapes world (Stage 3, DPO): chosen = the true answer, rejected = a plausible
hallucination, as RLAIF-V's pairs contrast a faithful reply with one that invents what the image does not show.

From a directory written by data_prep/make_shapes.py (its meta.jsonl holds every image's shapes), on the images of
one split, each pair asks one question in make_shapes' own wording:

    absent    "Is there a {color} {shape}?" about an object the image does not hold: chosen "no", rejected "yes"
              (object hallucination, what POPE measures)
    present   the same question about an object it holds: chosen "yes", rejected "no" (so that "no" is not simply
              the preferred word)
    color     "What color is the {shape}?": chosen the true colour, rejected another colour
    describe  "Describe the image briefly.": chosen the true caption, rejected the caption with one extra object
              in a free cell (an invented object in a description, CHAIR's hallucination)

    DIR/preferences.json        pairs on the Stage-2 images (what configs/demo/stage3_dpo.yaml trains on)
    DIR/preferences_eval.json   pairs on the held-out eval images (reward accuracy on pairs never trained on)

Usage: ``python -m data_prep.make_preferences --data DIR [--n 2000] [--n-eval 300] [--seed 0]``. Deterministic.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from data_prep.make_shapes import COLORS, PAIRS, POSITIONS, TEMPLATES, Shape, caption

KINDS = ("absent", "present", "color", "describe")


def read_meta(data: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (data / "meta.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == split and r["shapes"]]


def as_shapes(meta: list[dict]) -> list[Shape]:
    return [Shape(s["color"], s["shape"], s["cell"], 0, 0, 0) for s in meta]


def make_pair(rng: random.Random, kind: str, shapes: list[Shape]) -> tuple[str, str, str] | None:
    """(question, chosen, rejected) of `kind` about these shapes, or None when it cannot be asked unambiguously."""
    present = [(s.color, s.shape) for s in shapes]
    if kind in ("absent", "present"):
        color, shape = rng.choice([p for p in PAIRS if p not in present] if kind == "absent" else present)
        question = rng.choice(TEMPLATES["exists"]).format(color=color, shape=shape)
        return (question, "no", "yes") if kind == "absent" else (question, "yes", "no")
    if kind == "color":
        kinds = [s for s in shapes if sum(t.shape == s.shape for t in shapes) == 1]
        if not kinds:
            return None
        s = rng.choice(kinds)
        wrong = rng.choice([c for c in COLORS if c != s.color])
        return rng.choice(TEMPLATES["color"]).format(shape=s.shape), s.color, wrong
    if kind == "describe":
        free = [c for c in range(len(POSITIONS)) if c not in {s.cell for s in shapes}]
        color, shape = rng.choice([p for p in PAIRS if p not in present])
        extra = sorted(shapes + [Shape(color, shape, rng.choice(free), 0, 0, 0)], key=lambda s: s.cell)
        return rng.choice(TEMPLATES["describe"]), caption(shapes), caption(extra)
    raise ValueError(f"unknown pair kind {kind!r}")


def make_pairs(rng: random.Random, images: list[dict], n: int, prefix: str) -> list[dict]:
    """`n` pairs, the kinds in turn, each on an image drawn at random."""
    pairs = []
    while len(pairs) < n:
        kind = KINDS[len(pairs) % len(KINDS)]
        image = rng.choice(images)
        made = make_pair(rng, kind, as_shapes(image["shapes"]))
        if made is None:
            continue
        question, chosen, rejected = made
        prompt = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        pairs.append({"id": f"{prefix}{len(pairs):05d}", "image": image["image"], "kind": kind,
                      "conversations": [{"from": "human", "value": prompt}], "chosen": chosen, "rejected": rejected})
    return pairs


def generate(data: Path, n: int = 2000, n_eval: int = 300, seed: int = 0) -> dict[str, int]:
    data = Path(data)
    rng = random.Random(seed)
    train = make_pairs(rng, read_meta(data, "stage2"), n, "pref")
    held_out = make_pairs(rng, read_meta(data, "eval"), n_eval, "pref-eval")
    (data / "preferences.json").write_text(json.dumps(train, indent=1))
    (data / "preferences_eval.json").write_text(json.dumps(held_out, indent=1))
    return {"train": len(train), "eval": len(held_out)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a directory written by data_prep.make_shapes")
    parser.add_argument("--n", type=int, default=2000, help="training pairs (Stage-2 images)")
    parser.add_argument("--n-eval", type=int, default=300, help="held-out pairs (eval images)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = generate(Path(args.data), args.n, args.n_eval, args.seed)
    print(f"{args.data}: {counts['train']} preference pairs (preferences.json), {counts['eval']} held out "
          f"(preferences_eval.json)")


if __name__ == "__main__":
    main()
