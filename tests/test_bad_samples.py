"""Bad input never disappears silently: a clear error naming the sample, or a counted skip.

Uses the real `LlavaJsonDataset`, `ImageProcessor` and `Collator` on a JSON file and PNG folder
written to tmp_path, with the Vicuna-like slow Llama tokenizer and the vicuna_v1 template.
"""
from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch

from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_sft.data.dataset import Collator, LlavaJsonDataset, fit_length
from llava_sft.data.images import ImageProcessor
from llava_sft.data.templates import BadSampleError, get_template
from llava_sft.data.tokenize import tokenize_conversation

TOKENS_PER_IMAGE = 16
PROCESSOR = ImageProcessor(size=32, mean=(0.48145466, 0.4578275, 0.40821073),
                           std=(0.26862954, 0.26130258, 0.27577711), aspect="pad")
LONG_REPLY = "There are 3 dogs in the park, and the dog looks happy. " * 6


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


def good(sample_id, image="a.png"):
    if image is None:
        return {"id": sample_id, "conversations": [human("Hello!"), gpt("Hi there.")]}
    return {"id": sample_id, "image": image, "conversations": [human("<image>\nWhat is it?"), gpt("It is red.")]}


# (sample id, record, start of the reason) -- structural problems found at start-up
STRUCTURE_BAD = [
    ("placeholder_no_image", {"id": "placeholder_no_image", "conversations": [human("<image>\nWhat?"), gpt("Red.")]},
     "1 '<image>' placeholder(s) but 0 image(s)"),
    ("image_no_placeholder", {"id": "image_no_placeholder", "image": "a.png",
                              "conversations": [human("What is it?"), gpt("Red.")]},
     "0 '<image>' placeholder(s) but 1 image(s)"),
    ("two_images_one_placeholder", {"id": "two_images_one_placeholder", "image": ["a.png", "b.png"],
                                    "conversations": [human("<image>\nWhat is it?"), gpt("Red.")]},
     "1 '<image>' placeholder(s) but 2 image(s)"),
    ("no_assistant", {"id": "no_assistant", "conversations": [human("Hello!")]}, "odd number of turns (1)"),
    ("odd_turns", {"id": "odd_turns", "conversations": [human("Hi"), gpt("Hi."), human("Bye")]},
     "odd number of turns (3)"),
    ("not_alternating", {"id": "not_alternating", "conversations": [human("Hi"), human("Hello?")]},
     "turn 1 is from 'human', expected 'gpt'"),
    ("gpt_first", {"id": "gpt_first", "conversations": [gpt("Hi."), human("Hello?")]},
     "turn 0 is from 'gpt', expected 'human'"),
    ("empty_reply", {"id": "empty_reply", "conversations": [human("Hi"), gpt("")]}, "assistant turn 1 is empty"),
    ("blank_reply", {"id": "blank_reply", "conversations": [human("Hi"), gpt("Hi."), human("And?"), gpt("  \n ")]},
     "assistant turn 3 is empty"),
    ("no_turns", {"id": "no_turns", "conversations": []}, "no conversation turns"),
    ("no_conversations", {"id": "no_conversations", "image": "a.png"}, "not a record with 'conversations'"),
]


@pytest.fixture
def make_dataset(tmp_path, llama_tokenizer, write_pngs):
    """make_dataset(records, images=("a.png", "b.png"), **kwargs) -> LlavaJsonDataset over tmp files."""

    def make(records, images=("a.png", "b.png"), **kwargs):
        folder = tmp_path / "images"
        folder.mkdir(exist_ok=True)
        write_pngs(folder, list(images), size=(40, 24))
        path = tmp_path / "data.json"
        path.write_text(json.dumps(records))
        kwargs.setdefault("max_length", 512)
        return LlavaJsonDataset(path, folder, llama_tokenizer, get_template("vicuna_v1"), PROCESSOR,
                                TOKENS_PER_IMAGE, **kwargs)

    return make


# ----------------------------------------------------------------------------- missing images
def test_missing_image_startup_error_names_sample(make_dataset):
    two = {"id": "lost_2", "image": ["a.png", "gone.png"],
           "conversations": [human("<image>\n<image>\nCompare the two images."), gpt("The first one is red.")]}
    records = [good("ok"), good("lost_1", image="nowhere.png"), two]
    with pytest.raises(BadSampleError) as info:
        make_dataset(records)
    message = str(info.value)
    assert "2 bad sample(s)" in message
    assert "'lost_1'" in message and "nowhere.png" in message
    assert "'lost_2'" in message and "gone.png" in message
    assert "missing image file" in message
    assert "'ok'" not in message.split("found at start-up")[1]


def test_missing_image_skip_is_counted(make_dataset):
    records = [good("ok"), good("lost", image="nowhere.png"), good("text", image=None)]
    dataset = make_dataset(records, bad_samples="skip")
    assert len(dataset) == 2
    assert [r["id"] for r in dataset.records] == ["ok", "text"]
    assert dataset.report.counts() == {"missing image file": 1}
    assert [sample_id for sample_id, _ in dataset.report.skipped] == ["lost"]
    assert "nowhere.png" in dataset.report.skipped[0][1]


def test_missing_image_without_startup_check_error(make_dataset):
    dataset = make_dataset([good("ok"), good("lost", image="nowhere.png")], check_images=False)
    assert len(dataset) == 2  # not checked at start-up
    assert dataset[0]["id"] == "ok"
    with pytest.raises(BadSampleError) as info:
        dataset[1]
    assert info.value.sample_id == "lost"
    assert "'lost'" in str(info.value) and "missing image file" in str(info.value) and "nowhere.png" in str(info.value)


def test_missing_image_without_startup_check_skip(make_dataset):
    dataset = make_dataset([good("ok"), good("lost", image="nowhere.png")], check_images=False, bad_samples="skip")
    item = dataset[1]
    assert set(item) == {"skip", "id"}
    assert item["id"] == "lost" and item["skip"].startswith("missing image file")


# ----------------------------------------------------------------------------- corrupt images
def write_broken(tmp_path, write_pngs, kind) -> None:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    if kind == "garbage":
        content = b"this is not a PNG at all" * 10
    elif kind == "empty":
        content = b""
    elif kind == "bomb":  # a PNG header declaring 20000 x 20000 pixels: over twice PIL's limit, refused at open
        ihdr = b"IHDR" + struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
        content = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    else:  # a real PNG cut in the middle of its pixel data: the header is intact
        data = write_pngs(tmp_path / "src", ["big.png"], size=(64, 64))[0].read_bytes()
        content = data[: len(data) // 2]
    (folder / "broken.png").write_bytes(content)


@pytest.mark.parametrize("kind", ["garbage", "empty", "bomb", "truncated_png"])
def test_corrupt_image_found_at_startup(make_dataset, tmp_path, write_pngs, kind):
    """The default header check finds files that are no image at all; `decode` also finds truncated ones."""
    write_broken(tmp_path, write_pngs, kind)
    check = "decode" if kind == "truncated_png" else "header"
    with pytest.raises(BadSampleError) as info:
        make_dataset([good("ok"), good("broken", image="broken.png")], check_images=check)
    message = str(info.value)
    assert "1 bad sample(s) found at start-up" in message
    assert "'broken'" in message and "corrupt image" in message and "broken.png" in message


def test_truncated_image_passes_header_check_and_fails_when_loaded(make_dataset, tmp_path, write_pngs):
    write_broken(tmp_path, write_pngs, "truncated_png")
    dataset = make_dataset([good("ok"), good("broken", image="broken.png")])  # header only: cannot know
    assert len(dataset) == 2
    assert dataset[0]["id"] == "ok"
    with pytest.raises(BadSampleError) as info:
        dataset[1]
    assert info.value.sample_id == "broken"
    assert "'broken'" in str(info.value) and "corrupt image" in str(info.value) and "broken.png" in str(info.value)


@pytest.mark.parametrize("check", ["stat", "off"])
def test_corrupt_image_unchecked_at_startup_is_a_bad_sample_when_loaded(make_dataset, tmp_path, check):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG garbage")
    dataset = make_dataset([good("broken", image="broken.png")], bad_samples="skip", check_images=check)
    item = dataset[0]
    assert item["id"] == "broken" and item["skip"].startswith("corrupt image")


def test_corrupt_image_skip_at_startup_is_counted(make_dataset, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG garbage")
    dataset = make_dataset([good("ok"), good("broken", image="broken.png")], bad_samples="skip")
    assert [r["id"] for r in dataset.records] == ["ok"]
    assert dataset.report.counts() == {"corrupt image": 1}


# ----------------------------------------------------------------------------- structural problems
@pytest.mark.parametrize("sample_id,record,reason", STRUCTURE_BAD, ids=[c[0] for c in STRUCTURE_BAD])
def test_structure_error_names_sample(make_dataset, sample_id, record, reason):
    with pytest.raises(BadSampleError) as info:
        make_dataset([good("ok"), record])
    message = str(info.value)
    assert "1 bad sample(s)" in message
    assert f"sample {sample_id!r}: {reason}" in message


@pytest.mark.parametrize("sample_id,record,reason", STRUCTURE_BAD, ids=[c[0] for c in STRUCTURE_BAD])
def test_structure_skip_is_counted(make_dataset, sample_id, record, reason):
    dataset = make_dataset([good("ok"), record, good("text", image=None)], bad_samples="skip")
    assert [r["id"] for r in dataset.records] == ["ok", "text"]
    assert len(dataset.report.skipped) == 1
    skipped_id, skipped_reason = dataset.report.skipped[0]
    assert skipped_id == sample_id and skipped_reason.startswith(reason)
    assert sum(dataset.report.counts().values()) == 1


def test_every_bad_sample_listed_and_nothing_lost(make_dataset):
    """All bad samples at once: the error lists every id; with skip, kept + reported == all records."""
    records = [good("ok_image"), good("ok_text", image=None), good("lost", image="nowhere.png")]
    records += [record for _, record, _ in STRUCTURE_BAD]
    bad_ids = ["lost"] + [sample_id for sample_id, _, _ in STRUCTURE_BAD]
    with pytest.raises(BadSampleError) as info:
        make_dataset(records)
    assert f"{len(bad_ids)} bad sample(s)" in str(info.value)
    for sample_id in bad_ids:
        assert f"sample {sample_id!r}:" in str(info.value)

    dataset = make_dataset(records, bad_samples="skip")
    assert [r["id"] for r in dataset.records] == ["ok_image", "ok_text"]
    assert sorted(sample_id for sample_id, _ in dataset.report.skipped) == sorted(bad_ids)
    assert len(dataset) + sum(dataset.report.counts().values()) == len(records)


def test_records_without_id_are_named_by_position(make_dataset):
    records = [{"conversations": [human("Hi")]}, {"conversations": [human("Hi"), gpt("Hello.")]}]
    with pytest.raises(BadSampleError) as info:
        make_dataset(records)
    assert "sample '#0': odd number of turns" in str(info.value)


def test_records_without_id_keep_their_name_after_skips(make_dataset, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"garbage")
    records = [{"conversations": [human("Hi")]},  # #0: rejected at start-up
               {"image": "broken.png", "conversations": [human("<image>\nWhat?"), gpt("Red.")]}]  # #1: corrupt
    dataset = make_dataset(records, bad_samples="skip", check_images="stat")
    assert dataset.report.skipped[0][0] == "#0"
    assert dataset[0]["id"] == "#1"  # the corrupt sample is record #1 of the file
    dataset = make_dataset(records, bad_samples="skip")  # the header check finds it at start-up, by the same name
    assert [sid for sid, _ in dataset.report.skipped] == ["#0", "#1"]


def test_non_string_image_field_is_a_bad_sample(make_dataset):
    record = {"id": "weird", "image": 5, "conversations": [human("<image>\nWhat is it?"), gpt("Red.")]}
    dataset = make_dataset([good("ok"), record], bad_samples="skip")
    assert [sample_id for sample_id, _ in dataset.report.skipped] == ["weird"]


def test_bad_policy_values_rejected(make_dataset):
    with pytest.raises(ValueError, match="overlong"):
        make_dataset([good("ok")], overlong="cut")
    with pytest.raises(ValueError, match="bad_samples"):
        make_dataset([good("ok")], bad_samples="ignore")


def test_unknown_template_lists_known():
    with pytest.raises(KeyError) as info:
        get_template("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in ("plain", "vicuna_v1", "llama3", "chatml"):
        assert name in message


# ----------------------------------------------------------------------------- over-long samples
def long_sample(sample_id="long"):
    return {"id": sample_id, "image": "a.png", "conversations": [human("<image>\nWhat is it?"), gpt(LONG_REPLY)]}


def full_tokens(tokenizer, record):
    return tokenize_conversation(record["conversations"], tokenizer, get_template("vicuna_v1"), num_images=1)


def test_overlong_truncate_cuts_text_after_image(make_dataset, llama_tokenizer):
    ids, labels = full_tokens(llama_tokenizer, long_sample())
    expanded = len(ids) - 1 + TOKENS_PER_IMAGE
    max_length = expanded - 20
    dataset = make_dataset([long_sample(), good("short")], max_length=max_length)
    item = dataset[0]
    out_ids, out_labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert item["truncated"] is True
    n_images = out_ids.count(IMAGE_TOKEN_INDEX)
    assert n_images == 1  # the image placeholder is kept
    assert len(out_ids) - n_images + n_images * TOKENS_PER_IMAGE == max_length
    assert out_ids == ids[: len(out_ids)] and out_labels == labels[: len(out_ids)]  # only the tail is cut
    assert any(label != IGNORE_INDEX for label in out_labels)
    assert item["images"].shape == (1, 3, 32, 32)
    short = dataset[1]
    assert short["truncated"] is False and short["input_ids"].tolist().count(IMAGE_TOKEN_INDEX) == 1


def test_overlong_exact_fit_is_not_truncated(make_dataset, llama_tokenizer):
    ids, labels = full_tokens(llama_tokenizer, long_sample())
    max_length = len(ids) - 1 + TOKENS_PER_IMAGE
    item = make_dataset([long_sample()], max_length=max_length)[0]
    assert item["truncated"] is False
    assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels


def assert_refused_at_startup(make_dataset, records, reason_part, bad_samples, **kwargs):
    """The over-long policy is applied at start-up: an error listing the sample, or a counted skip."""
    if bad_samples == "error":
        with pytest.raises(BadSampleError) as info:
            make_dataset(records, bad_samples=bad_samples, **kwargs)
        assert "found at start-up" in str(info.value) and "'long'" in str(info.value)
        assert reason_part in str(info.value)
    else:
        dataset = make_dataset(records, bad_samples=bad_samples, **kwargs)
        assert "long" not in [r["id"] for r in dataset.records]
        assert [sid for sid, _ in dataset.report.skipped] == ["long"]
        assert dataset.report.skipped[0][1].startswith("overlong") and reason_part in dataset.report.skipped[0][1]


@pytest.mark.parametrize("bad_samples", ["error", "skip"])
def test_overlong_image_does_not_fit(make_dataset, llama_tokenizer, bad_samples):
    ids, _ = full_tokens(llama_tokenizer, long_sample())
    max_length = ids.index(IMAGE_TOKEN_INDEX) + TOKENS_PER_IMAGE - 1  # the image's tokens would cross max_length
    assert_refused_at_startup(make_dataset, [long_sample()], "image tokens end beyond", bad_samples,
                              max_length=max_length)


@pytest.mark.parametrize("bad_samples", ["error", "skip"])
def test_overlong_no_supervised_token_left(make_dataset, llama_tokenizer, bad_samples):
    """A first human turn so long that nothing the assistant says fits: found before training, not in a loader
    worker at the step that reaches it."""
    ids, labels = full_tokens(llama_tokenizer, long_sample())
    first_supervised = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    max_length = first_supervised + TOKENS_PER_IMAGE - 1  # keeps everything up to "ASSISTANT:" only
    assert_refused_at_startup(make_dataset, [long_sample()], "no supervised token", bad_samples,
                              max_length=max_length)


@pytest.mark.parametrize("bad_samples", ["error", "skip"])
def test_overlong_drop(make_dataset, llama_tokenizer, bad_samples):
    ids, _ = full_tokens(llama_tokenizer, long_sample())
    max_length = len(ids) - 1 + TOKENS_PER_IMAGE - 1
    assert_refused_at_startup(make_dataset, [long_sample(), good("short")], "max_length", bad_samples,
                              max_length=max_length, overlong="drop")
    if bad_samples == "skip":
        dataset = make_dataset([long_sample(), good("short")], max_length=max_length, overlong="drop",
                               bad_samples="skip")
        assert dataset[0]["id"] == "short" and dataset[0]["truncated"] is False  # a sample that fits is untouched


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_runtime_overlong_still_follows_policy(overlong):
    """The loader applies the same function (fit_length) to whatever start-up did not catch."""
    ids = [1, 5, IMAGE_TOKEN_INDEX, 6, 7, 8, 9]
    labels = [IGNORE_INDEX] * 4 + [8, 9, 2]
    if overlong == "truncate":
        with pytest.raises(BadSampleError, match="no supervised token"):
            fit_length(ids, labels, 4 + TOKENS_PER_IMAGE - 1, TOKENS_PER_IMAGE, overlong, "x")
        assert fit_length(ids, labels, 5 + TOKENS_PER_IMAGE - 1, TOKENS_PER_IMAGE, overlong, "x")[2] is True
    else:
        with pytest.raises(BadSampleError, match="overlong"):
            fit_length(ids, labels, 5 + TOKENS_PER_IMAGE - 1, TOKENS_PER_IMAGE, overlong, "x")


# ----------------------------------------------------------------------------- data.cache_samples
def test_cached_samples_are_read_from_disk_once(make_dataset, tmp_path, caplog):
    """With the cache, a later epoch reuses the first load: the images can be gone by then. Without it the same
    access reads the disk again (and here finds the file missing), which is what the cache saves."""
    records = [good("a", image="a.png"), good("text", image=None), good("b", image="b.png")]
    cached = make_dataset(records, cache_samples=True)
    plain = make_dataset(records)
    with caplog.at_level("INFO", logger="llava_sft.data.dataset"):
        first = [cached[i] for i in range(3)]
    assert "data.cache_samples: all 3 samples held in memory" in caplog.text  # the memory it takes, logged once
    first[0].pop("input_ids")  # a caller changing its copy does not change the cache
    for png in (tmp_path / "images").iterdir():
        png.unlink()
    with pytest.raises(BadSampleError, match="missing image file"):
        plain[0]
    again = [cached[i] for i in range(3)]
    for item, reference in zip(again, [plain_item(records[i], plain) for i in range(3)], strict=True):
        assert item["id"] == reference["id"]
        assert torch.equal(item["input_ids"], reference["input_ids"])
        assert torch.equal(item["labels"], reference["labels"])
    assert again[0]["images"].shape == (1, 3, 32, 32) and again[1]["images"].shape == (0, 3, 32, 32)


def plain_item(record, dataset):
    """What the uncached dataset's first load would have given: the same tokenization, and the images' count."""
    ids, labels = tokenize_conversation(record["conversations"], dataset.tokenizer, dataset.template,
                                        num_images=1 if "image" in record else 0, sample_id=record["id"])
    return {"id": record["id"], "input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def test_a_cached_bad_sample_is_skipped_and_counted_every_epoch(make_dataset, tmp_path):
    """A sample that failed to load is cached as the skip it was, so each epoch still reports it."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG garbage")
    dataset = make_dataset([good("ok"), good("broken", image="broken.png")], bad_samples="skip",
                           check_images="off", cache_samples=True)
    for _ in range(2):
        batch = Collator(0)([dataset[0], dataset[1]])
        assert batch["ids"] == ["ok"]
        assert batch["skipped"][0][0] == "broken" and batch["skipped"][0][1].startswith("corrupt image")


# ----------------------------------------------------------------------------- collator
def test_collator_pads_and_reports_skips(make_dataset, llama_tokenizer, tmp_path, write_pngs):
    records = [
        good("one_image", image="a.png"),
        good("text", image=None),
        {"id": "two_images", "image": ["b.png", "c.png"],
         "conversations": [human("<image>\n<image>\nCompare the two images."), gpt("The first one is red.")]},
        good("broken", image="broken.png"),
        long_sample("long"),
    ]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"garbage")
    # stat only: the corrupt image is found when loaded, as a file broken after the start-up check would be
    dataset = make_dataset(records, images=("a.png", "b.png", "c.png"), bad_samples="skip", max_length=120,
                           check_images="stat")
    items = [dataset[i] for i in range(len(dataset))]
    assert "skip" in items[3]
    pad = llama_tokenizer.pad_token_id
    batch = Collator(pad)(items)

    assert batch["skipped"] == [("broken", items[3]["skip"])]
    assert batch["ids"] == ["one_image", "text", "two_images", "long"]
    assert batch["truncated"] == 1  # "long" (150 tokens after image expansion) does not fit in 120
    kept = [items[i] for i in (0, 1, 2, 4)]
    lengths = [len(item["input_ids"]) for item in kept]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, max(lengths))
    assert len(set(lengths)) > 1  # something is padded
    for row, (item, n) in enumerate(zip(kept, lengths, strict=True)):
        assert batch["input_ids"][row, :n].tolist() == item["input_ids"].tolist()  # right padding
        assert batch["labels"][row, :n].tolist() == item["labels"].tolist()
        assert batch["attention_mask"][row, :n].tolist() == [1] * n
        assert batch["input_ids"][row, n:].tolist() == [pad] * (max(lengths) - n)
        assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (max(lengths) - n)
        assert batch["attention_mask"][row, n:].tolist() == [0] * (max(lengths) - n)
    # images concatenated in sample order: a, (none), b, c, a
    expected_images = torch.cat([items[0]["images"], items[2]["images"], items[4]["images"]])
    assert batch["images"].shape == (4, 3, 32, 32)
    assert torch.equal(batch["images"], expected_images)
    assert not torch.equal(batch["images"][1], batch["images"][2])  # b and c really differ
    assert (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum().item() == 4


def test_collator_all_skipped():
    batch = Collator(0)([{"skip": "corrupt image: x", "id": "x"}, {"skip": "overlong: y", "id": "y"}])
    assert batch["skipped"] == [("x", "corrupt image: x"), ("y", "overlong: y")]
    assert batch["ids"] == [] and batch["truncated"] == 0
    assert "input_ids" not in batch
