"""Concept-balanced caption filtering (data_prep.filter_concepts): the selection logic on hand-made concept
lists (independent of any extractor), the rule-based extractor, the spaCy glue with a stand-in pipeline
(no spaCy model is needed), and the command on tiny caption files."""
from __future__ import annotations

import json

import pytest

from data_prep import concepts
from data_prep.concepts import make_extractor, rule_phrases, spacy_extractor
from data_prep.filter_concepts import balanced_select, concept_counts
from data_prep.filter_concepts import main as filter_main


# ------------------------------------------------------------------------------- selection logic
def test_captions_with_only_rare_concepts_are_dropped():
    phrases = [["dog"], ["dog"], ["dog"], ["dog", "zebra"], ["zebra"], ["unicorn"], [], ["cat"], ["cat"]]
    assert concept_counts(phrases) == {"dog": 4, "zebra": 2, "unicorn": 1, "cat": 2}
    assert balanced_select(phrases, min_freq=3, cap=100) == [0, 1, 2, 3]
    assert balanced_select(phrases, min_freq=2, cap=100) == [0, 1, 2, 3, 4, 7, 8]
    assert balanced_select([["dog", "dog"], ["dog"], ["dog"]], min_freq=3) == [0, 1, 2]  # once per caption


def test_frequent_concepts_are_capped_by_seeded_sampling():
    phrases = [["man"]] * 10
    picks = {tuple(balanced_select(phrases, min_freq=3, cap=4, seed=s)) for s in range(10)}
    assert all(len(p) == 4 for p in picks) and len(picks) > 1  # 4 of 10, drawn at random per seed
    assert balanced_select(phrases, cap=4, seed=3) == balanced_select(phrases, cap=4, seed=3)


def test_rarer_concepts_go_first_and_count_toward_the_cap():
    phrases = [["dog", "man"], ["dog", "man"], ["dog", "man"]] + [["man"]] * 7  # dog: 3 captions, man: 10
    selected = balanced_select(phrases, min_freq=3, cap=4)
    assert selected[:3] == [0, 1, 2] and len(selected) == 4  # man already has 3 of its 4 from dog
    assert len(balanced_select(phrases, min_freq=3, cap=2)) == 2  # dog takes 2, man has reached its cap


# ------------------------------------------------------------------------------- extractors
def test_rule_extractor():
    assert rule_phrases("A man riding a red bike on the street.") == ["man", "red bike", "street"]
    assert rule_phrases("Two dogs are playing in the snow") == ["dogs", "snow"]
    assert rule_phrases("The red bike; a red bike, 3 red bikes") == ["red bike", "red bikes"]
    assert rule_phrases("A kitchen with a stove, a sink and wooden cabinets.") == [
        "kitchen", "stove", "sink", "wooden cabinets"]
    assert rule_phrases("The building next to a parking lot") == ["building", "parking lot"]
    assert rule_phrases("It is very big and red.") == []  # only adjectives: no concept


class _Span:
    def __init__(self, text):
        self.text = text


class _Doc:
    def __init__(self, chunks):
        self.noun_chunks = [_Span(c) for c in chunks]


class _FakeNlp:
    """Stands in for a spaCy pipeline: pipe() yields docs with preset noun chunks."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def pipe(self, texts, batch_size=256, n_process=1):
        self.calls.append((list(texts), batch_size, n_process))
        return (_Doc(self.table[t]) for t in texts)


def test_spacy_noun_chunks_are_normalised():
    nlp = _FakeNlp({"A Red Bike by the lake.": ["A Red Bike", "the lake"], "The bike.": ["The  bike", "the bike"]})
    extract = spacy_extractor(nlp, batch_size=8, n_process=2)
    assert extract(["A Red Bike by the lake.", "The bike."]) == [["red bike", "lake"], ["bike"]]
    assert nlp.calls[0][1:] == (8, 2)


def test_auto_falls_back_to_rules_without_spacy(monkeypatch):
    monkeypatch.setattr(concepts, "load_spacy", lambda model: None)
    name, extract = make_extractor("auto")
    assert name == "rule" and extract(["A dog on a sofa."]) == [["dog", "sofa"]]
    with pytest.raises(ValueError, match="spacy download en_core_web_sm"):
        make_extractor("spacy")
    monkeypatch.setattr(concepts, "load_spacy", lambda model: _FakeNlp({"x": ["a cat"]}))
    name, extract = make_extractor("auto")
    assert name == "spacy:en_core_web_sm" and extract(["x"]) == [["cat"]]


# ------------------------------------------------------------------------------- the command
CAPTIONS = ["A dog on a sofa.", "A dog near a sofa.", "A dog under a sofa.", "A dog in a park.", "A dog with a ball.",
            "A dog at the beach.", "A zebra in the wild.", "A unicorn.", "The."]


def test_command_on_llava_json(tmp_path, capsys):
    records = [{"id": str(i), "image": f"{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe it briefly."}, {"from": "gpt", "value": c}]}
        for i, c in enumerate(CAPTIONS)]
    records.append({"id": "no-caption", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>"}]})
    data = tmp_path / "chat.json"
    data.write_text(json.dumps(records))
    out, report_path = tmp_path / "out.json", tmp_path / "report.json"
    # concepts: dog 6 captions, sofa 3, the rest 1. sofa goes first (3 captions), then dog already has 3 = cap.
    report = filter_main(["--data", str(data), "--out", str(out), "--extractor", "rule", "--cap", "3",
                          "--report", str(report_path)])
    assert json.loads(out.read_text()) == records[:3]
    assert report["captions"] == {"before": 9, "after": 3, "without_concepts": 1, "only_rare_concepts": 2}
    assert report["concepts"] == {"before": 8, "after": 2}
    assert report["frequent_concepts"] == {"before": 2, "covered_after": 2, "coverage": 1.0}
    assert report["captions_per_frequent_concept"]["before"]["max"] == 6
    assert report["captions_per_frequent_concept"]["after"]["max"] == 3
    assert report["skipped"] == {"record without a caption": 1}
    assert json.loads(report_path.read_text()) == json.loads(json.dumps(report))
    printed = capsys.readouterr().out
    assert "distinct concepts" in printed and "without a caption" in printed

    # cap 4: dog gets one more caption, drawn among its 3 not yet selected
    filter_main(["--data", str(data), "--out", str(out), "--extractor", "rule", "--cap", "4"])
    kept = json.loads(out.read_text())
    assert kept[:3] == records[:3] and len(kept) == 4 and kept[3] in records[3:6]


def test_command_on_jsonl(tmp_path):
    data = tmp_path / "captions.jsonl"
    data.write_text("".join(json.dumps({"caption": c, "url": f"http://x/{i}.jpg"}) + "\n"
                            for i, c in enumerate(CAPTIONS)))
    out = tmp_path / "out.jsonl"
    filter_main(["--data", str(data), "--out", str(out), "--extractor", "rule", "--cap", "3"])
    assert [json.loads(line)["caption"] for line in out.read_text().splitlines()] == CAPTIONS[:3]
