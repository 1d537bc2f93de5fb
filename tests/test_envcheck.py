"""Environment traps (llava_sft/envcheck.py): each is one line naming the fix, found before anything heavy loads.

CPU only, no network: cache directories point into tmp_path, hub downloads are replaced by functions that fail the
test when called, and CUDA / flash-attn availability is passed in.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llava_sft.config import load_config
from llava_sft.envcheck import find_traps
from llava_sft.model.vision import VisionConfig, build_vision_tower

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "llava_v1_5" / "stage1_pretrain_7b.yaml"  # ViT-L-14-336, flash_attention_2, DeepSpeed
RECIPE_V1 = REPO / "configs" / "llava_v1" / "stage1_cc3m.yaml"  # ViT-L-14
DEMO = REPO / "configs" / "demo" / "stage1.yaml"  # the CPU demo: random-init tiny ViT, sdpa, float32
ENV_VARS = ("LLAVA_CLIP_WEIGHTS", "LLAVA_CLIP_CACHE", "LLAVA_ATTN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
            "LLAVA_SKIP_ENVCHECK")
GPU_MACHINE = torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is not None


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """A clean environment whose CLIP cache (LLAVA_CLIP_CACHE, read by the recipes) is an empty tmp directory."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLAVA_CLIP_CACHE", str(tmp_path / "clip-cache"))
    return tmp_path / "clip-cache"


def traps_by_key(path, *overrides, cuda=True, flash=True) -> dict:
    return {t.key: t for t in find_traps(load_config(path, list(overrides)), cuda_available=cuda,
                                         flash_attn_available=flash)}


def put_in_hf_cache(cache_dir: Path, repo_id: str, filename: str) -> Path:
    """The layout huggingface_hub's cache uses: models--ORG--NAME/{refs/main, snapshots/<rev>/<file>}."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    file = repo / "snapshots" / rev / filename
    file.parent.mkdir(parents=True)
    file.write_bytes(b"weights")
    return file


# --------------------------------------------------------------------------- CLIP weights
@pytest.mark.parametrize("offline_var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_uncached_clip_tag_is_an_error_naming_llava_clip_weights(cache, monkeypatch, offline_var):
    monkeypatch.setenv(offline_var, "1")
    traps = traps_by_key(RECIPE)
    assert list(traps) == ["model.vision.pretrained"]
    trap = traps["model.vision.pretrained"]
    assert trap.level == "error" and "\n" not in trap.message
    assert "LLAVA_CLIP_WEIGHTS=/path/to/file" in trap.message and "LLAVA_CLIP_CACHE" in trap.message
    assert str(cache) in trap.message  # says where it looked


def test_online_uncached_clip_tag_is_a_warning_that_it_will_be_downloaded(cache):
    trap = traps_by_key(RECIPE)["model.vision.pretrained"]
    assert trap.level == "warning"
    assert "downloaded from the hub at start-up" in trap.message and "LLAVA_CLIP_WEIGHTS" in trap.message


@pytest.mark.parametrize("filename", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
@pytest.mark.parametrize("recipe, repo_id", [(RECIPE, "timm/vit_large_patch14_clip_336.openai"),
                                             (RECIPE_V1, "timm/vit_large_patch14_clip_224.openai")])
def test_clip_tag_already_in_the_hf_cache_is_no_trap_offline(cache, monkeypatch, recipe, repo_id, filename):
    from llava_sft.model.encoders.openclip import locate_pretrained

    file = put_in_hf_cache(cache, repo_id, filename)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert traps_by_key(recipe) == {}
    assert Path(locate_pretrained(load_config(recipe).model.vision).path) == file


def test_clip_tag_in_open_clips_url_cache_counts_when_open_clip_downloads_by_url(cache, monkeypatch):
    import open_clip

    # without huggingface_hub, open_clip downloads by url into its own cache
    monkeypatch.setattr(open_clip.pretrained, "has_hf_hub", lambda necessary=False: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trap = traps_by_key(RECIPE)["model.vision.pretrained"]
    assert trap.level == "error" and str(cache / "ViT-L-14-336px.pt") in trap.message
    cache.mkdir()
    (cache / "ViT-L-14-336px.pt").write_bytes(b"weights")  # <cache_dir>/<basename of the url>, as open_clip saves it
    assert traps_by_key(RECIPE) == {}


def test_missing_local_weights_file_is_an_error_even_online(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("LLAVA_CLIP_WEIGHTS", str(tmp_path / "missing.pt"))
    trap = traps_by_key(RECIPE)["model.vision.pretrained"]
    assert trap.level == "error"
    assert "missing.pt" in trap.message and "not found" in trap.message and "LLAVA_CLIP_WEIGHTS" in trap.message
    (tmp_path / "missing.pt").write_bytes(b"weights")
    assert traps_by_key(RECIPE) == {}  # an existing local file resolves, offline or not


# --------------------------------------------------------------------------- flash_attention_2
@pytest.mark.parametrize("cuda, flash", [(True, False), (False, True)], ids=["no-flash-attn", "no-cuda"])
def test_flash_attention_2_without_flash_attn_or_cuda_is_an_error_naming_sdpa(cache, cuda, flash):
    trap = traps_by_key(RECIPE, "train.device=cpu", cuda=cuda, flash=flash)["model.llm.attn_implementation"]
    assert trap.level == "error" and "\n" not in trap.message
    assert "LLAVA_ATTN=sdpa" in trap.message and "pip install -e '.[gpu]'" in trap.message


def test_sdpa_or_a_gpu_with_flash_attn_has_no_attention_trap(cache, monkeypatch):
    assert "model.llm.attn_implementation" not in traps_by_key(RECIPE, cuda=True, flash=True)
    monkeypatch.setenv("LLAVA_ATTN", "sdpa")
    assert "model.llm.attn_implementation" not in traps_by_key(RECIPE, cuda=False, flash=False)


# --------------------------------------------------------------------------- GPU recipe without a GPU
@pytest.mark.parametrize("overrides", [[], ["train.deepspeed=null"]], ids=["deepspeed", "bf16-weights"])
def test_gpu_recipe_without_cuda_is_an_error_naming_preflight_and_device_cpu(cache, overrides):
    trap = traps_by_key(RECIPE, "model.llm.attn_implementation=sdpa", *overrides, cuda=False)["train.device"]
    assert trap.level == "error" and "\n" not in trap.message
    assert "--preflight" in trap.message and "python -m llava_sft.preflight" in trap.message
    assert "train.device=cpu" in trap.message


def test_train_device_cpu_has_no_gpu_trap(cache):
    assert "train.device" not in traps_by_key(RECIPE, "train.device=cpu", cuda=False)


def test_cpu_demo_config_has_no_trap_on_a_cpu_machine(cache):
    # bf16 defaults to true, but float32 weights and no DeepSpeed: not a GPU recipe; random-init vision tower
    assert traps_by_key(DEMO, cuda=False, flash=False) == {}
    assert "train.device" in traps_by_key(DEMO, "train.device=cuda", cuda=False)  # asked for CUDA, none there


# --------------------------------------------------------------------------- CLI and launcher
def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def envcheck(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_sft.envcheck", *args], cwd=REPO, env=clean_env(**env),
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.skipif(GPU_MACHINE, reason="expects a machine without CUDA and flash-attn")
def test_cli_prints_one_error_line_per_trap_and_exits_1(tmp_path):
    result = envcheck(str(RECIPE), HF_HUB_OFFLINE="1", LLAVA_CLIP_CACHE=str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("[envcheck] error: ") for line in lines), lines
    assert "LLAVA_CLIP_WEIGHTS" in lines[0] and "LLAVA_ATTN=sdpa" in lines[1] and "--preflight" in lines[2]


def test_cli_exits_0_without_traps_and_2_on_a_config_error(tmp_path):
    (tmp_path / "clip.pt").write_bytes(b"weights")
    env = {"HF_HUB_OFFLINE": "1", "LLAVA_CLIP_WEIGHTS": str(tmp_path / "clip.pt")}
    args = [str(RECIPE), "model.llm.attn_implementation=sdpa"]
    ok = envcheck(*args, "train.device=cpu", **env)
    assert ok.returncode == 0 and ok.stdout.splitlines() == ["[envcheck] ok"], ok.stdout + ok.stderr
    bad = envcheck(*args, "train.lrr=1", **env)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert bad.stdout.splitlines() == [bad.stdout.strip()] and "did you mean 'train.lr'" in bad.stdout


@pytest.fixture
def stub_python(tmp_path) -> Path:
    """A `python` first on PATH that stands in for the training launch and passes everything else through."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text(f'#!/usr/bin/env bash\nif [[ "$1 $2" == "-m llava_sft.train" ]]; then echo "TRAIN-LAUNCHED $*"; '
                    f'exit 0; fi\nexec {sys.executable} "$@"\n')
    stub.chmod(0o755)
    return bin_dir


def run_stage1(bin_dir: Path, *args: str, **env) -> subprocess.CompletedProcess:
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", GPUS_PER_NODE="1", **env)
    return subprocess.run(["bash", "scripts/stage1.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_launcher_stops_on_an_envcheck_error_before_launching(stub_python, tmp_path):
    result = run_stage1(stub_python, "train.device=cuda", HF_HUB_OFFLINE="1", LLAVA_CLIP_CACHE=str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[envcheck] error: " in result.stdout and "LLAVA_SKIP_ENVCHECK=1" in result.stderr
    assert "TRAIN-LAUNCHED" not in result.stdout


def test_launcher_launches_after_a_clean_envcheck_or_with_llava_skip_envcheck(stub_python, tmp_path):
    (tmp_path / "clip.pt").write_bytes(b"weights")
    ok = run_stage1(stub_python, "model.llm.attn_implementation=sdpa", "train.device=cpu", HF_HUB_OFFLINE="1",
                    LLAVA_CLIP_WEIGHTS=str(tmp_path / "clip.pt"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.index("[envcheck] ok") < ok.stdout.index("TRAIN-LAUNCHED")
    assert "train.device=cpu" in ok.stdout  # the overrides reach the training command
    skipped = run_stage1(stub_python, "train.device=cuda", HF_HUB_OFFLINE="1", LLAVA_CLIP_CACHE=str(tmp_path),
                         LLAVA_SKIP_ENVCHECK="1")
    assert skipped.returncode == 0 and "TRAIN-LAUNCHED" in skipped.stdout and "[envcheck]" not in skipped.stdout


# --------------------------------------------------------------------------- the open_clip encoder
@pytest.fixture
def hub_calls(monkeypatch) -> list:
    """Replaces open_clip's tag download (the one path to the hub/url) by a recorder that fails."""
    import open_clip.factory

    calls = []

    def download(cfg, *args, **kwargs):
        calls.append(cfg)
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", download)
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return calls


def test_openclip_encoder_offline_with_an_uncached_tag_fails_fast_naming_the_setting(hub_calls, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        build_vision_tower(VisionConfig(model="ViT-L-14-336", pretrained="openai", cache_dir=str(tmp_path)))
    assert time.perf_counter() - start < 5
    assert hub_calls == []  # never went to the hub
    message = str(err.value)
    assert "model.vision.pretrained='openai'" in message and "LLAVA_CLIP_WEIGHTS" in message
    assert "LLAVA_CLIP_CACHE" in message


def test_openclip_encoder_names_the_setting_when_open_clip_cannot_load_a_tag(hub_calls, tmp_path):
    with pytest.raises(RuntimeError) as err:  # online (no offline variable): open_clip tries, and fails
        build_vision_tower(VisionConfig(model="ViT-L-14-336", pretrained="openai", cache_dir=str(tmp_path)))
    assert len(hub_calls) == 1
    message = str(err.value)
    assert "model.vision.pretrained='openai'" in message and "LLAVA_CLIP_WEIGHTS" in message
    assert "hub unreachable" in str(err.value.__cause__)  # the original error is chained


def test_openclip_encoder_missing_weights_file_names_the_setting(hub_calls, tmp_path):
    with pytest.raises(FileNotFoundError, match="LLAVA_CLIP_WEIGHTS"):
        build_vision_tower(VisionConfig(model="ViT-L-14-336", pretrained=str(tmp_path / "missing.pt")))
    assert hub_calls == []
