"""The data card (data_prep.data_card) and the duplicate finder it shares with the generator (data_prep.dedup)."""
from __future__ import annotations

import json
import random

from PIL import Image

from data_prep.data_card import main as card_main
from data_prep.data_card import source_of
from data_prep.dedup import find_duplicates, jaccard, record_text, shingles


def conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


LONG = ("The bus is parked at the side of a wide street in front of a row of shops with colourful awnings, while a "
        "few people wait at the stop under a small shelter and a cyclist rides past in the opposite direction today")
RECORDS = [
    {"id": "r1", "image": "coco/train2017/1.jpg", "kind": "conversation",
     "conversations": conv("<image>\nWhat is it?", "A red bus.", "Where is it?", "On the street near a shop.")},
    {"id": "r2", "image": "coco/train2017/1.jpg", "kind": "conversation",  # r1 up to case, spacing, <image> place
     "conversations": conv("What is  it?\n<image>", "a red bus", "where is it?", "On the street near a shop.")},
    {"id": "r3", "image": "gqa/images/2.jpg", "conversations": conv("<image>\nWhat is it?", "A cat.")},
    {"id": "r4", "conversations": conv("Hello there", "Hi! How can I help you today?")},
    {"id": "r5", "image": "coco/train2017/3.jpg", "conversations": conv("<image>\nDescribe the scene.", LONG)},
    {"id": "r6", "image": "coco/train2017/3.jpg",  # r5 with its last word changed
     "conversations": conv("<image>\nDescribe the scene.", LONG.replace("today", "now"))},
    {"id": "r7", "image": "gqa/images/9.jpg", "conversations": conv("<image>\nWhat is it?", "A cat.")},  # other image
    "not a record",
    {"id": "r9", "image": "10.jpg", "conversations": conv("<image>\nWhat is it?", "A kite.")},
]


def test_data_card_counts_and_png(tmp_path, capsys):
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(RECORDS))
    png, js = tmp_path / "card.png", tmp_path / "card.json"
    card = card_main([str(data), "--png", str(png), "--json", str(js), "--top", "3"])

    assert card["samples"] == 8 and card["bad_records"] == 1
    assert card["text_only"] == 1 and card["text_only_share"] == 0.125
    assert {k: v["samples"] for k, v in card["by_source"].items()} == {
        "coco": 4, "gqa": 2, "(no dir)": 1, "text-only": 1}
    assert card["by_source"]["coco"]["mean_rounds"] == 1.5
    assert {k: v["samples"] for k, v in card["by_kind"].items()} == {"conversation": 2}
    assert card["rounds"]["mean"] == 1.25 and card["rounds"]["max"] == 2
    answers = ["A red bus.", "On the street near a shop.", "a red bus", "On the street near a shop.", "A cat.",
               "Hi! How can I help you today?", LONG, LONG, "A cat.", "A kite."]
    words = [len(a.split()) for a in answers]
    assert card["answer_words"]["max"] == max(words) and card["answer_words"]["mean"] == round(sum(words) / 10, 2)
    assert card["questions"]["total"] == 10 and card["questions"]["most_frequent"][0] == ["What is it?", 5]
    # What is it? (r2's double space collapsed), Where is it?, where is it?, Hello there, Describe the scene.
    assert card["questions"]["distinct"] == 5
    assert card["duplicates"]["exact"] == 1 and card["duplicates"]["near"] == 1
    assert card["duplicates"]["examples"] == {"exact": [["r2", "r1"]], "near": [["r6", "r5"]]}  # r7: another image
    assert json.loads(js.read_text()) == card

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 500
    printed = capsys.readouterr().out
    assert "text-only" in printed and "What is it?" in printed and "duplicates: exact 1, near 1" in printed


def test_several_files_and_default_png(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([dict(r, source="mine") for r in RECORDS[:3]]))
    b.write_text(json.dumps(RECORDS[3:4]))
    card = card_main([str(a), str(b), "--near-dup", "2"])
    assert {k: v["samples"] for k, v in card["by_source"].items()} == {"mine": 3, "text-only": 1}
    assert card["duplicates"]["near_threshold"] is None and card["duplicates"]["exact"] == 1
    assert (tmp_path / "a.card.png").is_file()


def test_source_of():
    assert source_of({"image": "ocr_vqa/images/1.jpg"}) == "ocr_vqa"
    assert source_of({"image": ["vg/VG_100K/1.jpg", "vg/VG_100K/2.jpg"]}) == "vg"
    assert source_of({"image": "x.jpg", "source": "textcaps"}) == "textcaps"
    assert source_of({}) == "text-only"


def test_near_duplicates_match_brute_force():
    """The prefix-filtered search finds exactly what comparing every pair finds."""
    rng = random.Random(0)
    vocab = "a b c d e f g h".split()
    base = [[rng.choice(vocab) for _ in range(rng.randint(1, 25))] for _ in range(30)]
    records = []
    for i in range(300):
        words = list(rng.choice(base))
        for _ in range(rng.randint(0, 1)):  # small edits of a few base texts: many near pairs
            words[rng.randrange(len(words))] = rng.choice(vocab)
        image = rng.choice(["1.jpg", "2.jpg", None])
        records.append({"id": i, "conversations": conv("q", " ".join(words)), **({"image": image} if image else {})})
    for threshold in (0.5, 0.8):
        expected, kept = {}, []
        for i, r in enumerate(records):
            same = [j for j in kept if records[j].get("image") == r.get("image")]
            exact = [j for j in range(i) if records[j].get("image") == r.get("image")
                     and record_text(records[j]) == record_text(r)]
            if exact:
                expected[i] = ("exact", exact[0])
                continue
            near = [j for j in same if jaccard(shingles(record_text(r)), shingles(record_text(records[j]))) >= threshold]
            if near:
                expected[i] = ("near", near[0])
            else:
                kept.append(i)
        found = find_duplicates(records, threshold)
        assert found == expected
        assert sum(h == "near" for h, _ in found.values()) > 10
