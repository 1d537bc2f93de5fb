"""Model: vision features, projectors, <image> splicing, mixed batches, hand-off, generation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_sft.config import from_dict
from llava_sft.constants import IMAGE_TOKEN_INDEX
from llava_sft.model.llava import LlavaModel, ModelConfig, load_tokenizer
from llava_sft.model.projector import build_projector
from llava_sft.model.splice import splice_images
from llava_sft.model.vision import VisionConfig, build_vision_tower
from tests.tiny import TEST_VIT, model_dict

P, D = 3, 4  # tokens per image and embedding width for the splicing tests


class IdEmbedding(torch.nn.Module):
    """Embeds token t as the vector [t, t, t, t], so positions can be read back from the output."""

    def forward(self, ids):
        return ids.float()[..., None].expand(*ids.shape, D)


def image_feats(*values):
    return torch.stack([torch.full((P, D), float(v)) for v in values])


def test_splice_places_image_tokens_and_masks_their_labels():
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7], [1, IMAGE_TOKEN_INDEX, 8, IMAGE_TOKEN_INDEX, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, 6, 7], [-100, -100, 8, -100, -100]])
    out = splice_images(ids, mask, image_feats(100, 200, 300), IdEmbedding(), labels)
    # row 0: 1 5 [100 x3] 6 7 ; row 1: 1 [200 x3] 8 [300 x3]
    assert out.inputs_embeds[0, :, 0].tolist() == [1, 5, 100, 100, 100, 6, 7, 0]
    assert out.inputs_embeds[1, :, 0].tolist() == [1, 200, 200, 200, 8, 300, 300, 300]
    assert out.labels[0].tolist() == [-100, -100, -100, -100, -100, 6, 7, -100]
    assert out.labels[1].tolist() == [-100, -100, -100, -100, 8, -100, -100, -100]
    assert out.attention_mask.tolist() == [[1] * 7 + [0], [1] * 8]
    assert out.position_ids[1].tolist() == list(range(8))
    assert out.position_ids[0, :7].tolist() == list(range(7))


def test_splice_left_padding_for_generation():
    ids = torch.tensor([[0, 0, 1, IMAGE_TOKEN_INDEX, 9], [1, 4, IMAGE_TOKEN_INDEX, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = splice_images(ids, mask, image_feats(100, 200), IdEmbedding(), padding_side="left")
    assert out.inputs_embeds[0, :, 0].tolist() == [0, 0, 1, 100, 100, 100, 9]
    assert out.inputs_embeds[1, :, 0].tolist() == [1, 4, 200, 200, 200, 5, 6]
    assert out.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert out.position_ids[0, 2:].tolist() == [0, 1, 2, 3, 4]


def test_splice_text_only_batch_needs_no_image_and_count_mismatch_fails():
    ids = torch.tensor([[1, 2, 3]])
    out = splice_images(ids, torch.ones_like(ids), None, IdEmbedding(), ids.clone())
    assert out.inputs_embeds[0, :, 0].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="1 image placeholder"):
        splice_images(torch.tensor([[1, IMAGE_TOKEN_INDEX]]), torch.ones(1, 2, dtype=torch.long), None, IdEmbedding())


def test_vision_tower_reads_the_selected_block_and_drops_cls():
    cfg = VisionConfig(model="test-vit", pretrained=None, model_config_file=TEST_VIT, select_layer=-2)
    tower = build_vision_tower(cfg)
    pixels = torch.randn(2, 3, 32, 32)
    visual = tower.visual
    with torch.no_grad():
        hidden = [visual._embeds(pixels)]  # HF-style hidden states: embeddings, then every block's output
        for block in visual.transformer.resblocks:
            hidden.append(block(hidden[-1]))
    assert torch.allclose(tower(pixels), hidden[-2][:, 1:], atol=1e-6)  # penultimate block, CLS dropped
    cls_tower = build_vision_tower(VisionConfig(model="test-vit", pretrained=None, model_config_file=TEST_VIT,
                                                select_layer=-1, select_feature="cls_patch"))
    cls_tower.load_state_dict(tower.state_dict())
    assert torch.allclose(cls_tower(pixels), hidden[-1], atol=1e-6)
    assert tower.num_tokens == 16 and cls_tower.num_tokens == 17
    assert type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"  # OpenAI CLIP activation
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training  # frozen towers stay in eval mode


def test_projectors():
    mlp = build_projector("mlp2x_gelu", 8, 16)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear"]
    assert len(build_projector("mlp3x_gelu", 8, 16)) == 5
    assert isinstance(build_projector("linear", 8, 16), torch.nn.Linear)
    with pytest.raises(ValueError, match="identity"):
        build_projector("identity", 8, 16)
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("mlp2x_relu", 8, 16)


# Golden cases: per projector, its state-dict keys (the layout of LLaVA's `mm_projector.*` weights, which
# import/export rely on) and its output written out from those weights. Every registered name needs one.
PROJECTOR_GOLDEN = {
    "linear": (["bias", "weight"], lambda sd, x: x @ sd["weight"].T + sd["bias"]),
    "identity": ([], lambda sd, x: x),
    "mlp2x_gelu": (["0.bias", "0.weight", "2.bias", "2.weight"],
                   lambda sd, x: torch.nn.functional.gelu(x @ sd["0.weight"].T + sd["0.bias"]) @ sd["2.weight"].T
                   + sd["2.bias"]),
}


@pytest.mark.parametrize("kind", sorted(PROJECTOR_GOLDEN))
def test_projector_registry_golden(kind):
    from llava_sft.model.projector import PROJECTORS

    assert set(PROJECTORS) <= set(PROJECTOR_GOLDEN), "a registered projector has no golden case"
    torch.manual_seed(0)
    proj = build_projector(kind, 16, 16)
    keys, formula = PROJECTOR_GOLDEN[kind]
    sd = proj.state_dict()
    assert sorted(sd) == keys
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(proj(x), formula(sd, x), rtol=1e-5, atol=1e-6)


def test_register_projector():
    from llava_sft.model.projector import PROJECTORS, register_projector

    @register_projector("test_scaled_linear")
    def scaled(vision_dim, llm_dim):
        return torch.nn.Sequential(torch.nn.LayerNorm(vision_dim), torch.nn.Linear(vision_dim, llm_dim))

    try:
        assert build_projector("test_scaled_linear", 8, 4)(torch.randn(3, 8)).shape == (3, 4)
        with pytest.raises(ValueError, match="registered twice"):
            register_projector("test_scaled_linear")(scaled)
    finally:  # leave both registries as they were: test_config_values compares them, in any test order
        from llava_sft import registry

        PROJECTORS.pop("test_scaled_linear")
        registry.PROJECTOR_NAMES.discard("test_scaled_linear")


def make_model(tokenizer_dir, seed: int = 0, **kw) -> LlavaModel:
    torch.manual_seed(seed)
    cfg = from_dict(ModelConfig, model_dict(tokenizer_dir, **kw))
    cfg.llm.config["vocab_size"] = len(load_tokenizer(str(tokenizer_dir)))
    return LlavaModel(cfg)


def test_mixed_batch_runs_the_vision_tower_only_on_real_images(llama_tokenizer_dir):
    model = make_model(llama_tokenizer_dir)
    seen = []
    model.vision_tower.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 7, 8, 9], [1, 10, 11, 12, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9], [-100, -100, 11, 12, -100]])
    pixels = torch.randn(1, 3, 32, 32)
    loss_sum, n = model(ids, mask, pixels, labels)
    assert seen == [1]  # one real image, no dummy image for the text-only row
    assert int(n) == 4 and torch.isfinite(loss_sum)
    # rows are independent: the mixed batch's loss is the sum of each row's loss alone
    image_row, _ = model(ids[:1], mask[:1], pixels, labels[:1])
    text_row, n_text = model(ids[1:, :4], mask[1:, :4], torch.zeros(0, 3, 32, 32), labels[1:, :4])
    # a text-only training batch runs the tower on one blank image (every rank calls the same modules in the
    # same order, which ZeRO-3 needs), counted zero times; without gradients too (DPO's reference passes under
    # ZeRO-3 / FSDP2 gather the projector's shards in its forward), with the same loss
    assert int(n_text) == 2 and seen == [1, 1, 1]
    with torch.no_grad():
        assert torch.equal(model(ids[1:, :4], mask[1:, :4], torch.zeros(0, 3, 32, 32), labels[1:, :4])[0], text_row)
    assert seen == [1, 1, 1, 1]
    model.text_only_anchor = "params"  # DDP: the anchor is for gradients only, none without them
    with torch.no_grad():
        model(ids[1:, :4], mask[1:, :4], torch.zeros(0, 3, 32, 32), labels[1:, :4])
    assert seen == [1, 1, 1, 1]
    assert torch.allclose(loss_sum, image_row + text_row, atol=1e-4)
    loss_sum.backward()
    assert model.projector[0].weight.grad is not None


def test_projector_handoff_and_clear_failure_on_mismatch(llama_tokenizer_dir, tmp_path):
    stage1 = make_model(llama_tokenizer_dir)
    stage1.save_projector(tmp_path / "stage1")
    stage2 = make_model(llama_tokenizer_dir, seed=1)
    assert not torch.equal(stage2.projector[0].weight, stage1.projector[0].weight)
    stage2.load_projector(tmp_path / "stage1")
    for a, b in zip(stage1.projector.state_dict().values(), stage2.projector.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="'mlp2x_gelu' but this model uses 'linear'"):
        make_model(llama_tokenizer_dir, projector="linear").load_projector(tmp_path / "stage1")
    with pytest.raises(ValueError, match="dims"):
        make_model(llama_tokenizer_dir, hidden=32).load_projector(tmp_path / "stage1")
    with pytest.raises(FileNotFoundError):
        stage2.load_projector(tmp_path / "nowhere")
    # a bare projector file without its config is still checked by shape
    (tmp_path / "bare").mkdir()
    (tmp_path / "stage1" / "projector.safetensors").rename(tmp_path / "bare" / "projector.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        make_model(llama_tokenizer_dir, hidden=32).load_projector(tmp_path / "bare" / "projector.safetensors")


def test_a_stage1_projector_directory_loads_on_the_frozen_llm_and_tower_the_run_read(llama_tokenizer_dir, tmp_path):
    """A Stage-1 run saves its projector only (tower and LLM were frozen): from_pretrained rebuilds the model from
    the LLM directory and tower weights the run named, bit-identical; it used to fail with a hub-id error about
    a `llm/` folder that Stage 1 never writes. Runs on random-init parts cannot be rebuilt: a clear error."""
    import open_clip

    base = make_model(llama_tokenizer_dir)
    base.llm.save_pretrained(tmp_path / "llm")
    open_clip.add_model_config(TEST_VIT)
    tower = open_clip.create_model("test-vit", force_quick_gelu=True)
    tower.visual.load_state_dict(base.vision_tower.visual.state_dict())
    torch.save(tower.state_dict(), tmp_path / "tower.pt")
    cfg = model_dict(llama_tokenizer_dir)
    cfg["llm"], cfg["vision"]["pretrained"] = {"path": str(tmp_path / "llm")}, str(tmp_path / "tower.pt")
    stage1 = LlavaModel(from_dict(ModelConfig, cfg))
    stage1.save_projector(tmp_path / "stage1", {"template": "plain"})
    loaded, tokenizer, saved = LlavaModel.from_pretrained(tmp_path / "stage1")
    assert saved["template"] == "plain" and len(tokenizer) == len(load_tokenizer(str(llama_tokenizer_dir)))
    for (name, a), b in zip(stage1.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    (tmp_path / "tower.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"projector only .*tower weights .*tower\.pt are not there"):
        LlavaModel.from_pretrained(tmp_path / "stage1")
    config_file = tmp_path / "stage1" / "llava_config.json"
    saved["model"]["tokenizer"] = str(tmp_path / "moved" / "tokenizer")
    config_file.write_text(json.dumps(saved))
    with pytest.raises(FileNotFoundError, match=r"its tokenizer .*moved/tokenizer is not there"):
        LlavaModel.from_pretrained(tmp_path / "stage1")
    base.save_projector(tmp_path / "random")  # LLM from model.llm.config, tower random-init
    with pytest.raises(FileNotFoundError, match="LLM was random-init .*never saved; its vision tower was random"):
        LlavaModel.from_pretrained(tmp_path / "random")


def test_saved_model_generates_deterministically_and_batching_does_not_change_answers(llama_tokenizer_dir, tmp_path):
    from llava_sft.generate import Answerer

    model = make_model(llama_tokenizer_dir)
    model.save_pretrained(tmp_path / "m", load_tokenizer(str(llama_tokenizer_dir)), {"template": "vicuna_v1"})
    saved = json.loads((tmp_path / "m" / "llava_config.json").read_text())
    assert saved["image"]["aspect"] == "pad" and saved["template"] == "vicuna_v1"
    answerer = Answerer(tmp_path / "m", device="cpu")
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue", "green")]
    questions = ["What is it?", "What color is it?", "Is it big?"]
    batched = answerer.answer(questions, images, max_new_tokens=8)
    assert batched == answerer.answer(questions, images, max_new_tokens=8)
    single = [answerer.answer([q], [im], max_new_tokens=8)[0] for q, im in zip(questions, images, strict=True)]
    assert batched == single
    again = Answerer(tmp_path / "m", device="cpu").answer(questions, images, max_new_tokens=8)
    assert again == batched  # the saved directory alone determines the answers
    sampled = [answerer.answer(questions, images, max_new_tokens=8, temperature=1.5, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # sampling is reproducible for a seed
    assert sampled[0] != batched or sampled[2] != batched  # and really samples
    # the loaded model has the same weights as the saved one
    for (name, a), b in zip(model.state_dict().items(), answerer.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_vision_tower_loads_a_local_weights_file_offline(tmp_path):
    import open_clip

    open_clip.add_model_config(TEST_VIT)
    reference = open_clip.create_model("test-vit", force_quick_gelu=True)
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    tower = build_vision_tower(VisionConfig(model="test-vit", pretrained=str(tmp_path / "weights.pt"),
                                            model_config_file=TEST_VIT))
    for name, value in reference.visual.state_dict().items():
        assert torch.equal(tower.visual.state_dict()[name], value), name
    with pytest.raises(FileNotFoundError, match="not found"):
        build_vision_tower(VisionConfig(model="test-vit", pretrained=str(tmp_path / "missing.pt"),
                                        model_config_file=TEST_VIT))


@pytest.mark.latest_stack  # the probe lives in accelerate; the latest stack's accelerate has it too
def test_saving_an_llm_does_not_import_deepspeed_and_round_trips_exactly(tmp_path, llama_tokenizer_dir):
    """transformers' save_pretrained probes for a DeepSpeedEngine by importing deepspeed (6 s on 2 cores, in every
    run that saves); save_llm skips the probe while deepspeed is not imported, and writes the same model. Saved the
    way every run saves (LlavaModel.save_pretrained), so a return to llm.save_pretrained there fails here. A fresh
    interpreter, because this test session may have imported deepspeed already."""
    import subprocess
    import sys

    script = f"""
import sys, torch, accelerate.utils.other as other
from llava_sft.config import from_dict
from llava_sft.model.llava import LlavaModel, ModelConfig, load_tokenizer
from tests.tiny import model_dict
tokenizer = load_tokenizer({str(llama_tokenizer_dir)!r})
cfg = from_dict(ModelConfig, model_dict({str(llama_tokenizer_dir)!r}))
cfg.llm.config["vocab_size"] = len(tokenizer)
model = LlavaModel(cfg)
probe = other.is_deepspeed_available
model.save_pretrained({str(tmp_path / "model")!r}, tokenizer)
assert "deepspeed" not in sys.modules, "saving imported deepspeed"
assert other.is_deepspeed_available is probe, "the probe was not restored"
loaded = LlavaModel.from_pretrained({str(tmp_path / "model")!r})[0]
for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
    assert torch.equal(a, b), name
print("ok")
"""
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
