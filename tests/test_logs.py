"""A plain one-process run, and loading what it saved, log what happens and nothing that misleads (issue 17):
no open_clip "Model initialized randomly" or its INFO chatter, no DeepSpeed accelerator guess, no gloo lines, no
"loaded pretrained projector" when a finished model loads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import save_config
from tests.tiny import run_config

REPO = Path(__file__).resolve().parents[1]
MISLEADING = ("initialized randomly", "Setting accelerator", "unable to detect", "[Gloo]", "DeepSpeed",
              "No potential checkpoint path", " root: ", "loaded pretrained projector", "bitsandbytes")


def run(args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    env.pop("DS_ACCELERATOR", None)  # as on a user's machine: nothing names the device for DeepSpeed
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_a_plain_run_and_loading_its_model_log_nothing_misleading(llama_tokenizer_dir, tmp_path):
    make_shapes(tmp_path / "data", seed=3, image_size=32, n_stage1=4, n_stage2=8, n_eval=2, text_only_frac=0.0)
    cfg = run_config(llama_tokenizer_dir, tmp_path / "data", tmp_path / "run", stage=2, max_steps=2,
                     global_batch_size=4, micro_batch_size=4)
    save_config(cfg, tmp_path / "run.yaml")
    trained = run(["-m", "llava_sft.train", str(tmp_path / "run.yaml")])
    assert "vision tower test-vit (weights: random init" in trained  # our own line says where weights come from
    assert "saved model to" in trained
    loaded = run(["-c", "import logging, sys; logging.basicConfig(level=logging.INFO); "
                        "from llava_sft.model.llava import LlavaModel; LlavaModel.from_pretrained(sys.argv[1])",
                  str(tmp_path / "run")])
    assert f"loaded the trained model in {tmp_path / 'run'}" in loaded
    assert f"vision tower test-vit (weights: from {tmp_path / 'run' / 'vision_tower.safetensors'}" in loaded
    assert "random init" not in loaded
    for text, where in ((trained, "training"), (loaded, "loading")):
        found = [m for m in MISLEADING if m in text]
        assert not found, f"{where} logged {found}:\n{text[-3000:]}"
