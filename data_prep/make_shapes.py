"""Synthetic "shapes" dataset for the embedded LLaVA demo.

Renders small images holding 1-3 coloured shapes on a 3x3 grid (one shape per
cell, so nothing overlaps) and writes LLaVA-format data for both training
stages plus a scored eval set::

    DIR/images/NNNNNN.png       all images; the splits use disjoint images
    DIR/stage1.json             LLaVA-Pretrain style captioning
    DIR/stage2.json             LLaVA-Instruct style multi-turn QA (+ text-only)
    DIR/stage2_warmup.json      with --n-stage2-warmup: Stage-2 samples on one-shape images (demo Stage 2, pass 1)
    DIR/eval/questions.jsonl    LLaVA question file (color/shape/count/position/exists)
    DIR/eval/answers.jsonl      ground truth for llava_sft.eval.shapes.score_shapes
    DIR/eval/blank.png          empty canvas for the 'blind' baseline
    DIR/meta.jsonl              per-image ground truth (colour, shape, cell, centre, size)
    DIR/corpus.txt              every question/answer text, one per line (+ the prose)
    DIR/prose.txt               with --n-prose: plain prose about fresh scenes, the base LLM's pretraining text
    DIR/manifest.json           arguments, vocabularies and counts

Usage: ``python -m data_prep.make_shapes --out DIR [--seed 0] ...``.
The output is byte-for-byte deterministic for fixed arguments.
"""
from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUND = (245, 245, 245)
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 0),
    "purple": (140, 40, 180),
    "orange": (250, 130, 0),
}
SHAPES = ("circle", "square", "triangle")
PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)
# Cell index (row-major over the 3x3 grid) -> canonical position answer.
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
EVAL_TYPES = ("color", "shape", "count", "position", "exists")
STAGE2_TYPES = EVAL_TYPES + ("describe",)
# --ablation-sets (scripts/demo_ablations.sh, the LIMA row): the full Stage-2 set, N_SMALL samples drawn from it
# (every question type), and as many fresh samples as the full set asking only TWO_TYPES (quantity without diversity)
N_SMALL, TWO_TYPES = 1000, ("color", "shape")
SUPERSAMPLE = 4  # draw at 4x and box-downsample for anti-aliased edges
SIZE_RANGE = (0.6, 0.8)  # shape extent as a fraction of the cell size

CAPTION_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the image.",
    "Write a terse but informative summary of the picture.",
    "Share a concise interpretation of the image provided.",
)
# Every question ends with the words that identify its object ("... the circle?", "... a red circle?"):
# a tiny from-scratch LLM then finds the query at a fixed distance from the answer.
TEMPLATES = {
    "color": ("What color is the {shape}?", "Which color is the {shape}?"),
    "shape": ("What shape is {color}?", "Which shape is {color}?"),
    "count": ("How many shapes are there?", "How many objects are in the image?", "Count the shapes."),
    "count_kind": ("How many {shape}s?", "Count the {shape}s."),
    "position": ("Where is the {color} {shape}?", "Where is a {color} {shape}?"),
    "exists": ("Is there a {color} {shape}?", "Can you see a {color} {shape}?"),
    "describe": ("Describe the image briefly.", "What is in the image?", "Describe the picture."),
}
COLOR_MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("blue", "red"): "purple"}
SIDES = {"circle": "0", "triangle": "3", "square": "4"}


@dataclass(frozen=True)
class Shape:
    """One drawn shape; the box is in supersampled pixels."""

    color: str
    shape: str
    cell: int
    x0: int
    y0: int
    extent: int

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def meta(self) -> dict:
        half = self.extent / 2
        centre = [(self.x0 + half) / SUPERSAMPLE, (self.y0 + half) / SUPERSAMPLE]
        return {"color": self.color, "shape": self.shape, "position": self.position,
                "cell": self.cell, "center": centre, "size": self.extent / SUPERSAMPLE}


def place(rng: random.Random, image_size: int, cell: int, color: str, shape: str) -> Shape:
    """Put a shape of random size inside ``cell`` with a small random offset."""
    cell_px = image_size * SUPERSAMPLE / 3
    extent = int(rng.uniform(*SIZE_RANGE) * cell_px)
    slack = cell_px - extent
    row, col = divmod(cell, 3)
    x0 = int(col * cell_px + slack * rng.uniform(0.2, 0.8))
    y0 = int(row * cell_px + slack * rng.uniform(0.2, 0.8))
    return Shape(color, shape, cell, x0, y0, extent)


def sample_layout(rng: random.Random, image_size: int, count_weights: dict[int, float] | None = None) -> list[Shape]:
    """1-3 shapes in distinct cells with distinct (colour, shape) pairs, in reading order. The number of shapes is
    uniform, or drawn with ``count_weights`` ({1: w1, 2: w2, 3: w3})."""
    n = rng.randint(1, 3) if count_weights is None else rng.choices((1, 2, 3), [count_weights.get(k, 0.0) for k in (1, 2, 3)])[0]
    cells = sorted(rng.sample(range(9), n))
    pairs = rng.sample(PAIRS, n)
    return [place(rng, image_size, cell, c, s) for cell, (c, s) in zip(cells, pairs, strict=True)]


def render(shapes: list[Shape], image_size: int) -> Image.Image:
    big = image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in shapes:
        x1, y1 = s.x0 + s.extent, s.y0 + s.extent
        fill = COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse((s.x0, s.y0, x1, y1), fill=fill)
        elif s.shape == "square":
            draw.rectangle((s.x0, s.y0, x1, y1), fill=fill)
        else:
            draw.polygon([((s.x0 + x1) / 2, s.y0), (x1, y1), (s.x0, y1)], fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def caption(shapes: list[Shape]) -> str:
    """Canonical description, e.g. 'a red circle at the top left and a blue square in the center.'"""
    def where(pos: str) -> str:
        if pos == "center":
            return "in the center"
        return f"on the {pos}" if pos in ("left", "right") else f"at the {pos}"

    parts = [f"{'an' if s.color[0] in 'aeiou' else 'a'} {s.color} {s.shape} {where(s.position)}"
             for s in shapes]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def moved_caption(rng: random.Random, shapes: list[dict]) -> str:
    """The caption of the same objects in other places: a hard negative for contrastive pretraining that a
    bag of words cannot tell from the true caption (NegCLIP, Yuksekgonul et al., ICLR 2023: CLIP learns little
    of where things are or which attribute goes with which object unless its batches make it). Two or three
    shapes trade cells (every one moves; the set of positions stays); a single shape moves to another cell.
    ``shapes`` are meta.jsonl records."""
    cells = [s["cell"] for s in shapes]
    if len(cells) == 1:
        new = [rng.choice([c for c in range(9) if c != cells[0]])]
    else:
        shift = rng.randrange(1, len(cells))  # a cyclic shift by 1..n-1 moves every shape
        new = cells[shift:] + cells[:shift]
    moved = sorted((Shape(s["color"], s["shape"], c, 0, 0, 0) for s, c in zip(shapes, new, strict=True)),
                   key=lambda s: s.cell)
    return caption(moved)


def ask(rng: random.Random, qtype: str, shapes: list[Shape],
        yes: bool | None = None) -> tuple[str, str] | None:
    """A (question, answer) pair of ``qtype``, or None if it cannot be asked unambiguously."""
    def fill(key: str, **kw: str) -> str:
        return rng.choice(TEMPLATES[key]).format(**kw)

    kinds = Counter(s.shape for s in shapes)
    colors = Counter(s.color for s in shapes)
    if qtype == "color":
        pool = [s for s in shapes if kinds[s.shape] == 1]
        if not pool:
            return None
        s = rng.choice(pool)
        return fill("color", shape=s.shape), s.color
    if qtype == "shape":
        pool = [s for s in shapes if colors[s.color] == 1]
        if not pool:
            return None
        s = rng.choice(pool)
        return fill("shape", color=s.color), s.shape
    if qtype == "count":
        if rng.random() < 0.5:
            return fill("count"), str(len(shapes))
        kind = rng.choice(SHAPES)
        return fill("count_kind", shape=kind), str(kinds[kind])
    if qtype == "position":
        s = rng.choice(shapes)
        return fill("position", color=s.color, shape=s.shape), s.position
    if qtype == "exists":
        present = [(s.color, s.shape) for s in shapes]
        yes = rng.random() < 0.5 if yes is None else yes
        pool = present if yes else [p for p in PAIRS if p not in present]
        color, shape = rng.choice(pool)
        return fill("exists", color=color, shape=shape), "yes" if yes else "no"
    if qtype == "describe":
        return fill("describe"), caption(shapes)
    raise ValueError(f"unknown question type {qtype!r}")


def text_only_qa(rng: random.Random) -> tuple[str, str]:
    """A question that needs no image: arithmetic, colour mixing or a shape fact."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if rng.random() < 0.5:
            return f"What is {a} plus {b}?", str(a + b)
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", str(a - b)
    if kind == 1:
        pair, result = rng.choice(sorted(COLOR_MIXES.items()))
        first, second = rng.sample(pair, 2)
        return f"What color do you get by mixing {first} and {second}?", result
    shape, sides = rng.choice(sorted(SIDES.items()))
    return f"How many sides does a {shape} have?", sides


def prose(rng: random.Random, shapes: list[Shape]) -> str:
    """A paragraph of plain prose about one scene, for pretraining the demo's base LLM (no chat format): its
    caption, then facts about colours, shapes, positions, counts and absent objects, some as question and answer."""
    def where(pos: str) -> str:
        return "in the center" if pos == "center" else (f"on the {pos}" if pos in ("left", "right")
                                                         else f"at the {pos}")

    kinds = Counter(s.shape for s in shapes)
    colors = Counter(s.color for s in shapes)
    n = len(shapes)
    facts = [f"There {'is one shape' if n == 1 else f'are {n} shapes'} in this picture."]
    for s in shapes:
        facts.append(rng.choice((f"The {s.color} {s.shape} is {where(s.position)}.",
                                 f"Where is the {s.color} {s.shape}? {s.position}.")))
        if kinds[s.shape] == 1:
            facts.append(rng.choice((f"The {s.shape} is {s.color}.", f"What color is the {s.shape}? {s.color}.")))
        if colors[s.color] == 1:
            facts.append(rng.choice((f"The {s.color} shape is a {s.shape}.",
                                     f"What shape is {s.color}? A {s.shape}.")))
    present = {(s.color, s.shape) for s in shapes}
    color, shape = rng.choice([p for p in PAIRS if p not in present])
    facts.append(rng.choice((f"There is no {color} {shape}.", f"Is there a {color} {shape}? No.")))
    s = rng.choice(shapes)
    facts.append(f"Is there a {s.color} {s.shape}? Yes.")
    facts.append(f"How many {s.shape}s are there? {kinds[s.shape]}.")
    rng.shuffle(facts)
    text = caption(shapes)
    return " ".join([text[0].upper() + text[1:]] + facts)


def prose_lines(rng: random.Random, n: int, image_size: int) -> list[str]:
    """`n` scene paragraphs (layouts drawn afresh, never rendered) and, one in ten lines, facts of the world."""
    lines = []
    for _ in range(n):
        if rng.random() < 0.1:
            question, answer = text_only_qa(rng)
            lines.append(f"{question} {answer}.")
        else:
            lines.append(prose(rng, sample_layout(rng, image_size)))
    return lines


def with_image(question: str, rng: random.Random) -> str:
    return f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"


def conversation(qas: list[tuple[str, str]]) -> list[dict]:
    turns = []
    for question, answer in qas:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


class ImageWriter:
    """Renders layouts to sequentially numbered PNGs and records their metadata."""

    def __init__(self, out: Path, image_size: int, prefix: str = "", shape_scale: float = 1.0):
        self.dir = out / "images"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.image_size, self.prefix, self.shape_scale = image_size, prefix, shape_scale
        self.meta: list[dict] = []

    def write(self, shapes: list[Shape], split: str) -> str:
        name = f"{self.prefix}{len(self.meta):06d}.png"
        if self.shape_scale != 1.0:  # each shape shrunk about its centre: the same layouts and questions, smaller
            shapes = [replace(s, x0=s.x0 + int(s.extent * (1 - self.shape_scale) / 2),
                              y0=s.y0 + int(s.extent * (1 - self.shape_scale) / 2),
                              extent=int(s.extent * self.shape_scale)) for s in shapes]
        render(shapes, self.image_size).save(self.dir / name, format="PNG")
        self.meta.append({"image": name, "split": split, "shapes": [s.meta() for s in shapes]})
        return name


def make_stage1(rng: random.Random, n: int, images: ImageWriter) -> list[dict]:
    samples = []
    for _ in range(n):
        shapes = sample_layout(rng, images.image_size)
        name = images.write(shapes, "stage1")
        prompt = with_image(rng.choice(CAPTION_INSTRUCTIONS), rng)
        samples.append({"id": name[:-4], "image": name,
                        "conversations": conversation([(prompt, caption(shapes))])})
    return samples


def ask_rounds(rng: random.Random, shapes: list[Shape], rounds: int, type_counts: Counter,
               weights: dict[str, float] | None = None) -> list[tuple[str, str]]:
    qas = []
    types = list(STAGE2_TYPES)
    w = [1.0] * len(types) if weights is None else [weights.get(t, 0.0) for t in types]
    tries = 0
    while len(qas) < rounds and tries < 200:
        tries += 1
        qtype = rng.choices(types, w)[0]
        qa = ask(rng, qtype, shapes)
        if qa and qa[0] not in {q for q, _ in qas}:
            qas.append(qa)
            type_counts[qtype] += 1
    if not qas:
        raise ValueError(f"no askable question type among weights {weights}")
    return qas


def make_stage2(rng: random.Random, n: int, text_only_frac: float, images: ImageWriter,
                type_counts: Counter, max_rounds: int = 3, scene_frac: float = 0.0,
                min_rounds: int = 1, image_first: float = 0.5, weights: dict | None = None,
                count_weights: dict[int, float] | None = None) -> list[dict]:
    text_only = set(rng.sample(range(n), round(n * text_only_frac)))
    samples = []
    for i in range(n):
        rounds = rng.randint(min_rounds, max_rounds)
        if i in text_only:
            if rng.random() < scene_frac:
                shapes = sample_layout(rng, images.image_size, count_weights)
                qas = ask_rounds(rng, shapes, rounds, Counter())
                qas[0] = (f"{caption(shapes)}\n{qas[0][0]}", qas[0][1])
                type_counts["text_scene"] += len(qas)
            else:
                qas = [text_only_qa(rng) for _ in range(min(rounds, 2))]
                type_counts["text_only"] += len(qas)
            samples.append({"id": f"text_{i:06d}", "conversations": conversation(qas)})
            continue
        shapes = sample_layout(rng, images.image_size, count_weights)
        qas = ask_rounds(rng, shapes, rounds, type_counts, weights)
        first = rng.random() < image_first
        qas[0] = (f"<image>\n{qas[0][0]}" if first else f"{qas[0][0]}\n<image>", qas[0][1])
        name = images.write(shapes, "stage2")
        samples.append({"id": name[:-4], "image": name, "conversations": conversation(qas)})
    return samples


def make_eval(rng: random.Random, n: int, images: ImageWriter) -> tuple[list[dict], list[dict]]:
    """Single-question eval items, types balanced and exists answers alternating yes/no."""
    jobs = [(EVAL_TYPES[i % len(EVAL_TYPES)], (i // len(EVAL_TYPES)) % 2 == 0) for i in range(n)]
    rng.shuffle(jobs)
    questions, answers = [], []
    for qid, (qtype, yes) in enumerate(jobs):
        qa = None
        while qa is None:
            shapes = sample_layout(rng, images.image_size)
            qa = ask(rng, qtype, shapes, yes=yes)
        name = images.write(shapes, "eval")
        questions.append({"question_id": qid, "image": name, "text": qa[0], "category": qtype})
        answers.append({"question_id": qid, "answer": qa[1], "category": qtype})
    return questions, answers


def corpus_lines(stage1: list[dict], stage2: list[dict], questions: list[dict],
                 answers: list[dict]) -> list[str]:
    texts = [t["value"] for s in stage1 + stage2 for t in s["conversations"]]
    texts += [q["text"] for q in questions] + [a["answer"] for a in answers]
    return [" ".join(t.replace("<image>", " ").split()) for t in texts]


def parse_weights(spec: str, flag: str, allowed: tuple[str, ...]) -> dict[str, float] | None:
    """``"a=1,b=0.5"`` -> {"a": 1.0, "b": 0.5} for ``flag``; empty -> None (the default mix). An unknown name, a
    weight that is not a number >= 0, or all weights 0 is an error naming the flag: a misspelt name would
    otherwise weigh 0 and silently drop what it meant to weight."""
    if not spec:
        return None
    weights = {}
    for item in spec.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in allowed:
            raise ValueError(f"{flag}: {item!r} is not NAME=WEIGHT with NAME one of {', '.join(allowed)}")
        try:
            weights[key] = float(value)
        except ValueError:
            raise ValueError(f"{flag}: weight {value!r} of {key} is not a number") from None
    if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
        raise ValueError(f"{flag} {spec!r}: weights must be >= 0 and not all 0")
    return weights


def parse_count_weights(spec: str) -> dict[int, float] | None:
    """``"1=0.5,2=1,3=1"`` -> {1: 0.5, 2: 1.0, 3: 1.0}; empty -> None (uniform over 1-3 shapes)."""
    weights = parse_weights(spec, "--stage2-shape-counts", ("1", "2", "3"))
    return None if weights is None else {int(k): w for k, w in weights.items()}


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def generate(out: Path, seed: int = 0, image_size: int = 64, n_stage1: int = 3000,
             n_stage2: int = 3000, n_eval: int = 300, text_only_frac: float = 0.1, max_rounds: int = 3,
             scene_frac: float = 0.0, min_rounds: int = 1, image_first: float = 0.5,
             type_weights: str = "", n_prose: int = 0, ablation_sets: bool = False,
             stage2_shape_counts: str = "", n_stage2_warmup: int = 0, shape_scale: float = 1.0) -> dict:
    """Write the whole dataset under ``out`` and return the manifest."""
    if image_size < 32:
        raise ValueError("image_size must be >= 32 for shapes to stay distinguishable")
    if not 0.0 <= text_only_frac < 1.0:
        raise ValueError("text_only_frac must be in [0, 1)")
    if not 0.1 <= shape_scale <= 1.0:
        raise ValueError(f"--shape-scale must be in [0.1, 1] (a fraction of the usual shape size), got {shape_scale}")
    if n_stage2_warmup < 0:
        raise ValueError(f"--n-stage2-warmup must be >= 0 (0: no warm-up set), got {n_stage2_warmup}")
    args = {"seed": seed, "image_size": image_size, "n_stage1": n_stage1, "n_stage2": n_stage2,
            "n_eval": n_eval, "text_only_frac": text_only_frac, "max_rounds": max_rounds, "min_rounds": min_rounds,
            "scene_frac": scene_frac, "image_first": image_first, "type_weights": type_weights, "n_prose": n_prose,
            "ablation_sets": ablation_sets, "stage2_shape_counts": stage2_shape_counts,
            "n_stage2_warmup": n_stage2_warmup, "shape_scale": shape_scale}
    count_weights = parse_count_weights(stage2_shape_counts)
    type_weights_by_name = parse_weights(type_weights, "--type-weights", STAGE2_TYPES)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    images = ImageWriter(out, image_size, shape_scale=shape_scale)
    stage2_types: Counter = Counter()
    # One generator per split, so e.g. the eval content does not depend on --n-stage1.
    stage1 = make_stage1(random.Random(f"{seed}-stage1"), n_stage1, images)
    stage2 = make_stage2(random.Random(f"{seed}-stage2"), n_stage2, text_only_frac, images,
                         stage2_types, max_rounds, scene_frac, min_rounds, image_first,
                         type_weights_by_name, count_weights)
    questions, answers = make_eval(random.Random(f"{seed}-eval"), n_eval, images)
    extra_sets = {}
    if ablation_sets:  # after the main sets, own generators and image names: those stay byte-identical
        extra_sets["stage2_1k.json"] = random.Random(f"{seed}-small").sample(stage2, min(N_SMALL, len(stage2)))
        writer = ImageWriter(out, image_size, prefix="twotypes_", shape_scale=shape_scale)
        extra_sets["stage2_two_types.json"] = make_stage2(
            random.Random(f"{seed}-two-types"), n_stage2, text_only_frac, writer, Counter(), max_rounds, scene_frac,
            min_rounds, image_first, {t: 1.0 for t in TWO_TYPES}, count_weights)
        images.meta += writer.meta
    if n_stage2_warmup:  # one shape per image: the first pass of the demo's Stage 2 (scripts/demo.sh)
        writer = ImageWriter(out, image_size, prefix="warmup_", shape_scale=shape_scale)
        extra_sets["stage2_warmup.json"] = make_stage2(
            random.Random(f"{seed}-warmup"), n_stage2_warmup, text_only_frac, writer, Counter(), max_rounds,
            scene_frac, min_rounds, image_first, type_weights_by_name, {1: 1.0})
        images.meta += writer.meta

    write_json(out / "stage1.json", stage1)
    write_json(out / "stage2.json", stage2)
    for name, samples in extra_sets.items():
        write_json(out / name, samples)
    write_jsonl(out / "eval" / "questions.jsonl", questions)
    write_jsonl(out / "eval" / "answers.jsonl", answers)
    Image.new("RGB", (image_size, image_size), BACKGROUND).save(out / "eval" / "blank.png")
    write_jsonl(out / "meta.jsonl", images.meta)
    lines = corpus_lines(stage1, stage2, questions, answers)
    if n_prose:  # the base LLM's pretraining text (data_prep/pretrain_base.py); the tokenizer learns it too
        prose_text = prose_lines(random.Random(f"{seed}-prose"), n_prose, image_size)
        (out / "prose.txt").write_text("\n".join(prose_text) + "\n")
        lines += prose_text
    (out / "corpus.txt").write_text("\n".join(lines) + "\n")

    manifest = {
        "args": args,
        "vocab": {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS),
                  "exists": ["yes", "no"], "count": ["0", "1", "2", "3"]},
        "counts": {
            "images": len(images.meta),
            "stage1": len(stage1),
            "stage2": {"samples": len(stage2),
                       "text_only": sum("image" not in s for s in stage2),
                       "turns_by_type": dict(sorted(stage2_types.items()))},
            "eval": {"questions": len(questions),
                     "by_type": dict(sorted(Counter(q["category"] for q in questions).items()))},
            "corpus_lines": len(lines),
            **({"ablation_sets": {name: len(samples) for name, samples in extra_sets.items()}} if extra_sets else {}),
        },
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n-stage1", type=int, default=3000)
    parser.add_argument("--n-stage2", type=int, default=3000)
    parser.add_argument("--n-eval", type=int, default=300)
    parser.add_argument("--text-only-frac", type=float, default=0.1)
    parser.add_argument("--max-rounds", type=int, default=3, help="question/answer rounds per stage-2 sample: 1..N")
    parser.add_argument("--scene-frac", type=float, default=0.0,
                        help="share of text-only Stage-2 samples that describe a scene in words and ask about it")
    parser.add_argument("--min-rounds", type=int, default=1, help="fewest question/answer rounds per stage-2 sample")
    parser.add_argument("--image-first", type=float, default=0.5,
                        help="probability that <image> precedes the first stage-2 question (else it follows)")
    parser.add_argument("--n-prose", type=int, default=0,
                        help="scene paragraphs of plain prose for pretraining the base LLM (DIR/prose.txt)")
    parser.add_argument("--ablation-sets", action="store_true",
                        help=f"also write stage2_1k.json ({N_SMALL} samples of stage2.json) and stage2_two_types.json "
                             f"(as many samples, {' and '.join(TWO_TYPES)} questions only) for scripts/demo_ablations.sh")
    parser.add_argument("--n-stage2-warmup", type=int, default=0,
                        help="also write stage2_warmup.json: this many Stage-2 samples whose images hold one shape "
                             "each (the first pass of the demo's Stage 2); the other files stay byte-identical")
    parser.add_argument("--type-weights", default="",
                        help="stage-2 question type weights, e.g. color=1,exists=1.5,describe=0.5 (default: equal)")
    parser.add_argument("--stage2-shape-counts", default="",
                        help="weights of 1, 2 and 3 shapes per Stage-2 image, e.g. 1=0.5,2=1,3=1 (default: equal); "
                             "Stage 1 and the eval set stay uniform")
    parser.add_argument("--shape-scale", type=float, default=1.0,
                        help="shapes at this fraction of their usual size, same layouts and questions (the AnyRes "
                             "ablation's detail set: larger canvases, small shapes)")
    kwargs = vars(parser.parse_args(argv))
    manifest = generate(kwargs.pop("out"), **kwargs)
    print(json.dumps(manifest["counts"], indent=1))


if __name__ == "__main__":
    main()
