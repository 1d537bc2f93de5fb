"""Every bad value is refused when the config loads, naming the key, the value and what is allowed -- before any
model loads (issue: train.device=gpu trained on the CPU with exit 0; micro_batch_size=0 was a bare
ZeroDivisionError after the model loaded; enum typos were found minutes into a 7B load)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_sft.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "llava_v1_5" / "stage2_finetune_7b.yaml"


@pytest.mark.parametrize("override,message", [
    ("train.device=gpu", r"train\.device='gpu' is not one of auto, cpu, cuda"),
    ("train.device=GPU", r"train\.device='GPU' is not one of auto, cpu, cuda"),
    ("train.device=cuda:0", r"train\.device='cuda:0' is not one of"),
    ("train.lr_schedule=cosin", r"train\.lr_schedule='cosin' is not one of cosine, constant \(did you mean 'cosine'\?\)"),
    ("data.overlong=trunc", r"data\.overlong='trunc' is not one of truncate, drop"),
    ("data.bad_samples=ignore", r"data\.bad_samples='ignore' is not one of error, skip"),
    ("model.image_aspect=crop", r"model\.image_aspect='crop' is not one of pad, square"),
    ("model.llm.dtype=bf16", r"model\.llm\.dtype='bf16' is not one of float32, bfloat16, float16"),
    ("model.projector=mlp2x_relu", r"model\.projector='mlp2x_relu' is not a projector"),
    ("model.vision.name=openclipp", r"model\.vision\.name='openclipp' is not a registered vision tower: .*openclip"),
    ("data.template=vicuna", r"data\.template='vicuna' is not a chat template: .*vicuna_v1"),
    ("train.micro_batch_size=0", r"train\.micro_batch_size=0 must be >= 1"),
    ("train.global_batch_size=-8", r"train\.global_batch_size=-8 must be >= 1"),
    ("train.save_every=-1", r"train\.save_every=-1 must be >= 0"),
    ("train.epochs=0", r"train\.epochs=0\.0 must be > 0"),
    ("data.max_length=0", r"data\.max_length=0 must be >= 2"),
    ("train.lr=0", r"train\.lr=0\.0 must be > 0"),
    ("train.warmup_ratio=1.5", r"train\.warmup_ratio=1\.5 must be < 1"),
])
def test_a_bad_value_names_the_key_and_the_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RECIPE, [override])


def test_a_number_yaml_reads_as_a_string_in_an_architecture_dict_is_refused():
    """YAML 1.1 reads `1e-6` (no dot) as the string '1e-6'; inside model.llm.config it went to transformers
    unchecked and the run failed in its first forward pass. The dotted spelling is a float and loads."""
    demo = REPO / "configs" / "demo" / "stage2.yaml"
    with pytest.raises(ConfigError, match=r"model\.llm\.config\.rms_norm_eps='1e-6' is a string that reads as a "
                                          r"number.*\(1\.0e-06\)"):
        load_config(demo, ["model.llm.config={hidden_size: 64, rms_norm_eps: 1e-6}"])
    with pytest.raises(ConfigError, match=r"model\.vision\.model_kwargs\.eps\[1\]='2E-5'"):
        load_config(demo, ["model.vision.model_kwargs={eps: [1.0e-5, '2E-5']}"])
    cfg = load_config(demo, ["model.llm.config={hidden_size: 64, rms_norm_eps: 1.0e-6, rope_type: default}"])
    assert cfg.model.llm.config["rms_norm_eps"] == 1e-6


@pytest.mark.parametrize("overrides,message", [
    (["data.cache_samples=true", "data.num_workers=2"],
     r"data\.cache_samples=true needs data\.num_workers=0, got 2: loader workers start afresh each epoch"),
    (["data.cache_samples=true", "data.num_workers=0", "data.shards=/tmp/shards"],
     r"data\.cache_samples=true is for a JSON dataset \(data\.path\)"),
])
def test_a_sample_cache_that_would_be_thrown_away_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RECIPE, overrides)
    load_config(RECIPE, ["data.cache_samples=true", "data.num_workers=0"])


def test_every_bad_value_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, ["train.device=gpu", "train.micro_batch_size=0", "data.overlong=x"])
    assert str(err.value).count("\n  ") == 3


def test_the_cli_refuses_before_loading_anything(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "llava_sft.train", str(RECIPE), "train.device=gpu",
                           f"train.output_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "train.device='gpu' is not one of auto, cpu, cuda" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
    assert time.time() - start < 60  # no model, no data: only the imports


def test_missing_paths_are_found_before_anything_loads(tmp_path):
    """Issue: data.path, image_folder and pretrained_projector were found missing after the model was built, as a
    raw traceback per rank."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "llava_sft.train", str(REPO / "configs" / "demo" / "stage2.yaml"),
                           f"data.path={tmp_path / 'nope.json'}", f"data.image_folder={tmp_path / 'imgs'}",
                           f"train.pretrained_projector={tmp_path / 'stage1'}", f"train.output_dir={tmp_path / 'run'}"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("[train] error:")]
    for key in ("data.path", "data.image_folder", "train.pretrained_projector"):
        assert f"{key}={tmp_path}" in line
    assert "Traceback" not in proc.stderr and "vision tower" not in proc.stderr and not (tmp_path / "run").exists()


def test_parsing_and_validating_a_recipe_imports_neither_torch_nor_the_model():
    """The config is a leaf: a YAML parses and validates (registry names included) in a fraction of a second, so a
    typo is refused before the 1.6 s of `import torch` (llava_sft/registry.py holds the names without torch)."""
    code = ("import sys; from llava_sft.config import load_config; load_config(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('llava_sft.model')))")
    out = subprocess.run([sys.executable, "-c", code, str(RECIPE)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_the_torch_free_registry_names_are_the_model_registries():
    from llava_sft import registry
    from llava_sft.model.projector import PROJECTORS
    from llava_sft.model.vision import ENCODERS, register_vision_tower

    assert set(PROJECTORS) == registry.PROJECTOR_NAMES and ENCODERS is registry.VISION_TOWERS

    @register_vision_tower("my_tower_for_this_test")
    class Mine:  # a user's encoder, registered from their own module: its name validates from then on
        pass

    assert "my_tower_for_this_test" in registry.vision_tower_names()
    load_config(RECIPE, ["model.vision.name=my_tower_for_this_test"])
    registry.REGISTERED_TOWERS.discard("my_tower_for_this_test")
