"""The local transformers backend of data_prep.gen_instruct: a tiny random-init Llama saved with a tokenizer
trained at test time. Its replies are noise; the test checks that a run completes offline and that every
reply goes through parsing into either a record or a counted rejection."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from data_prep.gen_instruct import main as gen_main
from tests.test_gen_instruct import write_coco
from tests.tiny import TINY_LLAMA

PROMPTS = Path(__file__).resolve().parents[1] / "data_prep" / "prompts"


def test_transformers_backend_runs_and_flows_through_parsing(tmp_path, llama_tokenizer_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "tiny-llm"
    tokenizer = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    config = AutoConfig.for_model(**dict(TINY_LLAMA, max_position_embeddings=8192, vocab_size=len(tokenizer),
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    prompts = tmp_path / "prompts"  # the shipped prompt sets with short replies, to keep the test fast
    shutil.copytree(PROMPTS, prompts)
    for path in prompts.glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump(dict(raw, max_tokens=12, temperature=0.0)))

    cap, inst = write_coco(tmp_path)
    out = tmp_path / "out"
    args = ["--captions", str(cap), "--instances", str(inst), "--out", str(out), "--prompts-dir", str(prompts),
            "--mix", "conversation=1,detail=1,complex_reasoning=1", "--total", "3", "--max-images", "2",
            "--backend", "transformers", "--model", str(model_dir)]
    report = gen_main(args)

    cache = [json.loads(line) for line in (out / "cache.jsonl").read_text().splitlines()]
    assert len(cache) == 3 and {e["kind"] for e in cache} == {"conversation", "detail", "complex_reasoning"}
    assert all(e["model"] == "tiny-llm" and e["prompt_tokens"] > 100 and 0 < e["completion_tokens"] <= 12
               for e in cache)
    for k in report["kinds"].values():  # every reply ends as a record or a counted rejection
        assert k["requested"] == 1 and k["accepted"] + sum(k["rejected"].values()) == 1
    # 12 tokens cannot make a 40-word description
    assert report["kinds"]["detail"]["rejected"] == {"shorter than 40 words": 1}
    assert report["tokens"]["this_run"]["completion"] == sum(e["completion_tokens"] for e in cache)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {r["reply"] for r in rejected} <= {e["reply"] for e in cache}

    # deterministic and cached: a second run sends nothing and gives the same output
    before = (out / "instruct.json").read_bytes()
    again = gen_main(args)
    assert again["tokens"]["this_run"]["completion"] == 0
    assert (out / "instruct.json").read_bytes() == before
