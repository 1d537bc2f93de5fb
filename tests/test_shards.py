"""Webdataset shards: deterministic/resumable conversion (data_prep.make_shards) and the streaming
reader (llava_sft.data.shards.ShardDataset), against LlavaJsonDataset on the same synthetic data.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from data_prep.make_shapes import generate
from data_prep.make_shards import ConversionError, convert, main
from llava_sft.data.dataset import Collator, LlavaJsonDataset
from llava_sft.data.images import ImageProcessor
from llava_sft.data.shards import ShardDataset, read_shard
from llava_sft.data.templates import get_template
from llava_sft.model.llava import load_tokenizer

TOKENS_PER_IMAGE = 4
MAX_LENGTH = 512
PROCESSOR = ImageProcessor(size=32, mean=(0.48145466, 0.4578275, 0.40821073),
                           std=(0.26862954, 0.26130258, 0.27577711), aspect="pad")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate(out, seed=3, image_size=32, n_stage1=14, n_stage2=23, n_eval=2)
    return out


@pytest.fixture(scope="module")
def tokenizer(llama_tokenizer_dir):
    return load_tokenizer(str(llama_tokenizer_dir))


@pytest.fixture(scope="module")
def stage2_shards(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage2_shards")
    convert(shapes / "stage2.json", shapes / "images", out, samples_per_shard=5, workers=1)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------ (a) conversion
def test_conversion_is_deterministic_and_resumes(shapes, tmp_path):
    args = dict(data=shapes / "stage2.json", image_folder=shapes / "images", samples_per_shard=5)
    first = convert(out=tmp_path / "a", workers=2, **args)
    convert(out=tmp_path / "b", workers=1, **args)
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert a == b
    records = json.loads((shapes / "stage2.json").read_text())
    text_only = sum("image" not in r for r in records)
    assert first["totals"] == {"shards": 5, "samples": 23, "with_image": 23 - text_only, "text_only": text_only,
                                    "images": 23 - text_only, "bytes": first["totals"]["bytes"],
                                    "bad_samples": 0, "missing_images": 0}
    assert text_only > 0
    for entry in first["shards"]:  # sizes and checksums are those of the files
        assert len(a[entry["name"]]) == entry["bytes"]

    # interrupted: one shard gone, one partial temp file left behind, one shard truncated
    out = tmp_path / "a"
    (out / "shard-000001.tar").unlink()
    (out / "shard-000002.tar.tmp").write_bytes(a["shard-000002.tar"][:700])
    with open(out / "shard-000003.tar", "r+b") as f:
        f.truncate(1000)
    (out / "manifest.json").unlink()
    kept = {n: os.stat(out / n).st_mtime_ns for n in ("shard-000000.tar", "shard-000002.tar", "shard-000004.tar")}
    convert(out=out, workers=2, **args)
    assert snapshot(out) == b
    assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept  # complete shards were not rewritten

    # the webdataset naming convention: webdataset itself groups the members into our samples
    import webdataset as wds

    samples = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))
    assert len(samples) == 5
    for s in samples:
        record = json.loads(s["json"])
        assert s["__key__"].isdigit() and records[int(s["__key__"])] == record
        if "image" in record:  # original bytes, unchanged
            assert s["0.png"] == (shapes / "images" / record["image"]).read_bytes()
        else:
            assert set(s) == {"__key__", "__url__", "json"}


def test_max_shard_bytes(shapes, tmp_path):
    manifest = convert(shapes / "stage1.json", shapes / "images", tmp_path, samples_per_shard=100,
                       max_shard_bytes=20480, workers=1)
    assert manifest["totals"]["samples"] == 14 and manifest["totals"]["shards"] > 1
    for entry in manifest["shards"]:
        assert entry["bytes"] <= 20480 and (tmp_path / entry["name"]).stat().st_size == entry["bytes"]


# ------------------------------------------------------------------- (b) same samples as JSON
@pytest.mark.parametrize("stage, template", [("stage1", "plain"), ("stage2", "vicuna_v1")])
def test_samples_equal_json_dataset(shapes, tmp_path, tokenizer, stage, template):
    tpl = get_template(template)
    reference = LlavaJsonDataset(shapes / f"{stage}.json", shapes / "images", tokenizer, tpl, PROCESSOR,
                                 TOKENS_PER_IMAGE, MAX_LENGTH)
    expected = {reference[i]["id"]: reference[i] for i in range(len(reference))}
    if stage == "stage2":
        assert any(s["images"].shape[0] == 0 for s in expected.values())  # text-only samples included
    convert(shapes / f"{stage}.json", shapes / "images", tmp_path, samples_per_shard=4, workers=1)
    for buffer in (0, 5):
        ds = ShardDataset(tmp_path, tokenizer, tpl, PROCESSOR, TOKENS_PER_IMAGE, MAX_LENGTH, shuffle_buffer=buffer)
        got = list(ds)
        assert sorted(s["id"] for s in got) == sorted(expected) and len(ds) == len(expected)
        for sample in got:
            ref = expected[sample["id"]]
            assert set(sample) == set(ref) and sample["truncated"] == ref["truncated"]
            for k in ("input_ids", "labels", "images"):
                assert sample[k].dtype == ref[k].dtype and torch.equal(sample[k], ref[k]), (sample["id"], k)
    batch = Collator(tokenizer.pad_token_id)(got[:3])
    assert batch["input_ids"].shape[0] == 3 and not batch["skipped"]
    if stage == "stage2":  # over-long policy and skip semantics at run time are the same too
        for overlong in ("truncate", "drop"):
            kw = dict(overlong=overlong, bad_samples="skip")
            short = LlavaJsonDataset(shapes / "stage2.json", shapes / "images", tokenizer, tpl, PROCESSOR,
                                     TOKENS_PER_IMAGE, 40, **kw)
            expected = {s["id"]: s for s in (short[i] for i in range(len(short)))}
            # the JSON source skips at start-up what a stream can only skip when it meets it: the same samples
            expected.update({sid: {"id": sid, "skip": reason} for sid, reason in short.report.skipped})
            assert any("skip" in s for s in expected.values())
            ds = ShardDataset(tmp_path, tokenizer, tpl, PROCESSOR, TOKENS_PER_IMAGE, 40, shuffle_buffer=3, **kw)
            got = {s["id"]: s for s in ds}
            assert got.keys() == expected.keys()
            for sample_id, sample in got.items():
                ref = expected[sample_id]
                assert set(sample) == set(ref)
                assert all(torch.equal(v, ref[k]) if isinstance(v, torch.Tensor) else v == ref[k]
                           for k, v in sample.items())


# --------------------------------------------------------------------- (c) ranks x workers split
def test_ranks_by_workers_see_every_sample_once(stage2_shards, tokenizer):
    tpl = get_template("vicuna_v1")
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            ds = ShardDataset(stage2_shards, tokenizer, tpl, PROCESSOR, TOKENS_PER_IMAGE, MAX_LENGTH,
                              shuffle_buffer=4, seed=7, rank=rank, world_size=2)
            ds.set_epoch(epoch)
            loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=Collator(tokenizer.pad_token_id))
            ids = [i for batch in loader for i in batch["ids"]]
            assert len(ids) == len(ds) == [12, 11][rank]  # 23 samples: ranks differ by one, nothing dropped
            seen += ids
        assert len(seen) == 23 and Counter(seen).most_common(1)[0][1] == 1
        orders.append(seen)
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]


def test_split_is_deterministic_and_pads_ranks_on_request(stage2_shards, tokenizer):
    tpl = get_template("vicuna_v1")

    def ids(rank, **kw):
        ds = ShardDataset(stage2_shards, tokenizer, tpl, PROCESSOR, TOKENS_PER_IMAGE, MAX_LENGTH,
                          shuffle_buffer=4, seed=7, rank=rank, world_size=2, **kw)
        ds.set_epoch(3)
        return [s["id"] for s in ds]

    assert ids(0) == ids(0)
    padded = ids(0, pad_ranks=True) + ids(1, pad_ranks=True)
    assert len(padded) == 24 and len(set(padded)) == 23  # one sample repeated, reported by repeated_per_epoch
    ds = ShardDataset(stage2_shards, tokenizer, tpl, PROCESSOR, TOKENS_PER_IMAGE, MAX_LENGTH, world_size=2,
                      pad_ranks=True)
    assert ds.rank_counts() == [12, 12] and ds.repeated_per_epoch() == 1
    # the split rule itself: every (rank, worker) slot over 3 ranks x 2 workers, no duplicates, no gaps
    slots = []
    for rank in range(3):
        ds = ShardDataset(stage2_shards, tokenizer, tpl, PROCESSOR, TOKENS_PER_IMAGE, MAX_LENGTH, rank=rank,
                          world_size=3)
        for worker in range(2):
            plan = ds._positions(epoch=1, worker=worker, num_workers=2)
            slots += [(s, p) for s, positions in plan for p in positions]
            assert sum(len(p) for _, p in plan) == ds.worker_counts(2)[worker]
    assert sorted(slots) == sorted({(s, p) for s, (_, n) in enumerate(ds.shards) for p in range(n)})


# ------------------------------------------------------------------------ (d) missing images
def test_missing_image_is_an_error_naming_the_sample_or_listed(shapes, tmp_path, capsys):
    records = json.loads((shapes / "stage2.json").read_text())
    victim = next(r for r in records if "image" in r)
    victim["image"] = "gone/nowhere.png"
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    with pytest.raises(ConversionError) as info:
        convert(data, shapes / "images", tmp_path / "out", workers=1)
    assert repr(victim["id"]) in str(info.value) and "missing image file" in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written
    assert main(["--data", str(data), "--image-folder", str(shapes / "images"), "--out", str(tmp_path / "out")]) == 1
    assert victim["id"] in capsys.readouterr().err

    manifest = convert(data, shapes / "images", tmp_path / "out", workers=1, skip_bad=True)
    assert manifest["totals"]["samples"] == 22 and manifest["totals"]["missing_images"] == 1
    assert [b["id"] for b in manifest["bad_samples"]] == [victim["id"]]
    assert "nowhere.png" in manifest["bad_samples"][0]["reason"]
    out = tmp_path / "out"
    keys = [key for e in manifest["shards"] for key, _ in read_shard(out / e["name"], list(range(e["samples"])))]
    assert len(keys) == 22 and f"{records.index(victim):09d}" not in keys


def test_same_size_corruption_is_caught_by_the_manifest_sha256(stage2_shards, tokenizer, tmp_path):
    """Issue: shards were checked by size only; a flipped byte in a JSON member trained silently, and an unreadable
    member was a plain ValueError even under bad_samples=skip."""
    import shutil
    import tarfile

    copy = tmp_path / "shards"
    shutil.copytree(stage2_shards, copy)
    shard = copy / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".json"))
    raw = bytearray(shard.read_bytes())
    raw[member.offset_data] = ord("#")  # the member's first byte: '{' -> '#', same size, unreadable JSON
    shard.write_bytes(bytes(raw))
    tpl = get_template("vicuna_v1")

    def samples(**kw):
        ds = ShardDataset(copy, tokenizer, tpl, PROCESSOR, TOKENS_PER_IMAGE, MAX_LENGTH, shuffle_buffer=0, **kw)
        return list(DataLoader(ds, batch_size=None, num_workers=0))

    with pytest.raises(ValueError, match=r"shard-000000\.tar: sha256 .* the manifest says .*verify_shards=false"):
        samples()
    with pytest.raises(ValueError, match=r"unreadable json member in shard-000000\.tar"):
        samples(verify=False)  # bad_samples=error: the sample stops the run, named
    got = samples(verify=False, bad_samples="skip")
    skipped = [s for s in got if "skip" in s]
    assert len(got) == 23 and len(skipped) == 1 and "unreadable json member" in skipped[0]["skip"]
