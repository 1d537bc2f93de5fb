"""The README's demo command runs end to end (shrunk: small data, a few steps) and writes its metrics."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # multi-process or full runs: `pytest -m 'not slow'` skips them

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_demo_script_pretrains_its_base_models_then_runs_both_stages_and_evaluation(tmp_path):
    env = dict(os.environ, DEMO_DATA=str(tmp_path / "data"), DEMO_OUT=str(tmp_path / "out"),
               DEMO_SIZES="--n-stage1 64 --n-stage2 64 --n-eval 10", DEMO_PROSE="200", DEMO_WARMUP="16",
               DEMO_BASE_ARGS="--lm-steps 2 --lm-batch 4 --clip-steps 2 --clip-batch 16")
    result = subprocess.run(["bash", "scripts/demo.sh", "train.max_steps=2"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())
    assert set(metrics["overall"]) == {"accuracy", "accuracy_blind"}
    assert set(metrics["by_type"]) == {"color", "count", "exists", "position", "shape"}
    assert set(metrics["binding"]) <= {"color", "position", "shape"}  # eval.shapes.binding_report, tested there
    for stage in ("tower", "projector"):  # eval.shapes.feature_signal, tested there; 9 tokens: one per grid cell
        shares = dict(metrics["features"][stage])
        assert shares.pop("n") > 0 and set(shares) == {"cell", "color", "shape"}
        assert all(0.0 <= share <= 1.0 for share in shares.values())
    # run_shapes.attention_lookup: one entry per attribute question type, over the questions on 2-3-shape images
    llm = json.loads((tmp_path / "out" / "stage2" / "llm" / "config.json").read_text())
    meta = {m["image"]: m["shapes"] for m in map(json.loads, (tmp_path / "data" / "meta.jsonl").open())}
    questions = [json.loads(line) for line in (tmp_path / "data" / "eval" / "questions.jsonl").open()]
    assert metrics["lookup"]
    for category, found in metrics["lookup"].items():
        asked = [len(meta[q["image"]]) for q in questions if q["category"] == category and len(meta[q["image"]]) > 1]
        assert found["n"] == len(asked) and found["chance"] == pytest.approx(sum(1 / n for n in asked) / len(asked),
                                                                               abs=1e-4)
        if found["layer"] is None:  # no head puts 0.2 of its attention on the image (a shrunk run may not learn to)
            assert found["image_mass"] < 0.2 and found["share"] is None
            continue
        assert 0 <= found["layer"] < llm["num_hidden_layers"] and 0 <= found["head"] < llm["num_attention_heads"]
        assert -7 <= found["offset"] <= 0 and 0.0 <= found["share"] <= 1.0 and 0.2 <= found["image_mass"] <= 1.0
    assert (tmp_path / "out" / "stage2" / "llm" / "config.json").is_file()
    # both stages loaded the base models the script pretrained, as the paper recipes load Vicuna and CLIP
    base = tmp_path / "out" / "base"
    assert (base / "llm" / "config.json").is_file() and (base / "clip.pt").is_file()
    saved = json.loads((tmp_path / "out" / "stage1" / "llava_config.json").read_text())["model"]
    assert saved["llm"]["path"] == str(base / "llm") and saved["vision"]["pretrained"] == str(base / "clip.pt")
    # Stage 2 in two passes: two epochs on one-shape images from Stage 1's projector, then the full set from there
    warm = yaml.safe_load((tmp_path / "out" / "stage2_warmup" / "config.yaml").read_text())
    full = yaml.safe_load((tmp_path / "out" / "stage2" / "config.yaml").read_text())
    assert warm["data"]["path"] == str(tmp_path / "data" / "stage2_warmup.json") and warm["train"]["epochs"] == 2
    assert warm["train"]["global_batch_size"] == 8
    assert warm["train"]["pretrained_projector"] == str(tmp_path / "out" / "stage1")
    assert warm["model"]["llm"]["path"] == str(base / "llm")
    assert full["data"]["path"] == str(tmp_path / "data" / "stage2.json")
    assert full["train"]["pretrained_projector"] == str(tmp_path / "out" / "stage2_warmup")
    assert full["model"]["llm"]["path"] == str(tmp_path / "out" / "stage2_warmup" / "llm")
    assert "Stage 2" in result.stdout and "base models" in result.stdout
    assert "overall" in result.stdout  # the table is printed at the end
