"""AnyRes through the pipeline: the loader's tiles and per-image token counts, the start-up check's length policy
counted from image headers, packing, and a Stage-2 run through the CLI whose saved model (image_newline, pinpoints)
answers through `generate`. Tiny tower: 32-px tiles of 4 x 4 patch tokens, LLaVA-1.6's grids scaled to 32 px."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import save_config
from llava_sft.constants import IMAGE_TOKEN_INDEX
from llava_sft.train.trainer import train
from tests.tiny import run_config

pytestmark = pytest.mark.latest_stack  # passes on constraints/latest.txt too (CI runs it there)

REPO = Path(__file__).resolve().parents[1]
SIZES = [(64, 40), (40, 80), (96, 32), (32, 32), (50, 70), (100, 100)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Shapes data whose images are resized to six aspect ratios, plus one two-image sample."""
    out = tmp_path_factory.mktemp("anyres_data")
    make_shapes(out, seed=7, image_size=32, n_stage1=8, n_stage2=24, n_eval=2, text_only_frac=0.2)
    names = sorted(p.name for p in (out / "images").iterdir())
    for i, name in enumerate(names):
        with Image.open(out / "images" / name) as image:
            image.convert("RGB").resize(SIZES[i % len(SIZES)], Image.Resampling.BICUBIC).save(out / "images" / name)
    records = json.loads((out / "stage2.json").read_text())
    with_images = [r for r in records if "image" in r]
    records.append({"id": "two-images", "image": [with_images[0]["image"], with_images[1]["image"]],
                    "conversations": [{"from": "human", "value": "<image>\n<image>\nAre they the same?"},
                                      {"from": "gpt", "value": "No."}]})
    (out / "stage2.json").write_text(json.dumps(records))
    return out


def anyres_config(tokenizer_dir, data, out, **train_kw):
    cfg = run_config(tokenizer_dir, data, out, stage=2, **{"max_steps": 3, "lr": 3e-3, **train_kw})
    cfg.model.image_aspect = "anyres"
    return cfg


def test_the_loader_tiles_each_image_and_counts_its_tokens_as_the_model_splices_them(llama_tokenizer_dir, data,
                                                                                       tmp_path):
    """A 64x40 image: best grid 64x64 (2 x 2 tiles), feature map 8 x 8, unpad keeps int(40 * 8 / 64) = 5 rows plus
    (8 - 5) % 2 = 1 -> 6 rows of 8 + a newline: 16 + 6 * 9 = 70 tokens, from 5 tiles (counted by hand)."""
    from llava_sft.train.build import build

    cfg = anyres_config(llama_tokenizer_dir, data, tmp_path / "run")
    model, tokenizer, dataset = build(cfg, torch.device("cpu"), 0, 1)
    records = [dataset.records[i] for i in range(len(dataset))]
    index = next(i for i, r in enumerate(records) if isinstance(r.get("image"), str)
                 and Image.open(data / "images" / r["image"]).size == (64, 40))
    sample = dataset[index]
    assert sample["images"].shape == (5, 3, 32, 32) and sample["image_sizes"] == [(64, 40)]
    assert sample["image_tokens"].tolist() == [70]
    two = dataset[next(i for i, r in enumerate(records) if r["id"] == "two-images")]
    assert two["images"].shape[0] == 2 and two["image_sizes"] == [None, None]  # one `pad` view each
    assert two["image_tokens"].tolist() == [17, 17]  # 16 + one newline
    for s in (sample, two):
        ids = s["input_ids"][None]
        with torch.no_grad():
            batch = model.embed(ids, torch.ones_like(ids), s["images"], s["labels"][None], image_sizes=s["image_sizes"])
        assert batch.inputs_embeds.shape[1] == ids.shape[1] - len(s["image_sizes"]) + int(s["image_tokens"].sum())
    # the newline is where the reference puts it: after each row of the unpadded grid (16 base tokens first)
    features = model.image_features(sample["images"], sample["image_sizes"])[0]
    rows = features[16:].view(6, 9, -1)
    assert torch.equal(rows[:, 8], model.image_newline.detach()[None].expand(6, -1))
    # it trains with the LLM (Stage 2), not in Stage 1 (projector only)
    for train_llm in (True, False):
        model.set_trainable(train_projector=True, train_llm=train_llm)
        model.image_newline.grad = None
        ids = sample["input_ids"][None]
        loss, _ = model(ids, torch.ones_like(ids), sample["images"], sample["labels"][None],
                        image_sizes=sample["image_sizes"])
        loss.backward()
        grad = model.image_newline.grad
        assert (grad is not None and grad.abs().sum() > 0) if train_llm else grad is None


def test_the_start_up_check_counts_image_tokens_from_headers_as_the_loader_does(llama_tokenizer_dir, data, tmp_path):
    """max_length 96: whether a sample is truncated depends on its image's size (16 to 88 + text tokens); the
    start-up check (headers only) and the loader (pixels) must agree sample by sample."""
    from llava_sft.train.build import build

    cfg = anyres_config(llama_tokenizer_dir, data, tmp_path / "run")
    cfg.data.max_length, cfg.data.bad_samples = 96, "skip"
    _, _, dataset = build(cfg, torch.device("cpu"), 0, 1)
    loaded = [dataset[i] for i in range(len(dataset))]
    truncated = sum(s.get("truncated", False) for s in loaded)
    assert 0 < truncated < len(loaded)
    assert not any("skip" in s for s in loaded)  # what the check let through, the loader loads
    catalog = dataset.records.catalog
    assert catalog.meta["will_truncate"] == truncated
    for i, s in enumerate(loaded):  # the sampler's length estimate counts each image's own tokens
        words = sum(len(t["value"].split()) for t in dataset.records[i]["conversations"])
        assert dataset.approx_length(i) == words + int(s["image_tokens"].sum())


def test_packed_anyres_training_matches_padded(llama_tokenizer_dir, data, tmp_path):
    runs = {}
    for packing in (False, True):
        cfg = anyres_config(llama_tokenizer_dir, data, tmp_path / str(packing), global_batch_size=8,
                            micro_batch_size=1 if packing else 2)
        cfg.data.packing, cfg.data.pack_max_tokens = packing, 256
        train(cfg)
        runs[packing] = [json.loads(x) for x in (tmp_path / str(packing) / "metrics.jsonl").read_text().splitlines()]
    plain, packed = runs[False], runs[True]
    assert [r["tokens"] for r in packed] == [r["tokens"] for r in plain]
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in plain], rel=1e-4)


@pytest.mark.timeout(300)
def test_a_stage2_anyres_run_through_the_cli_trains_the_newline_and_its_model_answers(llama_tokenizer_dir, data,
                                                                                       tmp_path):
    from safetensors.torch import load_file

    from llava_sft.data.tokenize import tokenize_prompt
    from llava_sft.generate import Answerer

    cfg = anyres_config(llama_tokenizer_dir, data, tmp_path / "run", max_steps=4)
    path = tmp_path / "anyres.yaml"
    save_config(cfg, path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "llava_sft.train", str(path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[-1]["loss"] < rows[0]["loss"]
    saved = json.loads((tmp_path / "run" / "llava_config.json").read_text())
    assert saved["image"]["aspect"] == "anyres" and saved["image"]["side"] == 4
    assert saved["image"]["pinpoints"] == [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
    newline = load_file(str(tmp_path / "run" / "projector.safetensors"))["image_newline"]
    assert newline.shape == (64,)

    answerer = Answerer(tmp_path / "run", device="cpu")
    assert torch.equal(answerer.model.image_newline.detach(), newline)
    image = Image.open(data / "images" / sorted(os.listdir(data / "images"))[0]).convert("RGB")
    assert image.size == (64, 40)
    text = answerer.answer(["What color is it?"], [image], max_new_tokens=6)[0]
    pixels, size, _ = answerer.processor.tiles(image)
    ids = torch.tensor([tokenize_prompt(answerer.prompt_for("What color is it?"), answerer.tokenizer)])
    assert ids.eq(IMAGE_TOKEN_INDEX).sum() == 1 and pixels.shape[0] == 5 and size == (64, 40)
    with torch.no_grad():
        out = answerer.model.generate(ids, torch.ones_like(ids), pixels, image_sizes=[size], max_new_tokens=6,
                                      do_sample=False, eos_token_id=answerer.stop_ids,
                                      pad_token_id=answerer.tokenizer.pad_token_id)
    assert text == answerer.tokenizer.decode(out[0], skip_special_tokens=True).strip()

    # the eval runner passes each image's tiles and size (a question file over images of every aspect)
    from llava_sft.eval import run_vqa

    questions = [{"question_id": i, "image": name, "text": "What color is it?"}
                 for i, name in enumerate(sorted(os.listdir(data / "images"))[:6])]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    run_vqa.main(["--model", str(tmp_path / "run"), "--questions", str(tmp_path / "q.jsonl"), "--image-folder",
                  str(data / "images"), "--answers", str(tmp_path / "a.jsonl"), "--batch-size", "3",
                  "--max-new-tokens", "6", "--device", "cpu"])
    answers = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert answers[0]["text"] == text and len(answers) == 6  # batched with five other sizes: the same answer


def test_inspect_counts_each_images_tokens_and_names_its_grid(llama_tokenizer_dir, data, tmp_path):
    """python -m llava_sft.inspect --image-aspect anyres: rows carry the same counts as the loader (64x40 -> 70,
    several images -> 17 each), and the printed samples name the grid."""
    records = json.loads((data / "stage2.json").read_text())
    first = next(r for r in records if isinstance(r.get("image"), str)
                 and Image.open(data / "images" / r["image"]).size == (64, 40))
    two = next(r for r in records if r["id"] == "two-images")
    (tmp_path / "few.json").write_text(json.dumps([first, two]))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "llava_sft.inspect", "--data", str(tmp_path / "few.json"),
                             "--tokenizer", str(llama_tokenizer_dir), "--template", "vicuna_v1", "--out",
                             str(tmp_path / "rows.jsonl"), "--image-aspect", "anyres", "--image-folder",
                             str(data / "images"), "--tile", "32", "--side", "4"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["image_tokens"] for r in rows] == [[70], [17, 17]]
    assert "grid 2x2 tiles + base of 64x40 px -> 70 image tokens" in result.stdout
    assert "one pad view (several images in the sample) -> 17 image tokens" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "llava_sft.inspect", "--data", str(tmp_path / "few.json"),
                              "--tokenizer", str(llama_tokenizer_dir), "--template", "vicuna_v1", "--out",
                              str(tmp_path / "x.jsonl"), "--image-aspect", "anyres_max_0"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "anyres_max_N" in missing.stderr


def test_validate_counts_each_images_tokens_as_the_loader(llama_tokenizer_dir, data, tmp_path):
    from llava_sft.data.validate import validate
    from llava_sft.train.build import build

    cfg = anyres_config(llama_tokenizer_dir, data, tmp_path / "run")
    report = validate(cfg, workers=1, progress=False)
    assert report["problems"] == {}
    _, _, dataset = build(cfg, torch.device("cpu"), 0, 1)
    lengths = [len(s["input_ids"]) + int((s["image_tokens"] - 1).sum()) for s in map(dataset.__getitem__,
                                                                                   range(len(dataset)))]
    assert report["lengths"]["total"]["max"] == max(lengths) and max(lengths) > 100  # a 2x2 grid's 88 + text


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_anyres_on_two_ranks_ddp_zero3_and_fsdp2_matches_one_process_and_resumes_exactly(llama_tokenizer_dir, data, tmp_path):
    """Tiles of different counts per rank, the newline a parameter of the root module (ZeRO-3 and FSDP2 shard it and
    gather it for the merge; DDP's text-only anchor must reach it): the losses of one process, the same trained
    newline in each saved model; and a resumed run continues exactly."""
    from tests.test_deepspeed import ds_json, rows, stage2_from_pretrained, torchrun

    def config(name, **kw):
        cfg = stage2_from_pretrained(llama_tokenizer_dir, data, tmp_path, name, global_batch_size=8,
                                     micro_batch_size=2, lr=3e-3, **kw)
        cfg.model.image_aspect = "anyres"
        return cfg

    from safetensors.torch import load_file

    train(config("plain", save_every=2))
    want = rows(tmp_path / "plain")
    assert len(want) == 4 and want[-1]["loss"] < want[0]["loss"]
    torchrun(config("ddp"), tmp_path, "ddp", 29741)
    torchrun(config("zero3", deepspeed=str(ds_json(tmp_path, "zero3.json"))), tmp_path, "zero3", 29742)
    torchrun(config("fsdp2", engine="fsdp2"), tmp_path, "fsdp2", 29743)
    newline = load_file(str(tmp_path / "plain" / "projector.safetensors"))["image_newline"]
    for name in ("ddp", "zero3", "fsdp2"):
        got = rows(tmp_path / name)
        assert [r["tokens"] for r in got] == [r["tokens"] for r in want], name
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-4), name
        saved = load_file(str(tmp_path / name / "projector.safetensors"))["image_newline"]  # gathered, trained alike
        torch.testing.assert_close(saved, newline, rtol=1e-3, atol=1e-5, msg=name)
    # resume from the step-2 checkpoint of the one-process run: steps 3 and 4 exactly as uninterrupted
    train(config("resumed", resume=str(tmp_path / "plain" / "checkpoints" / "step_2")))
    again = rows(tmp_path / "resumed")
    assert [r["step"] for r in again] == [3, 4] and [r["loss"] for r in again] == [r["loss"] for r in want][2:]


def test_anyres_max_interpolates_in_training_as_it_counts(llama_tokenizer_dir, data, tmp_path):
    """anyres_max_1 on the 4 x 4-token tower: a 64x40 image's unpadded 6 x 8 map holds 3 tiles' worth of tokens,
    ratio sqrt(48 / 16) = 1.73 > 1.1 -> (6 // 1.73, 8 // 1.73) = 3 x 4: 16 + 3 * 5 = 31 tokens (by hand); the loader,
    the model's merge and a training step agree."""
    from llava_sft.train.build import build

    cfg = anyres_config(llama_tokenizer_dir, data, tmp_path / "run", max_steps=2)
    cfg.model.image_aspect = "anyres_max_1"
    model, _, dataset = build(cfg, torch.device("cpu"), 0, 1)
    index = next(i for i in range(len(dataset)) if isinstance(dataset.records[i].get("image"), str)
                 and Image.open(data / "images" / dataset.records[i]["image"]).size == (64, 40))
    sample = dataset[index]
    assert sample["image_tokens"].tolist() == [31]
    assert model.image_features(sample["images"], sample["image_sizes"])[0].shape[0] == 31
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
