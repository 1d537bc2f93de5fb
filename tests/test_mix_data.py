"""Training-mixture builder (data_prep.mix_data) on tiny source files written here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.mix_data import load_spec
from data_prep.mix_data import main as mix_main

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
REPO = Path(__file__).resolve().parents[1]


def conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


@pytest.fixture()
def sources(tmp_path):
    llava = [{"id": f"L{i}", "image": f"coco/train2017/{i}.jpg",
              "conversations": conv("<image>\nWhat is in the picture?", f"Thing {i}.", "Anything else?", "No.")}
             for i in range(10)]
    vqa = [{"id": f"V{i}", "image": f"coco/train2017/{100 + i}.jpg",
            "conversations": conv("<image>\nWhat color is the car?", "red", "How many cars?", str(i))} for i in range(8)]
    vqa[3]["conversations"][0]["value"] = "<image>\nWhat color is the car?\n" + SHORT  # already formatted
    text = [{"id": f"T{i}", "conversations": conv(f"Say {i}.", f"{i}.")} for i in range(4)]
    paths = {}
    for name, records in (("llava", llava), ("vqa", vqa), ("text", text)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(records))
    spec = tmp_path / "mix.yaml"
    spec.write_text("seed: 3\nsources:\n"
                    "  - {name: llava, path: llava.json}\n"
                    "  - {name: vqa, path: vqa.json, ratio: 0.5, format: short_answer}\n"
                    "  - {name: text, path: text.json, count: 6}\n")
    return {"spec": spec, "paths": paths, "llava": llava, "vqa": vqa, "text": text}


def test_ratios_format_prompts_and_repeats(sources, tmp_path):
    out = tmp_path / "mix.json"
    inputs = {n: p.read_text() for n, p in sources["paths"].items()}
    report = mix_main(["--spec", str(sources["spec"]), "--out", str(out)])
    mix = json.loads(out.read_text())
    assert len(mix) == 10 + 4 + 6 and report["total"] == 20
    by = {n: [r for r in mix if r["source"] == n] for n in ("llava", "vqa", "text")}
    assert [len(v) for v in by.values()] == [10, 4, 6]

    assert sorted(by["llava"], key=lambda r: int(r["id"][1:])) == [dict(r, source="llava") for r in sources["llava"]]
    originals = {r["id"]: r for r in sources["vqa"]}
    assert len({r["id"] for r in by["vqa"]}) == 4
    for r in by["vqa"]:
        src = originals[r["id"]]
        humans, gpts = r["conversations"][0::2], r["conversations"][1::2]
        assert all(h["value"].endswith("\n" + SHORT) and h["value"].count(SHORT) == 1 for h in humans)
        assert [h["value"].replace("\n" + SHORT, "") for h in humans] == \
            [h["value"].replace("\n" + SHORT, "") for h in src["conversations"][0::2]]
        assert gpts == src["conversations"][1::2]
    ids = sorted(r["id"] for r in by["text"])
    reps = [i for i in ids if i.endswith("_rep1")]
    assert len(reps) == 2 and len(set(reps)) == 2 and set(ids) - set(reps) == {"T0", "T1", "T2", "T3"}
    assert {n: p.read_text() for n, p in sources["paths"].items()} == inputs  # inputs untouched
    assert report["sources"]["vqa"]["format"] == SHORT and report["sources"]["text"]["repeated"] == 2
    assert report["duplicate_ids"]["count"] == 0


def test_deterministic_for_a_seed(sources, tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    mix_main(["--spec", str(sources["spec"]), "--out", str(a)])
    mix_main(["--spec", str(sources["spec"]), "--out", str(b)])
    mix_main(["--spec", str(sources["spec"]), "--out", str(c), "--seed", "4"])
    assert a.read_bytes() == b.read_bytes()
    assert [r["id"] for r in json.loads(a.read_text())] != [r["id"] for r in json.loads(c.read_text())]


def test_command_line_sources_no_shuffle_and_prefix_ids(sources, tmp_path):
    p = sources["paths"]
    out = tmp_path / "mix.json"
    mix_main(["--out", str(out), "--no-shuffle", "--no-source-field", "--source", f"llava={p['llava']}",
              "--source", f"vqa={p['vqa']},count=2,format=option_letter"])
    mix = json.loads(out.read_text())
    assert mix[:10] == sources["llava"]  # sources in order, records unchanged
    assert all(r["conversations"][0]["value"].endswith("\n" + LETTER) for r in mix[10:]) and len(mix) == 12

    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps(sources["llava"][:2]))
    report = mix_main(["--out", str(out), "--source", f"a={p['llava']}", "--source", f"b={dup}"])
    assert report["duplicate_ids"]["count"] == 2  # L0 and L1 in both sources: reported
    report = mix_main(["--out", str(out), "--source", f"a={p['llava']}", "--source", f"b={dup}", "--prefix-ids"])
    assert report["duplicate_ids"]["count"] == 0
    assert {r["id"] for r in json.loads(out.read_text()) if r["source"] == "b"} == {"b/L0", "b/L1"}


def test_bad_records_stop_or_are_counted(sources, tmp_path):
    bad = sources["vqa"] + [{"id": "oops", "image": "x.jpg", "conversations": conv("no image marker", "x")},
                            {"id": "turns", "conversations": [{"from": "gpt", "value": "hi"}]}]
    sources["paths"]["vqa"].write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match="2 bad record.*oops"):
        mix_main(["--spec", str(sources["spec"]), "--out", str(tmp_path / "m.json")])
    report = mix_main(["--spec", str(sources["spec"]), "--out", str(tmp_path / "m.json"), "--skip-bad"])
    assert report["sources"]["vqa"]["bad_skipped"] == 2 and report["sources"]["vqa"]["selected"] == 4
    with pytest.raises(SystemExit, match="does not exist"):
        mix_main(["--out", str(tmp_path / "m.json"), "--source", f"x={tmp_path / 'missing.json'}"])


def test_shipped_mix665k_spec():
    sources, options = load_spec(REPO / "data_prep" / "mixes" / "llava_v1_5_mix665k.yaml", Path("/data"))
    by = {s.name: s for s in sources}
    assert len(sources) == 10 and options["seed"] == 0
    assert {n for n, s in by.items() if s.prompt == SHORT} == {"vqav2", "gqa", "okvqa", "ocrvqa"}
    assert by["aokvqa"].prompt == LETTER and by["llava_instruct"].count == 158000
    assert by["vqav2"].path == Path("/data/vqav2_83k.json")
