"""The start-up check (data/catalog.py) finds what the loader would fail on later, once per node, cached.

Issue: corrupt images (0-byte, truncated, not an image) and a first human turn too long to leave a supervised
token were found only when training reached them -- possibly at hour 19, and again after the resume.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import save_config
from llava_sft.data import catalog
from llava_sft.data.dataset import LlavaJsonDataset
from llava_sft.data.images import ImageProcessor
from llava_sft.data.templates import BadSampleError, get_template
from llava_sft.data.tokenize import tokenize_conversation, tokenize_with_images
from tests.tiny import run_config

REPO = Path(__file__).resolve().parents[1]
TPI = 16
PROCESSOR = ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pad")
TEXTS = [
    "Hello!", "  two  spaces\n\nand new lines\t", "<image>\nWhat is in the picture?", "<image>\n<image>\nCompare.",
    "émigré café naïve", "猫がテーブルの上にいます。", "emoji 🐈‍⬛🎉 and symbols ∑∫≤", "</s> USER: ASSISTANT:",
    "x" * 300, " ".join(["word"] * 200), "mixed 123 4567 89.0e-3 %$#@!", "",
]


def conv(question, answer, image=True):
    return [{"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]


@pytest.mark.parametrize("name", ["llama_tokenizer", "llama3_tokenizer", "chatml_tokenizer"])
def test_token_bound_holds_for_the_tokenizer_families(request, name):
    """The bound that lets start-up skip tokenizing most samples: never below the real count, for SentencePiece
    with byte fallback (Llama/Vicuna) and byte-level BPE (Llama-3, Qwen), on ASCII, accents, CJK and emoji."""
    tokenizer = request.getfixturevalue(name)
    for text in TEXTS:
        assert len(tokenize_with_images(text, tokenizer)) <= catalog.token_bound(text), text


def expanding_tokenizer(tmp_path) -> PreTrainedTokenizerFast:
    """A real fast tokenizer whose normaliser writes every 'x' as eight: more tokens than the text has bytes."""
    chars = sorted(set("".join(TEXTS) + "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:!?'\n0123456789"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(c for c in chars if c)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.normalizer = normalizers.Replace("x", "x" * 8)
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<unk>")
    tokenizer.save_pretrained(tmp_path / "expanding")
    return PreTrainedTokenizerFast.from_pretrained(tmp_path / "expanding")


def settings(tokenizer, max_length, template="vicuna_v1", check="off", overlong="truncate"):
    return catalog.StartupSettings(get_template(template), tokenizer, TPI, max_length, overlong, "refuse", check)


def test_a_tokenizer_that_exceeds_the_bound_makes_start_up_tokenize_everything(tmp_path, monkeypatch):
    tokenizer = expanding_tokenizer(tmp_path)
    monkeypatch.setattr(catalog, "CALIBRATION", 1)
    records = [{"id": f"ok{i}", "conversations": conv("Hi", "Yes.", image=False)} for i in range(3)]
    records.append({"id": "xs", "conversations": conv("x" * 40, "Yes.", image=False)})  # 320 tokens from 40 bytes
    records.insert(0, {"id": "calibrate", "conversations": conv("xx", "Yes.", image=False)})
    built = catalog.build(records, tmp_path, settings(tokenizer, 300, overlong="drop"))
    assert built.meta["tokenized_every_sample"] and built.meta["tokenized_at_start"] == len(records)
    assert [sid for sid, _ in built.meta["problems"].values()] == ["xs"]  # over max_length only after expansion


def test_only_samples_the_bound_cannot_settle_are_tokenized(llama_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "CALIBRATION", 0)
    short = [{"id": f"s{i}", "conversations": conv("What is it?", "It is red.", image=False)} for i in range(20)]
    long = {"id": "long", "conversations": conv("Describe the image.", "A small cat on a table. " * 60, image=False)}
    s = settings(llama_tokenizer, 300)  # the short ones: < 260 bytes with the system prompt
    built = catalog.build(short + [long], tmp_path, s)
    ids, _ = tokenize_conversation(long["conversations"], llama_tokenizer, s.template, num_images=0)
    assert len(ids) > 300  # truncated, not refused: the reply starts within max_length
    assert built.meta["tokenized_at_start"] == 1 and built.meta["will_truncate"] == 1
    assert built.meta["problems"] == {}


def test_forked_workers_give_what_one_process_gives(llama_tokenizer, tmp_path, monkeypatch):
    """Large files are checked by forked processes (the slow tokenizer is the cost): same result, same order."""
    records = [{"id": f"s{i}", "conversations": conv("What is it?", "It is red. " * (1 + i % 7), image=False)}
               for i in range(60)]
    records[5]["conversations"][1]["value"] = ""  # an empty reply
    records[9]["id"] = "s3"  # a duplicate id
    records[20]["conversations"][0]["value"] = "Describe the image. " * 80  # no supervised token within 300
    s = settings(llama_tokenizer, 300)
    serial = catalog.build([dict(r) for r in records], tmp_path, s)
    monkeypatch.setattr(catalog, "PARALLEL_FROM", 10)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    forked = catalog.build([dict(r) for r in records], tmp_path, s)
    assert forked.meta["problems"] == serial.meta["problems"] and len(serial.meta["problems"]) == 3
    assert forked.state.tolist() == serial.state.tolist() and forked.approx.tolist() == serial.approx.tolist()
    assert forked.blob.tobytes() == serial.blob.tobytes()


@pytest.fixture
def data(tmp_path, write_pngs):
    folder = tmp_path / "images"
    write_pngs(folder, ["a.png", "b.png"])
    records = [{"id": "a", "image": "a.png", "conversations": conv("What is it?", "It is red.")},
               {"id": "b", "image": "b.png", "conversations": conv("What is it?", "It is blue.")},
               {"id": "text", "conversations": conv("Hello!", "Hi there.", image=False)}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path, folder


def dataset(path, folder, tokenizer, cache, **kwargs):
    kwargs.setdefault("bad_samples", "skip")
    return LlavaJsonDataset(path, folder, tokenizer, get_template("vicuna_v1"), PROCESSOR, TPI, 256,
                            cache_dir=str(cache), **kwargs)


def test_the_cache_is_used_by_the_next_start_and_rebuilt_when_the_data_changes(data, llama_tokenizer, tmp_path):
    path, folder = data
    cache = tmp_path / "cache"
    first = dataset(path, folder, llama_tokenizer, cache)
    [built] = [d for d in cache.iterdir() if d.is_dir()]
    second = dataset(path, folder, llama_tokenizer, cache)
    assert [d for d in cache.iterdir() if d.is_dir()] == [built]  # nothing new built
    assert list(second.records) == list(first.records) and len(second) == 3
    assert [second.approx_length(i) for i in range(3)] == [first.approx_length(i) for i in range(3)]
    records = json.loads(path.read_text())
    records[0]["conversations"][1]["value"] = "It is green."
    path.write_text(json.dumps(records))
    third = dataset(path, folder, llama_tokenizer, cache)
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2  # a new key: the contents changed
    assert third.records[0]["conversations"][1]["value"] == "It is green."
    other = LlavaJsonDataset(path, folder, llama_tokenizer, get_template("vicuna_v1"), PROCESSOR, TPI, 128,
                             cache_dir=str(cache))
    assert len(other) == 3 and len([d for d in cache.iterdir() if d.is_dir()]) == 3  # a setting is part of the key


def test_an_image_fixed_after_a_refusal_is_accepted_on_the_next_start(data, llama_tokenizer, tmp_path, write_pngs):
    """Image problems are checked again on every start, never taken from the cache."""
    path, folder = data
    cache = tmp_path / "cache"
    good = (folder / "b.png").read_bytes()
    (folder / "b.png").write_bytes(good[: len(good) // 3])  # truncated
    with pytest.raises(BadSampleError, match="'b'.*corrupt image"):
        dataset(path, folder, llama_tokenizer, cache, bad_samples="error", check_images="decode")
    (folder / "b.png").write_bytes(good)
    fixed = dataset(path, folder, llama_tokenizer, cache, bad_samples="error", check_images="decode")
    assert len(fixed) == 3 and fixed.report.skipped == []
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 1  # from the cache


def test_a_second_process_waits_for_the_first_build_and_loads_it(data, llama_tokenizer, tmp_path, monkeypatch):
    path, folder = data
    cache = tmp_path / "cache"
    cache.mkdir()
    builds, real_build = [], catalog.build

    def counted(*args, **kwargs):
        builds.append(threading.current_thread().name)
        time.sleep(0.5)  # long enough for the other start to reach the lock
        return real_build(*args, **kwargs)

    monkeypatch.setattr(catalog, "build", counted)
    results = {}

    def start(name):
        results[name] = dataset(path, folder, llama_tokenizer, cache)

    threads = [threading.Thread(target=start, args=(f"rank{r}",), name=f"rank{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1  # one build for the node; the other start waited on the lock and loaded it
    assert list(results["rank0"].records) == list(results["rank1"].records)


def test_an_unwritable_cache_directory_falls_back_to_checking_in_process(data, llama_tokenizer, tmp_path, caplog):
    path, folder = data
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with caplog.at_level("WARNING"):
        ds = dataset(path, folder, llama_tokenizer, blocker / "cache")
    assert len(ds) == 3 and "not usable" in caplog.text


_CHECK_RANGE = catalog._check_range


def _dies_on_the_second_range(bounds):  # module level: the pool pickles it by name
    if bounds[0] > 0:
        os.kill(os.getpid(), 9)  # SIGKILL, as the OOM killer sends
    return _CHECK_RANGE(bounds)


@pytest.mark.timeout(120)
def test_a_check_worker_killed_mid_check_is_an_error_naming_the_cause_not_a_hang(llama_tokenizer, tmp_path,
                                                                                monkeypatch):
    """The OOM killer takes a worker of the forked check: multiprocessing's Pool.map then never returned, with the
    node's cache lock held and every rank waiting."""
    records = [{"id": f"s{i}", "conversations": conv("What is it?", "It is red.", image=False)} for i in range(600)]
    monkeypatch.setattr(catalog, "PARALLEL_FROM", 10)
    monkeypatch.setattr(catalog, "_check_range", _dies_on_the_second_range)
    monkeypatch.setenv("LLAVA_SFT_CHECK_WORKERS", "2")
    with pytest.raises(catalog.StartupCheckError, match="worker process of the start-up check died.*OOM"):
        catalog.build(records, tmp_path, settings(llama_tokenizer, 300))


def test_a_cache_that_cannot_be_saved_fails_the_waiting_process_at_once_instead_of_a_rebuild(
        data, llama_tokenizer, tmp_path, monkeypatch):
    """A full disk (or quota) under the cache: the builder goes on with what it built; the process that waited must
    not rebuild it under the lock in turn (each rank, one after the other, while the others sit in a collective)."""
    path, folder = data
    cache = tmp_path / "cache"
    cache.mkdir()
    builds, real_build, real_save = [], catalog.build, catalog.Catalog.save

    def counted(*args, **kwargs):
        builds.append(threading.current_thread().name)
        time.sleep(0.5)  # long enough for the other start to reach the lock
        return real_build(*args, **kwargs)

    def no_space(self, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(catalog, "build", counted)
    monkeypatch.setattr(catalog.Catalog, "save", no_space)
    results = {}

    def start(name):
        try:
            results[name] = len(dataset(path, folder, llama_tokenizer, cache))
        except catalog.StartupCheckError as e:
            results[name] = str(e)

    threads = [threading.Thread(target=start, args=(f"rank{r}",), name=f"rank{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1, builds
    [builder] = builds
    [waiter] = {"rank0", "rank1"} - {builder}
    assert results[builder] == 3
    assert "could not be stored" in results[waiter] and "No space left on device" in results[waiter]
    assert not list(cache.glob("*.tmp-*"))  # the partial save removed
    time.sleep(1.1)  # a later start (the disk freed) builds and stores it again; the marker goes
    monkeypatch.setattr(catalog.Catalog, "save", real_save)
    assert len(dataset(path, folder, llama_tokenizer, cache)) == 3 and len(builds) == 2
    assert not list(cache.glob("*.failed")) and len([d for d in cache.iterdir() if d.is_dir()]) == 1


def test_a_lock_held_too_long_is_an_error_naming_its_holder(data, llama_tokenizer, tmp_path, monkeypatch):
    import fcntl

    path, folder = data
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("LLAVA_SFT_LOCK_WAIT", "1")
    with open(cache / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("node17 pid 4242, checking /data/mix665k.json since 03:12:00\n")
        held.flush()
        t0 = time.time()
        with pytest.raises(catalog.StartupCheckError, match="held by node17 pid 4242.*delete .*\\.lock"):
            dataset(path, folder, llama_tokenizer, cache)
        assert time.time() - t0 < 10


def test_leftovers_of_crashed_builds_are_removed(data, llama_tokenizer, tmp_path):
    import socket

    path, folder = data
    cache = tmp_path / "cache"
    dead = cache / f"0123abcd.tmp-{socket.gethostname()}-4194999"  # above Linux's largest pid: gone
    old = cache / "4567abcd.tmp-othernode-77"
    recent = cache / "89abcdef.tmp-othernode-78"  # another host's build may still be running
    for d in (dead, old, recent):
        d.mkdir(parents=True)
        (d / "meta.json").write_text("{}")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    assert len(dataset(path, folder, llama_tokenizer, cache)) == 3
    assert not dead.exists() and not old.exists() and recent.exists()


def test_records_are_one_shared_buffer_not_python_objects(data, llama_tokenizer, tmp_path):
    """What forked DataLoader workers share without copying (issue 16): the records live in a memory-mapped byte
    buffer with numpy offsets, decoded per access."""
    path, folder = data
    ds = dataset(path, folder, llama_tokenizer, tmp_path / "cache")
    ds = dataset(path, folder, llama_tokenizer, tmp_path / "cache")  # loaded from the cache
    import numpy as np

    assert isinstance(ds.records.catalog.blob, np.memmap)
    assert ds.records[2] == {"id": "text", "conversations": conv("Hello!", "Hi there.", image=False)}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_startup")
    make_shapes(out, seed=7, image_size=32, n_stage1=8, n_stage2=4, n_eval=2, text_only_frac=0.0)
    return out


def test_cli_refuses_a_truncated_image_and_an_unfittable_first_turn_before_training(llama_tokenizer_dir, shapes_dir,
                                                                                     tmp_path):
    """Through the CLI: `decode` finds a truncated image, and the length policy a first human turn that leaves no
    supervised token within max_length -- both at start-up: exit 2, one message naming both samples."""
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    records = json.loads((data / "stage2.json").read_text())
    victim = next(r for r in records if r.get("image"))
    path = data / "images" / victim["image"]
    path.write_bytes(path.read_bytes()[:60])
    bad = sum(r.get("image") == victim["image"] for r in records) + 1  # every sample showing that image, + the long one
    long_question = "Describe the image. " * 150  # ~600 tokens > max_length 256, before the first reply
    records.append({"id": "long_first_turn", "conversations": [{"from": "human", "value": long_question},
                                                                {"from": "gpt", "value": "A cat."}]})
    (data / "stage2.json").write_text(json.dumps(records))
    cfg = run_config(llama_tokenizer_dir, data, tmp_path / "run", stage=2)
    cfg.data.check_images_at_start = "decode"
    config = tmp_path / "run.yaml"
    save_config(cfg, config)
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-m", "llava_sft.train", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{bad} bad sample(s) found at start-up" in done.stderr and "Traceback" not in done.stderr
    assert repr(victim["id"]) in done.stderr and "corrupt image" in done.stderr
    assert "'long_first_turn'" in done.stderr and "no supervised token" in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken
