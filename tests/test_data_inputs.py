"""Data inputs said plainly: JSONL (one record per line, as instruction data often comes) is accepted wherever the
LLaVA JSON list is, a bad line is an error naming it (issue: a raw JSONDecodeError); a dataset padded with repeats
to fill its last global batch is a warning in the start-up log (issue: only report.json said so)."""
from __future__ import annotations

import json

import pytest

from data_prep.make_shapes import generate as make_shapes
from llava_sft.data.dataset import read_records
from llava_sft.train.trainer import train
from tests.tiny import run_config


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_jsonl")
    make_shapes(out, seed=8, image_size=32, n_stage1=8, n_stage2=8, n_eval=2, text_only_frac=0.25)
    return out


def test_jsonl_reads_as_the_same_records_and_trains(llama_tokenizer_dir, shapes_dir, tmp_path):
    records = json.loads((shapes_dir / "stage2.json").read_text())
    jsonl = tmp_path / "stage2.json"  # the extension does not matter: the first character does
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_records(jsonl) == records
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "run", stage=2, max_steps=1)
    cfg.data.path = str(jsonl)
    train(cfg)
    assert (tmp_path / "run" / "report.json").is_file()


def test_a_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"id": "a", "conversations": []}\n{"id": "b", oops}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl, line 2: not a JSON object"):
        read_records(path)
    path.write_text('{"id": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object \(a sample\), got list"):
        read_records(path)
    path.write_text('[{"id": "a"}, oops]')
    with pytest.raises(ValueError, match=r"not valid JSON .*JSONL"):
        read_records(path)


def test_a_dataset_smaller_than_a_global_batch_is_said_loudly(llama_tokenizer_dir, shapes_dir, tmp_path):
    """Issue: 26 samples under a 256 global batch made one step of which 230 were repeats, said only in report.json."""
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "run", stage=1, max_steps=1, global_batch_size=12,
                     micro_batch_size=4)  # 8 samples
    train(cfg)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "each epoch repeats 4 samples (50.0 % of the 8) to fill its last global batch of 12" in log
    assert "smaller than ONE global batch" in log


def test_duplicate_ids_are_refused_at_start_up(llama_tokenizer_dir, shapes_dir, tmp_path):
    """Issue: duplicate ids were trained (only `validate` reported them); under bad_samples=skip the repeat is skipped
    and counted."""
    from llava_sft.data.templates import BadSampleError

    records = json.loads((shapes_dir / "stage1.json").read_text())
    records.append(dict(records[2]))
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(records))
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "run", stage=1, max_steps=1)
    cfg.data.path = str(path)
    with pytest.raises(BadSampleError, match=rf"{records[2]['id']}.*duplicate id \(record #{len(records) - 1}; the "
                                             r"first was record #2\)"):
        train(cfg)
    cfg.data.bad_samples = "skip"
    train(cfg)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["samples"] == len(records) - 1 and sum(report["rejected_or_skipped"].values()) == 1


def test_16_bit_float_and_alpha_images_are_converted_faithfully_and_counted(llama_tokenizer_dir, shapes_dir,
                                                                            tmp_path):
    """Issue: 16-bit grayscale PNGs (I;16) became pure white and alpha was dropped without a count."""
    import numpy as np
    from PIL import Image

    from llava_sft.data.images import ImageProcessor, to_rgb

    fill = (122, 116, 104)  # int(OpenAI CLIP mean x 255), the padding colour
    gray16 = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 32896 / 257 = 128 exactly
    rgb, converted = to_rgb(gray16, fill)
    assert converted and rgb.getpixel((0, 0)) == (128, 128, 128)  # PIL's convert("RGB") gives (255, 255, 255)
    as_float = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))
    assert to_rgb(as_float, fill)[0].getpixel((0, 0)) == (128, 128, 128)
    hidden_red = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent, red underneath
    assert to_rgb(hidden_red, fill) == (to_rgb(hidden_red, fill)[0], True)
    assert to_rgb(hidden_red, fill)[0].getpixel((0, 0)) == fill
    assert to_rgb(Image.new("RGB", (8, 8), (1, 2, 3)), fill)[1] is False

    records = json.loads((shapes_dir / "stage1.json").read_text())[:4]
    folder = tmp_path / "images"
    folder.mkdir()
    gray16.save(folder / "gray16.png")
    hidden_red.save(folder / "alpha.png")
    assert Image.open(folder / "gray16.png").mode.startswith("I")
    records[0]["image"], records[1]["image"] = "gray16.png", "alpha.png"
    for r in records[2:]:
        (folder / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / r["image"]).write_bytes((shapes_dir / "images" / r["image"]).read_bytes())
    (tmp_path / "data.json").write_text(json.dumps(records))
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "run", stage=1, max_steps=1, global_batch_size=4,
                     micro_batch_size=4)
    cfg.data.path, cfg.data.image_folder = str(tmp_path / "data.json"), str(folder)
    train(cfg)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["images_converted"] == 2
    assert ImageProcessor(16, (0.5,) * 3, (0.5,) * 3).process(gray16)[1] is True


def test_a_skipped_sample_is_counted_once_however_often_it_comes_up(llama_tokenizer_dir, shapes_dir, tmp_path):
    """Issue: report.json over-counted skips of samples repeated to fill the last batch (and met in every epoch)."""
    records = json.loads((shapes_dir / "stage1.json").read_text())[:6]
    records[0]["image"] = "missing.png"
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "run", stage=1, max_steps=3, global_batch_size=8,
                     micro_batch_size=4)  # 6 samples, 2 repeated per epoch, 3 epochs
    cfg.data.path, cfg.data.bad_samples, cfg.data.check_images_at_start = str(path), "skip", False
    train(cfg)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["rejected_or_skipped"] == {"missing image file": 1}
    lines = (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [records[0]["id"]]


@pytest.mark.parametrize("text", ["The answer.</s> More text.", "Sure. USER: and now me", "Ends here. ASSISTANT:"])
def test_replies_holding_the_templates_markers_are_refused_or_kept_by_option(llama_tokenizer_dir, shapes_dir,
                                                                           tmp_path, text):
    """Issue: a literal '</s>' or 'USER:' inside a reply became a real end-of-turn token (or a role) inside the
    supervised span, silently."""
    from llava_sft.data.templates import BadSampleError

    records = json.loads((shapes_dir / "stage2.json").read_text())
    target = next(r for r in records if "image" in r)
    target["conversations"][1]["value"] = text
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "run", stage=2, max_steps=1)
    cfg.data.path = str(path)
    with pytest.raises(BadSampleError, match=rf"{target['id']}.*control string .* in turn 1 \(gpt\).*"
                                             r"data\.control_strings=keep"):
        train(cfg)
    cfg.data.control_strings = "keep"
    train(cfg)
    assert "1 samples contain the template's markers" in (tmp_path / "run" / "train.log").read_text()


def test_data_loss_on_all_reaches_the_training_dataset(llama_tokenizer_dir, shapes_dir, tmp_path):
    """data.loss_on is read where the trainer builds its dataset (train/build.py): the same sample's labels cover
    every text token under "all" and only the replies by default."""
    import torch

    from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from llava_sft.train.trainer import build

    labelled = {}
    for loss_on in ("replies", "all"):
        cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / loss_on, stage=2)
        cfg.data.loss_on = loss_on
        _, _, dataset = build(cfg, torch.device("cpu"))
        sample = dataset[0]
        ids, labels = sample["input_ids"], sample["labels"]
        text = ids != IMAGE_TOKEN_INDEX
        labelled[loss_on] = int((labels != IGNORE_INDEX).sum())
        if loss_on == "all":
            assert torch.equal(labels[text], ids[text]) and bool((labels[~text] == IGNORE_INDEX).all())
    assert labelled["replies"] < labelled["all"]
