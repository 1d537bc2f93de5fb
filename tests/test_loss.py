"""The LM head and cross-entropy run only at supervised positions (model/loss.py), with the loss and gradients of
the full computation, and a text-only micro-batch runs the vision tower only where the engine needs it.

Tolerances: in fp32 the supervised-only path multiplies the same hidden rows by the same LM head, but through a
matmul of a different shape (BLAS may pick another kernel and summation order), and sums the token losses in
another order: each logit differs by at most ~K * eps (K = 64 hidden units, eps = 6e-8: 4e-6 relative), the sum of
~100 token losses by ~100 * eps relative. rtol 1e-5 covers both with margin on any CPU.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llava_sft.config import from_dict
from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_sft.data.packing import PackingCollator
from llava_sft.model import loss as loss_module
from llava_sft.model.llava import LlavaModel, ModelConfig
from llava_sft.model.lora import LoraSettings
from tests.tiny import TINY_LLAMA, model_dict, sample_dict

VOCAB = 512


def tiny_model(tokenizer_dir, seed=0, **llm) -> LlavaModel:
    cfg = from_dict(ModelConfig, model_dict(tokenizer_dir))
    cfg.llm.config = dict(TINY_LLAMA, vocab_size=VOCAB, **llm)
    torch.manual_seed(seed)
    return LlavaModel(cfg)




def samples():
    return [sample_dict([1, IMAGE_TOKEN_INDEX, 20, 21, 22, 30, 31, 2], 1, 5, 0),  # one image
            sample_dict([1, 40, 41, 42, 43, 50, 51, 52, 53, 2], 0, 6, 1),  # text only
            sample_dict([1, IMAGE_TOKEN_INDEX, 60, IMAGE_TOKEN_INDEX, 61, 62, 70, 2], 2, 6, 2),  # two images
            sample_dict([1, IMAGE_TOKEN_INDEX, 80, 81, 90, 91, 92, 93, 94, 2], 1, 4, 3)]


def padded(items):
    width = max(len(s["input_ids"]) for s in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for row, s in enumerate(items):
        n = len(s["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = s["input_ids"], s["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "images": torch.cat([s["images"] for s in items])}


def packed(items, tokens_per_image):
    [batch] = PackingCollator(0, tokens_per_image, 4096, 4)(items)
    return {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "images")}


def loss_and_grads(model, batch, supervised_only):
    model.zero_grad(set_to_none=True)
    model.supervised_logits_only = supervised_only
    loss, count = model(**batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), int(count), grads


def assert_same(model, batch):
    full_loss, full_count, full_grads = loss_and_grads(model, batch, supervised_only=False)
    loss, count, grads = loss_and_grads(model, batch, supervised_only=True)
    assert count == full_count > 0
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=0)
    assert grads.keys() == full_grads.keys() and any("lm_head" in n for n in grads)
    for name in grads:
        scale = full_grads[name].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(grads[name] / scale, full_grads[name] / scale, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_loss_and_gradients_equal_the_full_logits_computation(llama_tokenizer_dir, layout):
    model = tiny_model(llama_tokenizer_dir)
    model.set_trainable(True, True)
    items = samples()
    assert_same(model, padded(items) if layout == "padded" else packed(items, model.tokens_per_image))


def test_several_chunks_give_the_same_loss(llama_tokenizer_dir, monkeypatch):
    model = tiny_model(llama_tokenizer_dir)
    model.set_trainable(True, True)
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 3)  # 22 supervised rows -> 8 chunks, recomputed in backward
    assert_same(model, padded(samples()))


def test_with_lora_and_gradient_checkpointing(llama_tokenizer_dir, tmp_path):
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **dict(
        {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, vocab_size=VOCAB)))
    base.save_pretrained(tmp_path / "base")
    cfg = from_dict(ModelConfig, model_dict(llama_tokenizer_dir))
    cfg.llm.config, cfg.llm.path = None, str(tmp_path / "base")
    cfg.lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    model = LlavaModel(cfg)
    model.add_lora(gradient_checkpointing=True)
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.set_trainable(True, True)
    model.train()
    full_loss, _, full_grads = loss_and_grads(model, padded(samples()), supervised_only=False)
    loss, _, grads = loss_and_grads(model, padded(samples()), supervised_only=True)
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=0)
    assert any("lora_" in n for n in grads) and grads.keys() == full_grads.keys()
    for name in grads:
        scale = full_grads[name].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(grads[name] / scale, full_grads[name] / scale, rtol=0, atol=1e-5, msg=name)


def test_no_vocabulary_wide_tensor_is_kept_for_unsupervised_positions(llama_tokenizer_dir):
    """What makes it cheaper: the tensors autograd saves for backward hold vocabulary-wide rows only for the
    supervised positions (the full path saves [positions, vocab] logits and their fp32 log-softmax)."""
    model = tiny_model(llama_tokenizer_dir)
    model.set_trainable(True, False)  # Stage 1
    batch = padded(samples())
    supervised = int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())

    def widest(supervised_only):
        model.supervised_logits_only = supervised_only
        rows = []

        weight = model.llm.get_output_embeddings().weight.untyped_storage().data_ptr()

        def pack(t):  # the LM head's weight (saved as its transpose) is not a per-position tensor
            if t.dim() >= 1 and t.shape[-1] == VOCAB and t.untyped_storage().data_ptr() != weight:
                rows.append(t.numel() // VOCAB)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = model(**batch)
        return max(rows), sum(rows)

    items = samples()
    width = max(len(s["input_ids"]) + len(s["images"]) * (model.tokens_per_image - 1) for s in items)
    full_max, _ = widest(False)
    assert full_max == len(items) * (width - 1)  # the full path keeps logits for every (shifted) position
    mine_max, mine_total = widest(True)
    assert mine_max == supervised and mine_total <= 2 * supervised  # the LM head output and the LM head's input


def test_llm_with_logit_softcapping_is_computed_in_full_with_a_warning(llama_tokenizer_dir, caplog):
    cfg = from_dict(ModelConfig, model_dict(llama_tokenizer_dir))
    cfg.llm.config = {"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB,
                      "final_logit_softcapping": 30.0, "max_position_embeddings": 256}
    cfg.llm.attn_implementation = "eager"  # transformers 5.x refuses SDPA for Gemma2 (soft-capped attention)
    torch.manual_seed(0)
    model = LlavaModel(cfg)
    model.set_trainable(True, True)
    batch = padded(samples())
    with caplog.at_level("WARNING"):
        loss, _, _ = loss_and_grads(model, batch, supervised_only=True)
    assert "final_logit_softcapping=30.0" in caplog.text
    full, _, _ = loss_and_grads(model, batch, supervised_only=False)
    assert loss == full  # the same computation


@pytest.mark.parametrize("anchor", ["none", "params", "modules"])
def test_text_only_micro_batch_runs_the_tower_only_where_the_engine_needs_it(llama_tokenizer_dir, anchor):
    model = tiny_model(llama_tokenizer_dir)
    model.set_trainable(True, True)
    model.text_only_anchor = anchor
    calls = []
    model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    text = samples()[1]
    loss, _ = model(**padded([text]))
    loss.backward()
    projector_grads = [p.grad for p in model.projector.parameters()]
    assert len(calls) == (1 if anchor == "modules" else 0)
    if anchor == "none":
        assert all(g is None for g in projector_grads)
    else:  # DDP / ZeRO: every trainable parameter gets a gradient (zero)
        assert all(g is not None and not g.any() for g in projector_grads)


def test_memory_arithmetic_uses_the_loss_chunk():
    from llava_sft.train.memory import LOSS_CHUNK_ROWS

    assert LOSS_CHUNK_ROWS == loss_module.CHUNK_ROWS


def test_an_llm_keeping_its_stack_under_transformer_trains_from_a_directory(llama_tokenizer_dir, tmp_path):
    """GPT-2-style families (GPT-2, Falcon, Bloom) keep their decoder stack in `.transformer` and its blocks in
    `.h`. transformers 4.57's get_decoder() returns the whole LM for them, and the supervised-only loss used to call
    that and fail (its output has no last_hidden_state). Loaded from a directory with gradient checkpointing on, the
    loss and gradients now equal the full path's, and the block lookup the engines use (FSDP2 sharding, compile,
    the FLOPs count) finds its 2 blocks."""
    from llava_sft.model.loss import decoder, decoder_layers

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # no dropout: both paths must see the same network
    gpt2.save_pretrained(tmp_path / "gpt2")
    cfg = from_dict(ModelConfig, model_dict(llama_tokenizer_dir))
    cfg.llm.config, cfg.llm.path = None, str(tmp_path / "gpt2")
    torch.manual_seed(0)
    model = LlavaModel(cfg)
    assert decoder(model.llm) is model.llm.transformer
    assert decoder_layers(model.llm) == list(model.llm.transformer.h) and len(model.llm.transformer.h) == 2
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.set_trainable(True, True)
    model.train()
    assert_same(model, padded(samples()))
