"""LoRA and QLoRA under DeepSpeed on two CPU processes (gloo) train like one plain process with the same global
batch, and write the single-process LoRA output (adapter + projector) that merge_lora turns into a plain model.

LoRA runs under ZeRO-3 (the recipe's engine), QLoRA under ZeRO-2 (as LLaVA's finetune_qlora.sh): ZeRO-3 cannot
partition a 4-bit base here and says so before anything loads. The bf16 case checks that DeepSpeed's
`module.bfloat16()` leaves the 4-bit NF4 weights alone (they are uint8 storage, not floating point), so a bf16
QLoRA run on GPUs trains the same model.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llava_sft.merge_lora import merge_lora
from llava_sft.model.llava import LlavaModel
from llava_sft.model.lora import LoraSettings
from llava_sft.train.engines.deepspeed import DeepSpeedConfigError
from llava_sft.train.trainer import build, train
from tests import test_deepspeed
from tests.test_deepspeed import REL, ds_json, rows, stage2_from_pretrained, torchrun  # noqa: F401

pytestmark = pytest.mark.slow  # multi-process or full runs: `pytest -m 'not slow'` skips them

shapes = test_deepspeed.shapes  # the same module-scoped fixture


def lora_run(tokenizer_dir, data, tmp_path, name, quantize=None, **kw):
    cfg = stage2_from_pretrained(tokenizer_dir, data, tmp_path, name, global_batch_size=8, micro_batch_size=2,
                                 lr=2e-3, projector_lr=5e-4, **kw)
    cfg.model.lora = LoraSettings(r=8, alpha=16, dropout=0.0, quantize=quantize)
    return cfg


@pytest.mark.timeout(420)
@pytest.mark.parametrize("quantize,zero,bf16", [(None, "zero3.json", False), ("nf4", "zero2.json", False),
                                                ("nf4", "zero2.json", True)])
def test_lora_under_deepspeed_matches_one_process(llama_tokenizer_dir, shapes, tmp_path, quantize, zero, bf16):
    if quantize:
        pytest.importorskip("bitsandbytes")
    train(lora_run(llama_tokenizer_dir, shapes, tmp_path, "plain", quantize))
    ds_cfg = ds_json(tmp_path, zero, **({"bf16": {"enabled": True}} if bf16 else {}))
    torchrun(lora_run(llama_tokenizer_dir, shapes, tmp_path, "ds", quantize, deepspeed=str(ds_cfg)), tmp_path, "ds",
             29761)
    want, got = rows(tmp_path / "plain"), rows(tmp_path / "ds")
    assert len(got) == 4 and got[-1]["loss"] < got[0]["loss"]
    # fp32 (4-bit layers compute in model.llm.dtype, fp32 here): REL, gradients summed in another order. bf16: the
    # engine's forward rounds weights and activations to 8 significant bits (unit roundoff 2^-8 ~ 4e-3), a few
    # roundings deep, so ~1 % is all the arithmetic guarantees (measured ~1e-4). The NF4 corruption this case is for
    # is asserted bit-exactly below: this near-uniform model's loss (~ln V) moves only ~0.3 % with scrambled NF4 codes
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-2 if bf16 else REL)
    if bf16:  # DeepSpeed's bf16 engine calls module.bfloat16(): every 4-bit weight and its quantisation state
        # (block scales, code books) must come through bit-identical
        model, _, _ = build(lora_run(llama_tokenizer_dir, shapes, tmp_path, "probe", quantize), torch.device("cpu"))
        before = {k: v.clone() for k, v in model.state_dict().items() if ".base_layer.weight" in k}
        after = model.bfloat16().state_dict()
        assert model.quantized and any(v.dtype == torch.uint8 for v in before.values())
        assert all(torch.equal(v, after[k]) for k, v in before.items())
    if not bf16:  # the output is the single-process LoRA format: adapter + projector, the same tensors
        for name in ("llm/adapter_model.safetensors", "projector.safetensors"):
            a, b = load_file(tmp_path / "ds" / name), load_file(tmp_path / "plain" / name)
            assert a.keys() == b.keys() and a
            for k in a:
                # Adam moves each weight by ~lr (2e-3) per step whatever the gradient size, so float-order noise in
                # a near-zero gradient can show as ~1e-5; 1e-4 is 5 % of one step
                torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    merged = merge_lora(tmp_path / "ds", tmp_path / "merged")
    assert not LlavaModel.from_pretrained(merged)[0].quantized


def test_qlora_under_zero3_is_refused_before_loading(llama_tokenizer_dir, shapes, tmp_path):
    cfg = lora_run(llama_tokenizer_dir, shapes, tmp_path, "z3", "nf4", deepspeed=str(ds_json(tmp_path, "zero3.json")))
    with pytest.raises(DeepSpeedConfigError, match="ZeRO-3.*4-bit.*zero2.json"):
        train(cfg)
    assert not (tmp_path / "z3" / "metrics.jsonl").exists()


def test_profile_memory_counts_weights_gradients_and_adam_states(llama_tokenizer_dir, shapes, tmp_path):
    """train.profile_memory logs the live tensor bytes before the optimizer step; in fp32 on one process that is
    4 bytes per weight + 4 per gradient + 8 for AdamW's two moments per trainable parameter, 4 per frozen one
    (benchmarks/scale.py's arithmetic), up to the batch and small buffers."""
    import gc

    from llava_sft.train.measure import live_tensor_gb

    cfg = stage2_from_pretrained(llama_tokenizer_dir, shapes, tmp_path, "run", global_batch_size=4,
                                 micro_batch_size=4, profile_memory=True)
    cfg.train.max_steps = 2
    model, _, _ = build(cfg, torch.device("cpu"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    del model
    gc.collect()
    before = live_tensor_gb(torch.nn.Module(), torch.device("cpu"), 1)  # whatever else this process holds
    train(cfg)
    first, second = rows(tmp_path / "run")
    gib = 2**30
    # step 1: weights + gradients; step 2: + AdamW's moments (created by the first optimizer step)
    assert first["live_tensor_gb"] - before == pytest.approx((8 * trainable + 4 * frozen) / gib, rel=0.05)
    assert second["live_tensor_gb"] - first["live_tensor_gb"] == pytest.approx(8 * trainable / gib, rel=0.05)
    assert second["peak_mem_gb"] > second["live_tensor_gb"]  # peak RSS: also the runtime and the activations
