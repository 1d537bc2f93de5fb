"""Tests for the synthetic shapes dataset (data_prep.make_shapes) and its scorer.

The generator runs as a subprocess (exactly as documented) on a small config;
answers are checked against an independent oracle over ``meta.jsonl`` and the
rendered pixels, not against the generator's own helpers.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_sft.eval.shapes import (
    asked_shape,
    binding_report,
    feature_signal,
    load_jsonl,
    normalize_answer,
    score_shapes,
    variance_share,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = {"--n-stage1": 60, "--n-stage2": 200, "--n-eval": 50, "--text-only-frac": 0.1}
IMAGE_SIZE = 64
# Independent notion of what each colour name should look like.
REFERENCE_RGB = {
    "red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255),
    "yellow": (255, 220, 0), "purple": (128, 0, 160), "orange": (255, 140, 0),
}
SHAPE_WORDS = ("circle", "square", "triangle")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")


def generate(out: Path, seed: int = 0, *extra: str) -> Path:
    args = [str(x) for kv in SMALL.items() for x in kv]
    subprocess.run(
        [sys.executable, "-m", "data_prep.make_shapes", "--out", str(out), "--seed", str(seed),
         "--image-size", str(IMAGE_SIZE), *args, *extra],
        cwd=REPO, check=True, capture_output=True, timeout=120,
    )
    return out


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    out = generate(tmp_path_factory.mktemp("shapes"))
    return {
        "root": out,
        "stage1": json.loads((out / "stage1.json").read_text()),
        "stage2": json.loads((out / "stage2.json").read_text()),
        "questions": load_jsonl(out / "eval" / "questions.jsonl"),
        "answers": load_jsonl(out / "eval" / "answers.jsonl"),
        "meta": {m["image"]: m for m in load_jsonl(out / "meta.jsonl")},
        "manifest": json.loads((out / "manifest.json").read_text()),
    }


def oracle(question: str, shapes: list[dict]) -> str | None:
    """The answer implied by the image metadata, or None for a description request."""
    q = question.replace("<image>", "").strip()
    colors = [c for c in REFERENCE_RGB if re.search(rf"\b{c}\b", q)]
    kinds = [k for k in SHAPE_WORDS if re.search(rf"\b{k}s?\b", q)]
    pairs = {(s["color"], s["shape"]): s for s in shapes}
    if q.startswith(("Is there", "Can you see")):
        return "yes" if (colors[0], kinds[0]) in pairs else "no"
    if q.startswith(("How many", "Count")):
        if kinds:
            return str(sum(s["shape"] == kinds[0] for s in shapes))
        return str(len(shapes))
    if q.startswith(("Where", "In which part")):
        return pairs[(colors[0], kinds[0])]["position"]
    if "color" in q:
        (match,) = [s for s in shapes if s["shape"] == kinds[0]]  # must be unambiguous
        return match["color"]
    if "shape" in q:
        (match,) = [s for s in shapes if s["color"] == colors[0]]
        return match["shape"]
    return None


def assert_caption_matches(text: str, shapes: list[dict]) -> None:
    assert text.endswith(".")
    mentioned = re.findall(r"\b(?:circle|square|triangle)\b", text)
    assert len(mentioned) == len(shapes)
    for s in shapes:
        assert re.search(rf"\b{s['color']} {s['shape']} (at|on|in) the {s['position']}\b", text), text


def image_samples(data: dict) -> list[dict]:
    return [s for s in data["stage1"] + data["stage2"] if "image" in s]


# --------------------------------------------------------------------------- generator


def test_deterministic(tmp_path):
    first = read_tree(generate(tmp_path / "a"))
    second = read_tree(generate(tmp_path / "b"))
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)
    other = read_tree(generate(tmp_path / "c", seed=1))
    assert other["stage1.json"] != first["stage1.json"]


def test_layout_and_manifest(data):
    root, manifest = data["root"], data["manifest"]
    counts = manifest["counts"]
    n_images = len(list((root / "images").glob("*.png")))
    assert n_images == counts["images"] == len(data["meta"])
    assert counts["stage1"] == len(data["stage1"]) == SMALL["--n-stage1"]
    assert counts["stage2"]["samples"] == len(data["stage2"]) == SMALL["--n-stage2"]
    assert counts["eval"]["questions"] == len(data["questions"]) == SMALL["--n-eval"]
    blank = np.asarray(Image.open(root / "eval" / "blank.png").convert("RGB"))
    sample = Image.open(root / "images" / data["questions"][0]["image"])
    assert blank.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and sample.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert (blank == blank[0, 0]).all() and blank.min() >= 230  # uniform light background


def test_disjoint_images(data):
    stage1 = {s["image"] for s in data["stage1"]}
    stage2 = {s["image"] for s in data["stage2"] if "image" in s}
    evals = {q["image"] for q in data["questions"]}
    assert len(stage1) == len(data["stage1"]) and len(evals) == len(data["questions"])
    assert not (stage1 & stage2 or stage1 & evals or stage2 & evals)
    assert stage1 | stage2 | evals == set(data["meta"])
    for split, names in (("stage1", stage1), ("stage2", stage2), ("eval", evals)):
        assert {data["meta"][n]["split"] for n in names} == {split}


def test_image_token_matches_image_key(data):
    for sample in data["stage1"] + data["stage2"]:
        turns = sample["conversations"]
        total = sum(t["value"].count("<image>") for t in turns)
        if "image" not in sample:
            assert total == 0
            continue
        first = turns[0]["value"]
        assert total == first.count("<image>") == 1
        assert first.startswith("<image>\n") or first.endswith("\n<image>")
    assert not any("<image>" in q["text"] for q in data["questions"])
    placements = Counter(s["conversations"][0]["value"].startswith("<image>") for s in data["stage1"])
    assert placements[True] > 0 and placements[False] > 0


def test_roles_alternate(data):
    for sample in data["stage1"] + data["stage2"]:
        roles = [t["from"] for t in sample["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2) and roles
    assert all(len(s["conversations"]) == 2 for s in data["stage1"])
    assert {len(s["conversations"]) // 2 for s in data["stage2"] if "image" in s} == {1, 2, 3}


def test_layouts_are_valid(data):
    for meta in data["meta"].values():
        shapes = meta["shapes"]
        assert 1 <= len(shapes) <= 3
        assert len({s["cell"] for s in shapes}) == len(shapes)
        assert len({(s["color"], s["shape"]) for s in shapes}) == len(shapes)
        for s in shapes:
            assert s["position"] == POSITIONS[s["cell"]]
            assert 0.15 <= s["size"] / IMAGE_SIZE <= 0.3


def test_pixels_match_metadata(data):
    reference = {name: np.array(rgb, dtype=float) for name, rgb in REFERENCE_RGB.items()}
    cell = IMAGE_SIZE / 3
    for name, meta in data["meta"].items():
        pixels = np.asarray(Image.open(data["root"] / "images" / name).convert("RGB"), dtype=float)
        for s in meta["shapes"]:
            x, y = (int(v) for v in s["center"])
            assert int(s["cell"] % 3) == int(x // cell) and int(s["cell"] // 3) == int(y // cell)
            rgb = pixels[y, x]
            nearest = min(reference, key=lambda c: np.linalg.norm(reference[c] - rgb))
            assert nearest == s["color"], (name, s, rgb)
        for empty in set(range(9)) - {s["cell"] for s in meta["shapes"]}:
            row, col = divmod(empty, 3)
            assert pixels[int((row + 0.5) * cell), int((col + 0.5) * cell)].min() >= 230


def test_stage1_captions_match_images(data):
    for sample in data["stage1"]:
        assert_caption_matches(sample["conversations"][1]["value"], data["meta"][sample["image"]]["shapes"])
    instructions = {s["conversations"][0]["value"].replace("<image>", "").strip() for s in data["stage1"]}
    assert len(instructions) > 2


def test_stage2_answers_match_images(data):
    asked = Counter()
    for sample in data["stage2"]:
        if "image" not in sample:
            continue
        shapes = data["meta"][sample["image"]]["shapes"]
        turns = sample["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            expected = oracle(human["value"], shapes)
            if expected is None:
                assert_caption_matches(gpt["value"], shapes)
                asked["describe"] += 1
            else:
                assert gpt["value"] == expected, human["value"]
                asked[gpt["value"] in ("yes", "no")] += 1
    assert asked["describe"] > 0 and asked[True] > 0 and asked[False] > 0


def test_text_only_fraction_and_answers(data):
    text_only = [s for s in data["stage2"] if "image" not in s]
    frac = SMALL["--text-only-frac"]
    assert abs(len(text_only) / len(data["stage2"]) - frac) <= 0.02
    for sample in text_only:
        turns = sample["conversations"]
        assert 1 <= len(turns) // 2 <= 2
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            m = re.fullmatch(r"What is (\d+) (plus|minus) (\d+)\?", human["value"])
            if m:
                a, b = int(m[1]), int(m[3])
                assert gpt["value"] == str(a + b if m[2] == "plus" else a - b)


def test_eval_balanced_and_consistent(data):
    questions, answers = data["questions"], data["answers"]
    by_type = Counter(q["category"] for q in questions)
    assert set(by_type) == {"color", "shape", "count", "position", "exists"}
    assert max(by_type.values()) - min(by_type.values()) <= 1
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in answers]
    assert len({q["question_id"] for q in questions}) == len(questions)
    exists = Counter(a["answer"] for a in answers if a["category"] == "exists")
    assert abs(exists["yes"] - exists["no"]) <= 1
    for q, a in zip(questions, answers, strict=True):
        assert q["category"] == a["category"]
        assert oracle(q["text"], data["meta"][q["image"]]["shapes"]) == a["answer"]
    vocab = data["manifest"]["vocab"]
    assert all(a["answer"] in vocab[a["category"]] for a in answers)


def test_corpus_covers_all_text(data):
    lines = set((data["root"] / "corpus.txt").read_text().splitlines())
    assert not any("<image>" in line for line in lines)
    texts = [t["value"].replace("<image>", "").strip()
             for s in data["stage1"] + data["stage2"] for t in s["conversations"]]
    texts += [q["text"] for q in data["questions"]] + [a["answer"] for a in data["answers"]]
    assert set(texts) <= lines


# --------------------------------------------------------------------------- scorer


@pytest.mark.parametrize("raw, expected", [
    ("Red.", "red"),
    ("  red  ", "red"),
    ("two", "2"),
    ("Three!", "3"),
    ("Top  Left.", "top left"),
    ("Yes. There is a green triangle in the image.", "yes"),
    ("a circle", "circle"),
    ("circle\nIt is drawn at the top.", "circle"),
    ('"No"', "no"),
    ("", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_score_shapes_hand_written():
    answers = [
        {"question_id": 0, "answer": "red", "category": "color"},
        {"question_id": 1, "answer": "2", "category": "count"},
        {"question_id": 2, "answer": "top left", "category": "position"},
        {"question_id": 3, "answer": "yes", "category": "exists"},
    ]
    result = score_shapes({0: "Red.", 1: "two", 3: "no"}, answers)
    assert result["n"] == 4 and result["missing"] == 1
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["by_type"] == {
        "color": {"accuracy": 1.0, "n": 1}, "count": {"accuracy": 1.0, "n": 1},
        "exists": {"accuracy": 0.0, "n": 1}, "position": {"accuracy": 0.0, "n": 1},
    }
    assert score_shapes({"0": "red"}, answers[:1])["accuracy"] == 1.0  # JSON-style str keys
    assert score_shapes({}, [])["accuracy"] == 0.0


def test_score_shapes_on_generated_eval(data):
    answers = data["answers"]
    perfect = score_shapes({a["question_id"]: a["answer"] for a in answers}, answers)
    assert perfect["accuracy"] == 1.0 and perfect["missing"] == 0
    always_yes = score_shapes({a["question_id"]: "Yes." for a in answers}, answers)
    assert always_yes["by_type"]["exists"]["accuracy"] == pytest.approx(0.5, abs=0.1)
    assert always_yes["by_type"]["color"]["accuracy"] == 0.0


def test_binding_report_names_whose_attribute_a_wrong_answer_is():
    """Hand-built: a blue circle (cell 0, raster-first) and a red square (cell 8); a one-shape image is not
    counted; a wrong answer is another shape's attribute (the first shape's here) or nobody's."""
    meta = [{"image": "a.png", "shapes": [{"color": "red", "shape": "square", "position": "bottom right", "cell": 8},
                                          {"color": "blue", "shape": "circle", "position": "top left", "cell": 0}]},
            {"image": "b.png", "shapes": [{"color": "red", "shape": "square", "position": "center", "cell": 4}]}]
    rows = [(0, "a.png", "position", "bottom right", "Top left."),   # the first shape's position
            (1, "a.png", "position", "bottom right", "bottom right"),
            (2, "a.png", "position", "top left", "center"),          # no shape is there
            (3, "a.png", "color", "red", "blue"),                    # the first shape's colour
            (4, "a.png", "shape", "circle", "circle"),
            (5, "a.png", "count", "2", "1"),                         # not an attribute question
            (6, "b.png", "position", "center", "top left")]          # one shape: nothing to confuse it with
    answers = [{"question_id": q, "answer": a, "category": c} for q, _, c, a, _ in rows]
    questions = [{"question_id": q, "image": i} for q, i, *_ in rows]
    report = binding_report({q: p for q, *_, p in rows}, answers, questions, meta)
    assert report == {
        "color": {"n": 1, "right": 0.0, "another_shape": 1.0, "first_shape": 1.0, "neither": 0.0},
        "position": {"n": 3, "right": 0.3333, "another_shape": 0.3333, "first_shape": 0.3333, "neither": 0.3333},
        "shape": {"n": 1, "right": 1.0, "another_shape": 0.0, "first_shape": 0.0, "neither": 0.0},
    }


def test_binding_report_on_generated_eval(data):
    """Perfect answers are all right; answering every position question with the raster-first shape's position is
    'the first shape's' exactly when the target is not that shape."""
    answers, questions = data["answers"], data["questions"]
    meta = [m for m in data["meta"].values() if m["split"] == "eval"]
    perfect = binding_report({a["question_id"]: a["answer"] for a in answers}, answers, questions, meta)
    assert perfect and all(r["right"] == 1.0 for r in perfect.values())
    image = {q["question_id"]: q["image"] for q in questions}
    first = {a["question_id"]: min(data["meta"][image[a["question_id"]]]["shapes"], key=lambda s: s["cell"])["position"]
             for a in answers if a["category"] == "position"}
    report = binding_report(first, answers, questions, meta)["position"]
    multi = [a for a in answers if a["category"] == "position" and len(data["meta"][image[a["question_id"]]]["shapes"]) > 1]
    wrong = sum(first[a["question_id"]] != a["answer"] for a in multi)
    assert report["n"] == len(multi) and wrong > 0
    assert report["first_shape"] == report["another_shape"] == round(wrong / len(multi), 4)
    assert report["neither"] == 0.0


def test_asked_shape_is_the_one_shape_a_question_names():
    """Hand-built: two red shapes, so 'What shape is red?' names no single shape; the others name one."""
    red_square = {"color": "red", "shape": "square", "position": "bottom right", "cell": 8}
    red_circle = {"color": "red", "shape": "circle", "position": "top left", "cell": 0}
    blue_square = {"color": "blue", "shape": "square", "position": "center", "cell": 4}
    shapes = [red_square, red_circle, blue_square]
    assert asked_shape("color", "What color is the circle?", "red", shapes) is red_circle
    assert asked_shape("position", "Where is the blue square?", "center", shapes) is blue_square
    assert asked_shape("position", "Where is a red square?", "bottom right", shapes) is red_square
    assert asked_shape("shape", "What shape is red?", "square", shapes) is None  # two red shapes
    assert asked_shape("shape", "What shape is blue?", "square", shapes) is blue_square
    assert asked_shape("count", "How many shapes are there?", "3", shapes) is None


def test_asked_shape_on_generated_eval_agrees_with_the_oracle(data):
    """Every colour / shape / position question of the generated eval set names exactly one shape, and that shape's
    attribute is the oracle's answer (the generator asks only unambiguous questions)."""
    image = {q["question_id"]: q for q in data["questions"]}
    checked = 0
    for a in data["answers"]:
        q = image[a["question_id"]]
        shapes = data["meta"][q["image"]]["shapes"]
        found = asked_shape(a["category"], q["text"], a["answer"], shapes)
        if a["category"] not in ("color", "shape", "position"):
            assert found is None
            continue
        assert found is not None, q["text"]
        assert found[a["category"]] == oracle(q["text"], shapes) == a["answer"]
        checked += 1
    assert checked > 20


def test_load_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert load_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_questions_end_with_the_words_naming_their_object(data):
    """Colour/shape names come last in every question (the contract the demo's tiny LLM relies on)."""
    colors, kinds = "|".join(REFERENCE_RGB), "|".join(SHAPE_WORDS)
    ending = re.compile(rf"(?:(?:\b(?:{colors}) )?\b(?:{kinds})s?|\b(?:{colors}))[?.]$")
    texts = [q["text"] for q in data["questions"]]
    texts += [t["value"].replace("<image>", "").strip() for s in data["stage2"] if "image" in s
              for t in s["conversations"][::2]]
    named = [t for t in texts if re.search(rf"\b(?:{colors}|{kinds})s?\b", t)]
    assert len(named) > len(texts) / 2
    for text in named:
        assert ending.search(text), text


def test_stage2_mix_options(tmp_path):
    """--image-first, --min/--max-rounds and --type-weights shape the Stage-2 mix; answers stay right."""
    out = tmp_path / "mix"
    subprocess.run(
        [sys.executable, "-m", "data_prep.make_shapes", "--out", str(out), "--image-size", str(IMAGE_SIZE),
         "--n-stage1", "10", "--n-stage2", "300", "--n-eval", "10", "--image-first", "1",
         "--min-rounds", "2", "--max-rounds", "5",
         "--type-weights", "color=1,shape=1,count=1,position=1,exists=3,describe=0.25"],
        cwd=REPO, check=True, capture_output=True, timeout=120,
    )
    stage2 = json.loads((out / "stage2.json").read_text())
    meta = {m["image"]: m for m in load_jsonl(out / "meta.jsonl")}
    rounds, kinds = Counter(), Counter()
    for sample in (s for s in stage2 if "image" in s):
        turns = sample["conversations"]
        assert turns[0]["value"].startswith("<image>\n")
        rounds[len(turns) // 2] += 1
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            expected = oracle(human["value"], meta[sample["image"]]["shapes"])
            if expected is None:
                assert_caption_matches(gpt["value"], meta[sample["image"]]["shapes"])
                kinds["describe"] += 1
            else:
                assert gpt["value"] == expected, human["value"]
                kinds["exists" if gpt["value"] in ("yes", "no") else "other"] += 1
    assert set(rounds) == {2, 3, 4, 5}
    # exists has weight 3 of 7.25 (~41%), describe 0.25 (~3%)
    total = sum(kinds.values())
    assert 0.3 < kinds["exists"] / total < 0.55 and 0 < kinds["describe"] / total < 0.08


def test_ablation_sets_leave_the_demo_data_unchanged_and_ask_what_they_say(tmp_path):
    """--ablation-sets (scripts/demo_ablations.sh): the demo's own files stay byte-identical (so its tokenizer and
    cached base models stay valid); stage2_1k.json is drawn from stage2.json; stage2_two_types.json has as many
    samples as stage2.json, its image questions only about colour and shape, on images of its own."""
    from data_prep.make_shapes import TEMPLATES

    plain = read_tree(generate(tmp_path / "plain", 0, "--n-prose", "20"))
    extended = read_tree(generate(tmp_path / "ext", 0, "--n-prose", "20", "--ablation-sets"))
    for name, content in plain.items():
        if name not in ("manifest.json", "meta.jsonl"):
            assert extended[name] == content, name
    stage2 = json.loads(plain["stage2.json"])
    small = json.loads(extended["stage2_1k.json"])
    assert len(small) == min(1000, len(stage2)) and all(s in stage2 for s in small)
    two = json.loads(extended["stage2_two_types.json"])
    assert len(two) == len(stage2)
    allowed = [re.escape(t).replace(r"\{shape\}", "[a-z]+").replace(r"\{color\}", "[a-z]+")
               for key in ("color", "shape") for t in TEMPLATES[key]]
    for sample in two:
        if "image" not in sample:
            continue  # text-only chats, as in the full set
        assert sample["image"].startswith("twotypes_") and f"images/{sample['image']}" in extended
        for turn in sample["conversations"][0::2]:
            question = turn["value"].replace("<image>", "").strip()
            assert any(re.fullmatch(a, question) for a in allowed), question


def test_stage2_shape_counts_weight_the_stage2_images_and_nothing_else(tmp_path):
    """--stage2-shape-counts 1=0,2=1,3=3: no Stage-2 image holds a single shape and about three in four hold three
    (binomial sd over ~180 images is 0.03; the band is wider than 3 sd). Stage 1, the eval set and the prose come
    from their own generators, so they stay byte-identical to a run without the option."""
    plain = read_tree(generate(tmp_path / "plain", 0, "--n-prose", "20"))
    weighted = read_tree(generate(tmp_path / "w", 0, "--n-prose", "20", "--stage2-shape-counts", "1=0,2=1,3=3"))
    for name in ("stage1.json", "prose.txt", "eval/questions.jsonl", "eval/answers.jsonl"):
        assert weighted[name] == plain[name], name
    meta = {m["image"]: m["shapes"] for m in map(json.loads, weighted["meta.jsonl"].decode().splitlines())}
    counts = Counter(len(meta[s["image"]]) for s in json.loads(weighted["stage2.json"]) if "image" in s)
    assert counts[1] == 0 and 0.65 < counts[3] / sum(counts.values()) < 0.85, counts
    for sample in json.loads(weighted["stage2.json"]):  # the answers still describe the image they are about
        if "image" in sample:
            for human, gpt in zip(sample["conversations"][::2], sample["conversations"][1::2], strict=True):
                expected = oracle(human["value"], meta[sample["image"]])
                if expected is not None:
                    assert gpt["value"] == expected, human["value"]


@pytest.mark.parametrize("flag,spec", [
    ("--stage2-shape-counts", "1=1,4=1"), ("--stage2-shape-counts", "2"), ("--stage2-shape-counts", "1=a"),
    ("--stage2-shape-counts", "1=0,2=0,3=0"), ("--stage2-shape-counts", "1=-1,2=1"),
    ("--type-weights", "colour=2,shape=1"),  # misspelt: it used to weigh colour 0 and drop those questions silently
    ("--type-weights", "color=x"), ("--type-weights", "color=0,shape=0"), ("--n-stage2-warmup", -1),
])
def test_weight_flags_reject_a_bad_spec_naming_the_flag_before_writing_anything(tmp_path, flag, spec):
    from data_prep.make_shapes import generate as make

    out = tmp_path / "never"
    with pytest.raises(ValueError, match=flag):
        make(out, image_size=IMAGE_SIZE, n_stage1=4, n_stage2=4, n_eval=2, **{flag[2:].replace("-", "_"): spec})
    assert not out.exists()


def test_variance_share_is_the_between_label_share_of_the_sum_of_squares():
    """By hand: the first coordinate (+-2) holds 16 of the 20 units of squared deviation, the second (+-1) 4; a label
    that splits on the first explains 0.8, on the second 0.2 (a probe would read both perfectly), one that splits
    neither 0.0, and one label per distinct vector 1.0."""
    vectors = [[2.0, 1.0], [2.0, -1.0], [-2.0, 1.0], [-2.0, -1.0]]
    assert variance_share(vectors, ["a", "a", "b", "b"]) == pytest.approx(0.8)
    assert variance_share(vectors, ["a", "b", "a", "b"]) == pytest.approx(0.2)
    assert variance_share(vectors, ["a", "b", "b", "a"]) == pytest.approx(0.0)
    assert variance_share(vectors, [0, 1, 2, 3]) == pytest.approx(1.0)
    assert variance_share([[1.0], [1.0]], ["a", "b"]) == 0.0  # no variance at all: nothing to explain


def test_feature_signal_reads_the_token_at_each_shapes_cell():
    """Tokens carry only the colour (red +1, blue -1) at the shapes' cells and 5.0 elsewhere: colour explains all
    the variance; cell and shape none (each cell and each shape is red once and blue once). Reading any other token
    than the shape's own cell would mix in the 5.0s."""
    def tokens(filled):
        return [[filled.get(cell, 5.0)] for cell in range(9)]
    meta = [{"image": "a.png", "shapes": [{"color": "red", "shape": "circle", "cell": 0},
                                          {"color": "blue", "shape": "square", "cell": 4}]},
            {"image": "b.png", "shapes": [{"color": "red", "shape": "square", "cell": 4},
                                          {"color": "blue", "shape": "circle", "cell": 0}]},
            {"image": "c.png", "shapes": [{"color": "red", "shape": "circle", "cell": 8}]}]  # no features: skipped
    features = {"a.png": tokens({0: 1.0, 4: -1.0}), "b.png": tokens({4: 1.0, 0: -1.0})}
    assert feature_signal(features, meta) == {"cell": 0.0, "color": 1.0, "shape": 0.0, "n": 4}
    assert feature_signal({}, meta) == {}


def test_the_lookup_reports_the_head_that_looks_at_the_asked_shape_not_one_that_ignores_the_image():
    """run_shapes.best_lookup on planted [layer, head, token] averages: the largest share belongs to a head that puts
    5 % of its attention on the image (skipped: a large share of almost nothing); the next one is reported."""
    import torch

    from llava_sft.eval.run_shapes import best_lookup

    share = torch.full((2, 3, 4), 0.4)
    mass = torch.full((2, 3, 4), 0.5)
    share[0, 2, 1], mass[0, 2, 1] = 0.99, 0.05
    share[1, 0, 3] = 0.9
    assert best_lookup(share, mass, 0.2) == (1, 0, 3)
    assert best_lookup(share, mass, 0.0) == (0, 2, 1)
    assert best_lookup(share, mass, 0.6) is None  # no head looks at the image: none is named


def test_the_lookup_measures_the_attention_a_head_puts_on_the_asked_shape(data):
    """run_shapes.attention_lookup through a stand-in model whose attention is planted: in layer 1, head 0 of the
    question token two before the answer looks only at the raster-first shape of the image (read from the pixels),
    and head 1 there at the last shape with 0.1 of its attention (too little to count); everything else looks
    at the text. The reported share must be the share of questions whose asked shape (named by the question text,
    as the oracle reads it) is the raster-first one, and the model's attention implementation must come back."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from llava_sft.constants import IMAGE_TOKEN_INDEX
    from llava_sft.eval.run_shapes import attention_lookup, format_table

    class WordTokenizer:
        bos_token_id = 1

        def __init__(self):
            self.vocab = {"<s>": 1}

        def __call__(self, text, **_):
            return {"input_ids": [1] + [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]}

        def convert_ids_to_tokens(self, ids):
            words = {i: w for w, i in self.vocab.items()}
            return [words.get(i, "<image>") for i in ids]

    def occupied(image):  # the cells whose pixels are not all background
        px = np.asarray(image.convert("RGB"), dtype=np.float32)
        third = px.shape[0] // 3
        return torch.tensor([float(px[r * third:(r + 1) * third, c * third:(c + 1) * third].std() > 0)
                             for r in range(3) for c in range(3)])

    class PlantedModel:
        attn_implementation = "sdpa"

        def __init__(self):
            self.llm = PlantedLLM(self)

        def embed(self, ids, mask, pixels):
            self.start, self.cells = ids[0].tolist().index(IMAGE_TOKEN_INDEX), pixels[0]
            return SimpleNamespace(inputs_embeds=torch.zeros(1, ids.shape[1] + 8, 1))

    class PlantedLLM:
        def __init__(self, owner):
            self.owner = owner

        def set_attn_implementation(self, name):
            self.owner.attn_implementation = name

        def __call__(self, inputs_embeds, output_attentions, use_cache):
            T, start = inputs_embeds.shape[1], self.owner.start
            cells = self.owner.cells.nonzero().flatten().tolist()
            weights = torch.zeros(2, 1, 2, T, T)
            weights[..., 0] = 1.0  # the text (BOS) by default
            query = T - 3
            weights[1, 0, 0, query] = 0.0
            weights[1, 0, 0, query, start + cells[0]] = 1.0
            weights[1, 0, 1, query, 0] = 0.9
            weights[1, 0, 1, query, start + cells[-1]] = 0.1
            return SimpleNamespace(attentions=tuple(weights))

    answerer = SimpleNamespace(model=PlantedModel(), tokenizer=WordTokenizer(), device=torch.device("cpu"),
                               prompt_for=lambda q: "<image> " + q, processor=occupied)
    report = attention_lookup(answerer, data["root"])
    assert answerer.model.attn_implementation == "sdpa"
    image = {q["question_id"]: q for q in data["questions"]}
    for category in ("color", "shape", "position"):
        first = []
        for a in data["answers"]:
            q = image[a["question_id"]]
            shapes = data["meta"][q["image"]]["shapes"]
            if a["category"] != category or len(shapes) < 2:
                continue
            named = [s for s in shapes if s[category] == oracle(q["text"], shapes)
                     and all(re.search(rf"\b{s[k]}\b", q["text"]) for k in ("color", "shape") if k != category)]
            first.append(min(shapes, key=lambda s: s["cell"]) is named[0])
        found = report[category]
        assert (found["layer"], found["head"], found["offset"]) == (1, 0, -2)
        assert found["n"] == len(first) and found["share"] == pytest.approx(sum(first) / len(first), abs=1e-4)
        assert found["image_mass"] == pytest.approx(1.0)
    # asked for more image attention than any head gives, no head is named (the most it gets is reported)
    strict = attention_lookup(answerer, data["root"], min_mass=1.01)
    for category in ("color", "shape", "position"):
        assert strict[category]["layer"] is None and strict[category]["share"] is None
        assert strict[category]["image_mass"] == pytest.approx(1.0)
    assert "no head puts 1.01 of its attention on the image" in format_table({"by_type": {}, "overall": {"accuracy": 1.0},
                                                                          "lookup": strict})


def test_a_moved_caption_names_the_same_objects_each_somewhere_else(data):
    """make_shapes.moved_caption (the tower's hard negatives): parsed back independently, it names the same
    (colour, shape) objects; with 2-3 shapes they trade cells (same set of positions, every object moved), a single
    shape goes to another cell."""
    import random

    from data_prep.make_shapes import moved_caption

    part = re.compile(r"an? (\w+) (\w+) (?:at the|on the|in the) ([a-z ]+?)(?:,| and |\.$)")
    rng = random.Random(0)
    seen = Counter()
    for record in data["meta"].values():
        shapes = record["shapes"]
        if not shapes:
            continue
        text = moved_caption(rng, shapes)
        found = {(c, s): p for c, s, p in part.findall(text)}
        truth = {(s["color"], s["shape"]): s["position"] for s in shapes}
        assert set(found) == set(truth), text
        assert all(found[k] != truth[k] for k in truth), text
        if len(shapes) > 1:
            assert sorted(found.values()) == sorted(truth.values()), text
        seen[len(shapes)] += 1
    assert seen[1] and seen[2] and seen[3]


def test_the_warmup_set_holds_one_shape_images_and_leaves_the_demo_data_unchanged(tmp_path):
    """--n-stage2-warmup N (the first pass of the demo's Stage 2, scripts/demo.sh): stage2_warmup.json holds N
    Stage-2 samples, about text_only_frac of them text-only, every image of its own (warmup_ prefix) holding exactly
    one shape, with answers that describe it. Every other file but the records of what was written stays
    byte-identical, so the tokenizer and the cached base models stay valid."""
    plain = read_tree(generate(tmp_path / "plain", 0, "--n-prose", "20"))
    warm = read_tree(generate(tmp_path / "warm", 0, "--n-prose", "20", "--n-stage2-warmup", "60"))
    assert set(warm) - set(plain) == {"stage2_warmup.json"} | {n for n in warm if n.startswith("images/warmup_")}
    for name, content in plain.items():
        if name not in ("manifest.json", "meta.jsonl"):
            assert warm[name] == content, name
    meta_lines = warm["meta.jsonl"].decode().splitlines()
    assert "\n".join(meta_lines[:len(plain["meta.jsonl"].decode().splitlines())]) + "\n" == plain["meta.jsonl"].decode()
    meta = {m["image"]: m["shapes"] for m in map(json.loads, meta_lines)}
    samples = json.loads(warm["stage2_warmup.json"])
    with_image = [s for s in samples if "image" in s]
    assert len(samples) == 60 and len(with_image) == 60 - round(60 * 0.1)  # generate()'s default text_only_frac
    for sample in with_image:
        assert sample["image"].startswith("warmup_") and len(meta[sample["image"]]) == 1
        for human, gpt in zip(sample["conversations"][::2], sample["conversations"][1::2], strict=True):
            expected = oracle(human["value"], meta[sample["image"]])
            if expected is not None:
                assert gpt["value"] == expected, human["value"]
