"""`python -m llava_sft.data.validate`: every problem kind reported with its sample ids; exit code."""
from __future__ import annotations

import json

import pytest

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import save_config
from llava_sft.data.validate import main, tokens_per_image, validate
from llava_sft.train.trainer import build
from tests.tiny import run_config


@pytest.fixture()
def data(tmp_path):
    out = tmp_path / "data"
    make_shapes(out, seed=4, image_size=32, n_stage1=4, n_stage2=30, n_eval=2, text_only_frac=0.2)
    return out


def test_clean_data_passes_and_lengths_match_the_training_dataset(llama_tokenizer_dir, data, tmp_path):
    cfg = run_config(llama_tokenizer_dir, data, tmp_path / "run", stage=2)
    report = validate(cfg, decode_images=True, workers=1, progress=False)
    assert report["problems"] == {} and not report["run_would_fail"]
    _, _, dataset = build(cfg, __import__("torch").device("cpu"))
    assert report["tokens_per_image"] == dataset.tokens_per_image
    lengths = [len(dataset[i]["input_ids"]) + (dataset.tokens_per_image - 1) * dataset[i]["images"].shape[0]
               for i in range(len(dataset))]
    assert report["lengths"]["total"]["max"] == max(lengths)
    assert report["modality"] == {"image": sum(dataset.has_image(i) for i in range(len(dataset))),
                                  "text_only": sum(not dataset.has_image(i) for i in range(len(dataset))),
                                  "malformed": 0}
    assert report["clean_samples"] == report["samples"] == len(dataset)
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_file)
    assert main([str(cfg_file)]) == 0


def test_every_problem_kind_is_reported_with_its_sample(llama_tokenizer_dir, data, tmp_path):
    records = json.loads((data / "stage2.json").read_text())
    with_image = [r for r in records if "image" in r]
    with_image[0]["image"] = "nope.png"                                   # missing
    (data / "images" / with_image[1]["image"]).write_bytes(b"not a png")  # corrupt
    with_image[2]["conversations"] = with_image[2]["conversations"][:1]   # no assistant turn
    with_image[3]["conversations"][0]["value"] += " <image>"              # two placeholders, one image
    with_image[4]["conversations"][1]["value"] = "word " * 400            # over-long (truncated)
    with_image[5]["id"] = with_image[6]["id"]                             # duplicate id
    (data / "stage2.json").write_text(json.dumps(records))
    cfg = run_config(llama_tokenizer_dir, data, tmp_path / "run", stage=2)
    report = validate(cfg, decode_images=True, workers=2, progress=False)
    ids = {kind: [e["id"] for e in info["examples"]] for kind, info in report["problems"].items()}
    assert ids["missing"] == [with_image[0]["id"]]
    assert ids["corrupt"] == [with_image[1]["id"]]
    assert sorted(ids["structure"]) == sorted([with_image[2]["id"], with_image[3]["id"]])
    assert ids["overlong"] == [with_image[4]["id"]]
    assert ids["duplicate"] == [with_image[6]["id"]]
    assert report["run_would_fail"]
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_file)
    assert main([str(cfg_file), "--decode-images", "--report", str(tmp_path / "r.json")]) == 1
    assert json.loads((tmp_path / "r.json").read_text())["problems"]["missing"]["count"] == 1


def test_the_report_counts_add_up(llama_tokenizer_dir, data, tmp_path, capsys):
    """Every sample lands in exactly one of image / text-only / malformed, and the samples with a problem are
    counted once however many problems they have (here: 7 samples, one with two missing images)."""
    records = json.loads((data / "stage2.json").read_text())
    with_image = [r for r in records if "image" in r]
    text_only = [r for r in records if "image" not in r]
    with_image[0]["image"] = ["nope.png", "nope2.png"]                    # 2 missing files, 1 sample...
    with_image[0]["conversations"][0]["value"] += " <image>"              # ...with its two placeholders
    with_image[1]["conversations"] = with_image[1]["conversations"][:1]   # malformed
    text_only[0]["conversations"] = text_only[0]["conversations"][:1]     # malformed (text-only)
    with_image[2]["id"] = with_image[3]["id"] = with_image[4]["id"]       # one id shared by 3 samples
    with_image[5]["image"] = "gone.png"                                   # missing, and...
    with_image[5]["id"] = with_image[6]["id"]                             # ...a duplicate: counted once
    (data / "stage2.json").write_text(json.dumps(records))
    cfg = run_config(llama_tokenizer_dir, data, tmp_path / "run", stage=2)
    report = validate(cfg, workers=1, progress=False)
    split = report["modality"]
    assert split["malformed"] == 2
    assert split["image"] == len(with_image) - 1 and split["text_only"] == len(text_only) - 1
    assert split["image"] + split["text_only"] + split["malformed"] == report["samples"] == len(records)
    problems = report["problems"]
    assert (problems["missing"]["count"], problems["missing"]["samples"]) == (3, 2)
    assert (problems["duplicate"]["count"], problems["duplicate"]["samples"]) == (2, 5)
    assert problems["structure"]["samples"] == 2
    assert report["samples_with_problems"] == 8  # 0, 1, text 0, 2-4, 5-6: 1 + 1 + 1 + 3 + 2
    assert report["clean_samples"] == len(records) - 8
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_file)
    main([str(cfg_file)])
    out = capsys.readouterr().out
    assert f"{len(records)} samples = {split['image']} with images + {split['text_only']} text-only + 2 malformed" in out
    assert "missing: 3 image files in 2 samples" in out and "duplicate: 2 ids in 5 samples" in out
    assert f"samples with a problem: 8, clean: {len(records) - 8}" in out


def test_overlong_fails_the_run_only_when_it_would_drop(llama_tokenizer_dir, data, tmp_path):
    records = json.loads((data / "stage2.json").read_text())
    records[0]["conversations"][1]["value"] = "word " * 400
    (data / "stage2.json").write_text(json.dumps(records))
    cfg = run_config(llama_tokenizer_dir, data, tmp_path / "run", stage=2)
    assert not validate(cfg, progress=False)["run_would_fail"]  # truncate (default): a counted change, not a failure
    cfg.data.overlong = "drop"
    report = validate(cfg, progress=False)
    assert report["run_would_fail"] and report["problems"]["overlong_dropped"]["count"] == 1


def test_tokens_per_image_of_the_paper_towers(llama_tokenizer_dir, data, tmp_path):
    cfg = run_config(llama_tokenizer_dir, data, tmp_path / "run", stage=1)
    cfg.model.vision.model, cfg.model.vision.model_config_file = "ViT-L-14-336", None
    assert tokens_per_image(cfg) == 576  # 24 x 24 patches, CLS dropped (LLaVA-1.5)
    cfg.model.vision.model = "ViT-L-14"
    assert tokens_per_image(cfg) == 256  # LLaVA v1
