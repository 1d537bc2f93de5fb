"""`python -m data_prep.check_layout`: a fake LLAVA_DATA_ROOT with real image files; each problem kind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from data_prep import check_layout as cl
from data_prep.check_layout import DATA, check_layout, config_data_paths, main

# dataset -> image paths of its records (relative to its image folder); None = a text-only record
IMAGES = {
    "llava_pretrain_558k": ["00000/000000001.jpg", "00000/000000002.jpg", "00001/000010001.jpg"],
    "llava_v1_5_mix665k": ["coco/train2017/000000000001.jpg", "gqa/images/2354786.jpg",
                           "ocr_vqa/images/689852649.jpg", "ocr_vqa/images/140031996.jpg",
                           "textvqa/train_images/0054c91397f2fe05.jpg", "vg/VG_100K/1.jpg", "vg/VG_100K_2/2.jpg",
                           None],
    "cc3m_595k": ["GCC_train_000000001.jpg", "GCC_train_000000002.jpg"],
    "llava_instruct_150k": ["000000000001.jpg", "000000000001.jpg", "000000000002.jpg"],
    "llava_next_mix760k": ["coco/train2017/000000000001.jpg", "sam/images/sa_1.jpg", None],
    "rlaif_v": ["rlaif_1.png", "rlaif_2.png"],  # preference pairs (their records checked as any other)
}


def record(i: int, image: str | None) -> dict:
    r = {"id": str(i), "conversations": [{"from": "human", "value": "<image>\nWhat is it?" if image else "Hi."},
                                         {"from": "gpt", "value": "A cat."}]}
    return {**r, "image": image} if image else r


def write_image(path: Path, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, format=fmt)


@pytest.fixture()
def root(tmp_path, monkeypatch):
    """A complete tree; DATA's official counts replaced by the fake ones (the count check has its own test)."""
    root = tmp_path / "data"
    for name, images in IMAGES.items():
        spec = DATA[name]
        path = root / spec["json"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([record(i, x) for i, x in enumerate(images)]))
        for x in filter(None, images):
            write_image(root / spec["image_folder"] / x)
        monkeypatch.setitem(spec, "records", len(images))
    return root


def run(root: Path, *args: str, tmp_path: Path) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    code = main(["--root", str(root), "--json", str(out), *args])
    return code, json.loads(out.read_text())


def lines(report: dict, name: str, level: str) -> list[str]:
    return [x["text"] + " " + " ".join(x.get("examples", [])) for x in report["datasets"][name]["lines"]
            if x["level"] == level]


def test_complete_tree_is_ok_and_names_the_recipe_configs(root, tmp_path, capsys):
    code, report = run(root, tmp_path=tmp_path)
    assert code == 0 and report["ok"] and report["not_downloaded"] == []
    for name, r in report["datasets"].items():
        assert r["status"] == "ok", (name, r["lines"])
        assert r["images"]["missing"] == 0 and r["images"]["checked"] == r["images"]["unique"]
    mix = report["datasets"]["llava_v1_5_mix665k"]
    assert sorted(mix["folders"]) == sorted(DATA["llava_v1_5_mix665k"]["folders"])
    assert all(f["present"] and f["images"] == 1 + (name == "ocr_vqa/images") for name, f in mix["folders"].items())
    assert mix["text_only"] == 1
    assert report["datasets"]["llava_instruct_150k"]["images"] == {
        "referenced": 3, "unique": 2, "checked": 2, "missing": 0, "sampled": False}
    assert set(mix["configs"]) == {"configs/llava_v1_5/stage2_finetune_7b.yaml",
                                   "configs/llava_v1_5/stage2_finetune_7b_lora.yaml",
                                   "configs/llava_v1_5/stage2_finetune_7b_qlora.yaml"}
    assert report["datasets"]["cc3m_595k"]["configs"] == ["configs/llava_v1/stage1_cc3m.yaml"]
    text = capsys.readouterr().out
    assert "all checked datasets are usable" in text and "FAIL" not in text


def test_the_table_is_the_layout_of_the_recipe_configs():
    by_json = {spec["json"]: spec["image_folder"] for spec in DATA.values()}
    configs = config_data_paths()
    assert len(configs) >= 6
    for config, (path, image_folder) in configs.items():
        assert path in by_json, config
        assert image_folder == by_json[path], config
    assert {p for p, _ in configs.values()} == set(by_json)  # every dataset is read by some recipe


def test_missing_folder_fails_and_names_it(root, tmp_path, capsys):
    for f in (root / "gqa/images").iterdir():
        f.unlink()
    (root / "gqa/images").rmdir()
    code, report = run(root, "--dataset", "llava_v1_5_mix665k", tmp_path=tmp_path)
    assert code == 1 and not report["ok"]
    mix = report["datasets"]["llava_v1_5_mix665k"]
    assert mix["status"] == "fail" and not mix["folders"]["gqa/images"]["present"]
    (fail,) = lines(report, "llava_v1_5_mix665k", "FAIL")
    assert "gqa/images/: folder missing, 1 images" in fail and "gqa/images/2354786.jpg" in fail
    assert "NOT usable: llava_v1_5_mix665k" in capsys.readouterr().out


def test_missing_file_fails_with_the_path(root, tmp_path):
    (root / "coco/train2017/000000000002.jpg").unlink()
    code, report = run(root, tmp_path=tmp_path)
    assert code == 1
    assert report["datasets"]["llava_v1_5_mix665k"]["status"] == "ok"  # it does not use that image
    inst = report["datasets"]["llava_instruct_150k"]
    assert inst["status"] == "fail" and inst["images"]["missing"] == 1
    (fail,) = lines(report, "llava_instruct_150k", "FAIL")
    assert "coco/train2017/: 1 of 2 images missing" in fail and "000000000002.jpg" in fail


def test_ocr_vqa_gif_instead_of_jpg_is_named_with_the_fix(root, tmp_path):
    for stem in ("689852649", "140031996"):
        (root / f"ocr_vqa/images/{stem}.jpg").unlink()
        write_image(root / f"ocr_vqa/images/{stem}.gif", "GIF")
    code, report = run(root, "--dataset", "llava_v1_5_mix665k", tmp_path=tmp_path)
    assert code == 1
    folder = report["datasets"]["llava_v1_5_mix665k"]["folders"]["ocr_vqa/images"]
    assert folder["missing"] == 2 and folder["other_extension"] == {".gif": 2}
    (fail,) = lines(report, "llava_v1_5_mix665k", "FAIL")
    assert "2 exist under another extension (.gif: 2)" in fail and "rename or convert" in fail


def test_record_count_differing_from_the_official_file_warns_only(root, tmp_path, monkeypatch):
    monkeypatch.setitem(DATA["llava_pretrain_558k"], "records", 558128)
    code, report = run(root, tmp_path=tmp_path)
    assert code == 0 and report["datasets"]["llava_pretrain_558k"]["status"] == "warn"
    (warn,) = lines(report, "llava_pretrain_558k", "WARN")
    assert "3 records, the official file has 558128" in warn


def test_malformed_json_fails(root, tmp_path):
    (root / DATA["cc3m_595k"]["json"]).write_text('[{"id": "0", "image": ')
    code, report = run(root, tmp_path=tmp_path)  # --all: present but broken is a failure
    assert code == 1 and report["datasets"]["cc3m_595k"]["status"] == "fail"
    (fail,) = lines(report, "cc3m_595k", "FAIL")
    assert "chat.json is not a readable LLaVA JSON" in fail
    (root / DATA["cc3m_595k"]["json"]).write_text(json.dumps([record(0, "a.jpg"), {"image": 3}]))
    code, report = run(root, "--dataset", "cc3m_595k", tmp_path=tmp_path)
    assert code == 1 and any("malformed records" in x for x in lines(report, "cc3m_595k", "FAIL"))


def test_absent_dataset_is_listed_under_all_and_fails_when_requested(root, tmp_path, capsys):
    (root / DATA["cc3m_595k"]["json"]).unlink()
    code, report = run(root, "--all", tmp_path=tmp_path)
    assert code == 0 and report["not_downloaded"] == ["cc3m_595k"]
    assert "not downloaded: cc3m_595k" in capsys.readouterr().out
    code, report = run(root, "--dataset", "cc3m_595k", "llava_pretrain_558k", tmp_path=tmp_path)
    assert code == 1 and report["datasets"]["cc3m_595k"]["status"] == "absent"
    assert report["datasets"]["llava_pretrain_558k"]["status"] == "ok"


def test_unexpected_folder_and_sampling(root, tmp_path):
    spec = DATA["llava_v1_5_mix665k"]
    (root / spec["json"]).write_text(json.dumps([record(0, "sam/images/1.jpg"), record(1, "sam/images/2.jpg")]))
    write_image(root / "sam/images/1.jpg")
    write_image(root / "sam/images/2.jpg")
    report = check_layout(root, ["llava_v1_5_mix665k"])
    mix = report["datasets"]["llava_v1_5_mix665k"]
    assert mix["status"] == "warn" and mix["folders"]["sam/images"] == {
        "expected": False, "present": True, "images": 2, "records": 2, "checked": 2, "missing": 0,
        "other_extension": {}}
    assert any("not in the standard layout" in x for x in lines(report, "llava_v1_5_mix665k", "WARN"))
    (root / "sam/images/2.jpg").unlink()
    sampled = check_layout(root, ["llava_v1_5_mix665k"], sample=1)["datasets"]["llava_v1_5_mix665k"]["images"]
    assert sampled["checked"] == 1 and sampled["sampled"] and sampled["estimated_missing"] == 2 * sampled["missing"]


def test_usage_errors_exit_2_and_an_empty_root_fails(tmp_path, monkeypatch):
    for argv in (["--dataset", "nope"], ["--sample", "0"], ["--root", str(tmp_path / "absent")],
                 ["--all", "--dataset", "cc3m_595k"]):
        with pytest.raises(SystemExit) as e:
            main(["--root", str(tmp_path), *argv])
        assert e.value.code == 2, argv
    monkeypatch.setenv("LLAVA_DATA_ROOT", str(tmp_path))
    assert cl.default_root() == tmp_path
    assert main([]) == 1  # nothing downloaded under the root: most likely the wrong root
