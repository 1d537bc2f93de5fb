"""Preference data: the record forms, the start-up check naming bad pairs, the converters of the public sets (each
on records written from its published field layout: data_prep/convert_preferences.py names the sources), and the
demo's preference set (data_prep/make_preferences.py)."""
from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from data_prep.convert_preferences import convert, read_rows
from data_prep.make_preferences import generate as make_preferences
from data_prep.make_shapes import generate as make_shapes
from llava_sft.constants import IGNORE_INDEX
from llava_sft.data.preference import normalize_record
from llava_sft.data.templates import BadSampleError
from llava_sft.train.build import build
from tests.tiny import run_config

pytestmark = pytest.mark.latest_stack  # passes on constraints/latest.txt too (CI runs it there)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("pref_shapes")
    make_shapes(out, seed=5, image_size=32, n_stage1=4, n_stage2=16, n_eval=8, text_only_frac=0.0)
    make_preferences(out, n=24, n_eval=8, seed=0)
    return out


def dpo_config(tokenizer_dir, data, out, path, **train):
    from llava_sft.config import PreferenceConfig

    cfg = run_config(tokenizer_dir, data, out, stage=2, **train)
    cfg.data.path, cfg.dpo = str(path), PreferenceConfig()
    return cfg


def test_prompt_and_images_forms_are_the_conversation_form():
    assert normalize_record({"id": "a", "images": ["x.png"], "prompt": "<image>\nQ?", "chosen": "A", "rejected": "B"}) \
        == {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}],
            "chosen": "A", "rejected": "B"}


def test_bad_pairs_are_named_at_start_up_and_skipped_and_counted_on_request(llama_tokenizer_dir, shapes, tmp_path):
    image = json.loads((shapes / "preferences.json").read_text())[0]["image"]
    ask = [{"from": "human", "value": "<image>\nIs there a red circle?"}]
    records = [
        {"id": "good", "image": image, "conversations": ask, "chosen": "no", "rejected": "yes"},
        {"id": "same", "image": image, "conversations": ask, "chosen": "yes", "rejected": "yes "},
        {"id": "empty", "image": image, "conversations": ask, "chosen": "no", "rejected": "  "},
        {"id": "ends-with-reply", "image": image, "conversations": ask + [{"from": "gpt", "value": "no"}],
         "chosen": "no", "rejected": "yes"},
        {"id": "no-rejected", "image": image, "conversations": ask, "chosen": "no"},
        {"id": "two-placeholders", "image": image, "conversations": [{"from": "human", "value": "<image><image>?"}],
         "chosen": "no", "rejected": "yes"},
    ]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    cfg = dpo_config(llama_tokenizer_dir, shapes, tmp_path / "run", path)
    with pytest.raises(BadSampleError) as error:
        build(cfg, torch.device("cpu"))
    message = str(error.value)
    assert "5 bad sample(s)" in message
    for sample_id, reason in (("same", "the same"), ("empty", "rejected reply is empty"),
                              ("ends-with-reply", "must end with a human turn"), ("no-rejected", "'rejected' must"),
                              ("two-placeholders", "placeholder")):
        assert any(sample_id in line and reason in line for line in message.splitlines()), (sample_id, message)
    cfg.data.bad_samples = "skip"
    _, _, dataset = build(cfg, torch.device("cpu"))
    assert len(dataset) == 1 and len(dataset.report.skipped) == 5


def test_a_pair_sample_holds_both_sides_and_the_image_once(llama_tokenizer_dir, shapes, tmp_path):
    cfg = dpo_config(llama_tokenizer_dir, shapes, tmp_path / "run", shapes / "preferences.json")
    _, tokenizer, dataset = build(cfg, torch.device("cpu"))
    sample = dataset[0]
    assert sample["images"].shape == (1, 3, 32, 32)
    for side in ("chosen", "rejected"):
        scored = [t for t in sample[f"{side}_labels"].tolist() if t != IGNORE_INDEX]
        assert tokenizer.decode(scored[:-1]).strip() == dataset.records[0][side]


def test_the_demo_pairs_contrast_the_truth_with_a_hallucination(shapes):
    meta = {r["image"]: r["shapes"] for r in map(json.loads, (shapes / "meta.jsonl").read_text().splitlines())}
    train = json.loads((shapes / "preferences.json").read_text())
    held_out = json.loads((shapes / "preferences_eval.json").read_text())
    assert {r["kind"] for r in train} == {"absent", "present", "color", "describe"}
    splits = {r["image"]: r["split"] for r in map(json.loads, (shapes / "meta.jsonl").read_text().splitlines())}
    assert {splits[r["image"]] for r in train} == {"stage2"} and {splits[r["image"]] for r in held_out} == {"eval"}
    for r in train + held_out:
        objects = {(s["color"], s["shape"]) for s in meta[r["image"]]}
        question = r["conversations"][0]["value"]
        if r["kind"] in ("absent", "present"):
            asked = next((c, s) for c, s in objects | {(c, s) for c in ("red", "green", "blue", "yellow", "purple",
                                                                      "orange") for s in ("circle", "square",
                                                                                          "triangle")}
                         if f"{c} {s}?" in question)
            assert (asked in objects) == (r["kind"] == "present") == (r["chosen"] == "yes")
        elif r["kind"] == "color":
            shape = question.split("the ")[-1].split("?")[0]
            assert r["chosen"] == next(c for c, s in objects if s == shape) != r["rejected"]
        else:  # the rejected description names one object more, the chosen one exactly the image's
            assert r["chosen"].count(" a") + r["chosen"].count(" an ") < r["rejected"].count(" a") + \
                r["rejected"].count(" an ")
            assert all(f"{c} {s}" in r["chosen"] for c, s in objects)


# ----------------------------------------------------------------------------------------------- converters
def png_bytes(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_rlaif_v_parquet_rows_become_records_with_their_images_written(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"ds_name": "RLAIF-V", "image": {"bytes": png_bytes("red"), "path": None},
             "question": "What is in the image?", "chosen": "A red square.", "rejected": "A red square and a dog.",
             "origin_dataset": "COCO", "origin_split": '{"model": "llava"}', "idx": "rlaif_1",
             "image_path": "coco/1.jpg"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "RLAIF-V-Dataset_000.parquet")
    records, dropped = convert("rlaif_v", read_rows(tmp_path / "RLAIF-V-Dataset_000.parquet"), tmp_path / "images")
    assert records == [{"id": "rlaif_1", "image": "rlaif_1.png",
                        "conversations": [{"from": "human", "value": "<image>\nWhat is in the image?"}],
                        "chosen": "A red square.", "rejected": "A red square and a dog."}] and not dropped
    assert Image.open(tmp_path / "images" / "rlaif_1.png").getpixel((0, 0)) == (255, 0, 0)


def vlfeedback_row(ratings: list[list[str]]) -> dict:
    aspects = ("Helpfulness", "Ethical Considerations", "Visual Faithfulness")
    return {"id": "svit-1", "prompt": "What is the man holding?", "models": [f"m{k}" for k in range(len(ratings))],
            "img_path": "svit/1.jpg",
            "completions": [{"model": f"m{k}", "response": f"reply {k}",
                             "annotations": {a: {"Rating": r, "Rationale": "..."} for a, r in zip(aspects, rs,
                                                                                                  strict=True)}}
                            for k, rs in enumerate(ratings)]}


def test_vlfeedback_pairs_the_best_and_worst_mean_rating_and_counts_ties(tmp_path):
    rows = [vlfeedback_row([["4", "5", "3"], ["5", "5", "5"], ["2", "5", "2"], ["5", "5", "5"]]),  # 4, 5, 3, 5
            vlfeedback_row([["3", "3", "3"], ["3", "3", "3"]]),  # a tie: dropped
            vlfeedback_row([["N/A", "5", "5"], ["1", "1", "1"], ["2", "2", "2"]])]  # a rating that is no number
    (tmp_path / "vlfeedback_80k.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records, dropped = convert("vlfeedback", read_rows(tmp_path / "vlfeedback_80k.jsonl"))
    assert [(r["chosen"], r["rejected"]) for r in records] == [("reply 1", "reply 2"), ("reply 2", "reply 1")]
    assert records[0]["conversations"] == [{"from": "human", "value": "<image>\nWhat is the man holding?"}]
    assert records[0]["image"] == "svit/1.jpg"
    assert dropped == {"tie (equal scores)": 1, "response with a rating that is not a number": 1}
    every, dropped_all = convert("vlfeedback", rows[:1], pairs="all")  # Silkie: every pair of different scores
    assert len(every) == 5 and dropped_all["tie (equal scores)"] == 1  # C(4,2) = 6 pairs, one tie (5 vs 5)


def test_povid_records_keep_their_shared_turns_and_drop_diverging_prefixes():
    ask = {"from": "human", "value": "<image>\nDescribe this image in detail."}
    rows = [{"id": "COCO_1", "image": "COCO_1.jpg", "conversations": [ask, {"from": "gpt", "value": "A cat."}],
             "rejected_conversations": [ask, {"from": "gpt", "value": "A cat and a dog."}]},
            {"id": "COCO_2", "image": "COCO_2.jpg", "conversations": [ask, {"from": "gpt", "value": "A cat."}],
             "rejected_conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                        {"from": "gpt", "value": "A dog."}]}]
    records, dropped = convert("povid", rows)
    assert records == [{"id": "COCO_1", "image": "COCO_1.jpg", "conversations": [ask], "chosen": "A cat.",
                        "rejected": "A cat and a dog."}]
    assert dropped == {"diverging prefix": 1}


def test_onevision_prompts_get_one_leading_image_placeholder():
    rows = [{"id": "1", "image": "coco/1.jpg", "prompt": "What color <image> is the bus?", "answer": "",
             "chosen": "Red.", "rejected": "Blue."},
            {"id": "2", "prompt": "Say hi.", "chosen": "Hi.", "rejected": "Hi"}]  # "Hi" vs "Hi.": different
    records, dropped = convert("onevision", rows)
    assert records[0]["conversations"][0]["value"] == "<image>\nWhat color  is the bus?"
    assert records[1]["conversations"][0]["value"] == "Say hi." and "image" not in records[1] and not dropped


def test_yes_on_absent_counts_yes_answers_to_questions_about_absent_objects(tmp_path):
    from llava_sft.eval.preferences import yes_on_absent

    gold = [{"question_id": 0, "answer": "no", "category": "exists"},
            {"question_id": 1, "answer": "no", "category": "exists"},
            {"question_id": 2, "answer": "yes", "category": "exists"},
            {"question_id": 3, "answer": "red", "category": "color"}]
    said = [{"question_id": 0, "text": "Yes, there is."}, {"question_id": 1, "text": "No."},
            {"question_id": 2, "text": "yes"}, {"question_id": 3, "text": "yes"}]
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gold))
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in said))
    assert yes_on_absent(tmp_path / "answers.jsonl", tmp_path / "gold.jsonl") == {"rate": 0.5, "n": 2}
