"""python -m llava_sft.preflight passes on every shipped paper recipe (so a recipe that no longer runs fails CI) and
fails, clearly, on a planted fault. Each rehearsal is the recipe's own launcher (scripts/stage*.sh, torchrun + the
recipe's DeepSpeed JSON over 2 gloo processes) on shrunk twins, 3 optimizer steps + a resumed one (~1-2 min each)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_sft.preflight import sizing
from llava_sft.preflight.rehearse import reference_lrs
from llava_sft.train import memory

pytestmark = pytest.mark.slow  # multi-process or full runs: `pytest -m 'not slow'` skips them

REPO = Path(__file__).resolve().parents[1]
RECIPES = (sorted((REPO / "configs" / "llava_v1_5").glob("*.yaml")) + sorted((REPO / "configs" / "llava_v1").glob("*.yaml"))
           + sorted((REPO / "configs" / "llava_next").glob("*.yaml")))


def preflight(tmp_path: Path, config: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "preflight.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("LLAVA_DATA_ROOT", None)  # generated data in the recipe's layout, whatever this machine holds
    proc = subprocess.run([sys.executable, "-m", "llava_sft.preflight", str(config), "--steps", "3",
                           "--workdir", str(tmp_path / "work"), "--json", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return proc, (json.loads(out.read_text()) if out.is_file() else {})


def status(result: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in result["checks"]}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("config", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_passes_preflight(config, tmp_path):
    # Stage 3 starts from a Stage-2 output directory, not on this machine: its LLM has Vicuna-7B's shape
    extra = ("model.llm.path=lmsys/vicuna-7b-v1.5",) if "stage3" in config.name else ()
    proc, result = preflight(tmp_path, config, *extra)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    checks = status(result)
    assert not [n for n, s in checks.items() if s == "FAIL"]
    # the checks the issue names are all there (a check that silently disappeared would pass vacuously)
    for needle in ("LLM in training mode", "vision tower in eval mode", "gradient checkpointing active",
                   "trainable parameters: llm", "frozen parameters bit-identical", "fp32 master weights",
                   "loss finite and falling", "LR per step", "resumes to the same next loss", "projected peak memory"):
        assert any(needle in name for name in checks), needle
    if "stage1" in config.name:
        assert checks["Stage-1 output accepted as Stage 2's train.pretrained_projector"] == "PASS"
    if "stage3" in config.name:  # DPO: the rehearsal went through scripts/stage3.sh and started at ln 2
        assert checks["DPO: step 1 is the policy against itself"] == "PASS"
        assert any("stage3.sh" in name for name in checks) and result["sizing"]["dpo_reference"]
    assert "preflight PASSED" in proc.stdout


@pytest.mark.timeout(900)
def test_a_planted_fault_fails_preflight_naming_the_check(tmp_path):
    """train.lr=1e12 on Stage 2: the loss goes non-finite, the rehearsal stops with the trainer's own one-line
    error, and the table fails the run and the loss check; exit code 1."""
    proc, result = preflight(tmp_path, REPO / "configs" / "llava_v1_5" / "stage2_finetune_7b.yaml", "train.lr=1e12",
                             "--nproc", "1")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = status(result)
    assert checks["loss finite and falling (same samples every step)"] == "FAIL"
    [ran] = [c for c in result["checks"] if c["name"].startswith("rehearsal ran")]
    assert ran["status"] == "FAIL" and "[train] error: step" in ran["value"] and "not finite" in ran["value"]
    assert "preflight FAILED" in proc.stdout and "FAIL  loss finite and falling" in proc.stdout


def test_an_unknown_llm_is_a_clear_error_before_anything_runs(tmp_path):
    proc, _ = preflight(tmp_path, REPO / "configs" / "llava_v1_5" / "stage1_pretrain_7b.yaml",
                        "model.llm.path=someone/unknown-llm")
    assert proc.returncode == 2 and "LLAVA_LLM" in proc.stderr and "someone/unknown-llm" in proc.stderr


def test_sizing_arithmetic_counts_what_the_modules_hold():
    """llm_params / lora_params / vit_params against real modules (GQA, untied head; peft LoRA on all linears;
    an open_clip ViT): the arithmetic that sizes a 7B run is the one whose counts preflight checks on the twin."""
    import tempfile

    import open_clip
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    llm = LlamaForCausalLM(LlamaConfig(**fields))
    shape = memory.llm_shape(dict(fields, model_type="llama"))
    assert memory.llm_params(shape) == sum(p.numel() for p in llm.parameters())
    lora = get_peft_model(llm, LoraConfig(r=4, target_modules="all-linear"))
    assert memory.lora_params(shape, 4) == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    arch = {"embed_dim": 32, "vision_cfg": {"image_size": 56, "layers": 2, "width": 64, "patch_size": 14,
                                            "head_width": 32}, "text_cfg": {"width": 32, "heads": 1, "layers": 1}}
    with tempfile.TemporaryDirectory() as d:  # open_clip reads an architecture from a file named <model>.json
        (Path(d) / "vit-count.json").write_text(json.dumps(arch))
        open_clip.add_model_config(Path(d) / "vit-count.json")
        visual = open_clip.create_model("vit-count", pretrained=None).visual
    assert memory.vit_params(64, 2, 14, 56, 32) == sum(p.numel() for p in visual.parameters())
    assert sizing.projector_params("mlp2x_gelu", 1024, 4096) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096


def test_reference_lrs_are_transformers_and_warm_up_from_zero():
    assert reference_lrs(1e-3, 4, 0.03, "cosine") == pytest.approx([0.0, 1e-3, 7.5e-4, 2.5e-4])


def test_twins_take_the_real_parts_that_are_on_disk(llama_tokenizer_dir, write_pngs, tmp_path, monkeypatch):
    """With the data, the LLM config and the tokenizer on disk, the twins use them (the first records of the real
    JSON with its image folder, the local config.json's architecture, the real tokenizer); without, stand-ins."""
    import shutil

    from llava_sft.config import load_config
    from llava_sft.preflight import twin

    root = tmp_path / "root"
    write_pngs(root / "LLaVA-Pretrain" / "images", [f"{i:03d}.png" for i in range(12)])
    records = [{"id": f"r{i}", "image": f"{i:03d}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": f"Caption {i}."}]}
        for i in range(12)]
    (root / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))
    llm = tmp_path / "my-llm"
    shutil.copytree(llama_tokenizer_dir, llm)
    real = dict(twin.KNOWN_LLMS["lmsys/vicuna-7b-v1.5"], num_key_value_heads=8, vocab_size=1000)
    (llm / "config.json").write_text(json.dumps(real))
    monkeypatch.setenv("LLAVA_DATA_ROOT", str(root))
    monkeypatch.setenv("LLAVA_LLM", str(llm))
    cfg = load_config(REPO / "configs" / "llava_v1_5" / "stage1_pretrain_7b.yaml")
    over, source, _ = twin.make_data(cfg, 8, tmp_path)
    assert json.loads(Path(over["data.path"]).read_text()) == records[:8] and "the first 8 records" in source
    assert over["data.image_folder"] == str((root / "LLaVA-Pretrain" / "images").resolve())
    config, where = twin.real_llm_config(cfg.model.llm.path)
    assert config == real and where == str(llm / "config.json")
    tokenizer, what = twin.make_tokenizer(cfg, [], tmp_path)
    assert "the real tokenizer" in what
    out, fields = twin.make_llm_twin(config, tokenizer, tmp_path / "twin", vocab_size=1000)
    assert fields["model_type"] == "llama" and fields["num_hidden_layers"] == 2
    assert fields["num_key_value_heads"] == 1  # grouped-query layout kept: 32 heads / 8 kv -> 4 / 1
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "tokenizer.model").is_file()


def test_a_stand_in_tokenizer_for_an_auto_template_run_carries_a_chat_template_auto_can_render(tmp_path):
    """template=auto with an LLM that is not on disk: the stand-in tokenizer (trained here) needs a chat template
    for the rehearsal to run the auto path; it gets Vicuna v1's, and the table says so."""
    from llava_sft.config import load_config
    from llava_sft.data.templates import get_template
    from llava_sft.data.tokenize import tokenize_conversation
    from llava_sft.preflight import twin

    cfg = load_config(REPO / "configs" / "llava_v1_5" / "stage2_finetune_7b.yaml",
                      ["data.template=auto", "model.template=auto"])
    assert twin.real_tokenizer_dir(cfg) is None
    texts = ["What is in the image?", "A red square on a blue field.", "USER: ASSISTANT:"] * 50
    tokenizer, what = twin.make_tokenizer(cfg, texts, tmp_path)
    assert "chat_template for template=auto" in what
    chat = [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A red square."}]
    ids, labels = tokenize_conversation(chat, tokenizer, get_template("auto", tokenizer=tokenizer), num_images=1)
    supervised = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
    # Vicuna v1's reply (with the " " after "ASSISTANT:", which the model generates) and its end of turn
    assert tokenizer.decode(supervised).lstrip() == "A red square.</s>"


def test_anyres_sizing_counts_tiles_tokens_and_the_trained_towers_states():
    """The LLaVA-1.6 recipe on 8 GPUs under ZeRO-2: an assumed 640x480 image is 5 tower passes and 2340 tokens; the
    trained tower moves from 2 bytes per weight (frozen, whole) to 2 + (2 + 12) / 8 (bf16 weight, gradient and AdamW
    state partitioned over 8), and its activations add 34 * 577 * 1024 * 24 bytes per pass (4 images x 5 passes)."""
    from llava_sft.config import load_config
    from llava_sft.preflight import twin

    cfg = load_config(REPO / "configs" / "llava_next" / "stage2_finetune_7b.yaml")
    llm, vision = twin.KNOWN_LLMS["lmsys/vicuna-7b-v1.5"], twin.real_vision_shape(cfg.model.vision)
    trained = sizing.size(cfg, llm, vision, 2, True, 8, 0.4, 760_000)
    assert (trained["image_tokens"], trained["tiles_per_image"], trained["assumed_image_size"]) == (2340, 5, [640, 480])
    cfg.train.train_vision_tower = False
    frozen = sizing.size(cfg, llm, vision, 2, True, 8, 0.4, 760_000)
    gib = 1024 ** 3
    assert trained["states_gib"] - frozen["states_gib"] == pytest.approx(1.75 * trained["vision_params"] / gib, abs=0.01)
    tower_act = 34 * 577 * 1024 * 24 * 4 * 5 / gib
    assert trained["activations_gib"] - frozen["activations_gib"] == pytest.approx(tower_act, abs=0.01)
    assert trained["hours"]["A100-80GB"] > frozen["hours"]["A100-80GB"]  # the tower's backward
