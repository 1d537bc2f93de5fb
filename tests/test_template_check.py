"""The start-up template check (data/template_check.py): a named template that is not the tokenizer's own chat
template stops the run before any weights load, showing the first differing tokens and the fix.

The tokenizers are built here (a ChatML-style byte-level BPE, as Qwen2's) and given chat templates written from
the published ones: Qwen2.5-Instruct's (tokenizer_config.json of Qwen/Qwen2.5-7B-Instruct, its branch without
tools: a default system prompt when the conversation has none) and Mistral-Instruct v0.1's (no system role,
`[INST] ... [/INST]`, tokenizer_config.json of mistralai/Mistral-7B-Instruct-v0.1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import save_config
from llava_sft.data.template_check import TemplateMismatch, check, compare
from llava_sft.data.templates import get_template
from llava_sft.data.tokenizer_train import demo_corpus, make_chatml_style_tokenizer
from llava_sft.interop.chat_template import to_jinja
from llava_sft.model.llava import load_tokenizer
from tests.conftest import EXTRA_LINES
from tests.tiny import TINY_LLAMA, run_config

pytestmark = pytest.mark.latest_stack  # passes on constraints/latest.txt too (CI runs it there)

REPO = Path(__file__).resolve().parents[1]
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>'"
    " + '\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token + ' ' }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory) -> Path:
    return make_chatml_style_tokenizer(demo_corpus(400) + EXTRA_LINES, tmp_path_factory.mktemp("chatml"))


def with_template(src: Path, out: Path, jinja: str) -> Path:
    tok = load_tokenizer(str(src), use_fast=True)
    tok.chat_template = jinja
    tok.save_pretrained(out)
    return out


def test_chatml_against_qwen25s_own_template_names_the_system_prompt(chatml_dir, tmp_path):
    tok = load_tokenizer(str(with_template(chatml_dir, tmp_path / "qwen", QWEN25)), use_fast=True)
    problem = compare(tok, get_template("chatml"), None)
    assert problem and "data.template=chatml is not the tokenizer's own chat template" in problem
    assert "Only the system prompt differs" in problem and QWEN_SYSTEM in problem
    assert "ours:" in problem and "model's:" in problem  # the first differing tokens, side by side
    # the fix it names: the model's default system prompt, passed as model.system_prompt
    assert compare(tok, get_template("chatml", QWEN_SYSTEM), QWEN_SYSTEM) is None
    # a system prompt of the run's own goes to both sides
    assert compare(tok, get_template("chatml", "Be brief."), "Be brief.") is None


def test_a_template_of_another_format_differs_from_the_first_token(chatml_dir, tmp_path):
    tok = load_tokenizer(str(with_template(chatml_dir, tmp_path / "mistral", MISTRAL)), use_fast=True)
    problem = compare(tok, get_template("chatml"), None)
    assert problem and "Only the system prompt differs" not in problem
    with pytest.raises(TemplateMismatch):
        check(tok, get_template("chatml"), None, "error")
    check(tok, get_template("chatml"), None, "warn")  # logged, not raised
    check(tok, get_template("chatml"), None, "off")


def test_the_models_template_equal_to_ours_passes_and_no_template_is_not_checked(chatml_dir, tmp_path):
    tok = load_tokenizer(str(with_template(chatml_dir, tmp_path / "ours", to_jinja(get_template("chatml")))),
                         use_fast=True)
    assert compare(tok, get_template("chatml"), None) is None
    assert compare(load_tokenizer(str(chatml_dir), use_fast=True), get_template("chatml"), None) is None
    assert compare(tok, get_template("plain"), None) is None  # Stage 1's format is not a chat


@pytest.mark.timeout(300)
def test_the_cli_refuses_before_any_weights_load(chatml_dir, tmp_path):
    """The LLM directory's weights are garbage: a run that loaded them would fail on them; the template check must
    come first, exit 2, one message."""
    llm = with_template(chatml_dir, tmp_path / "llm", QWEN25)
    tok = load_tokenizer(str(llm), use_fast=True)
    (llm / "config.json").write_text(json.dumps(dict(TINY_LLAMA, vocab_size=len(tok), architectures=["LlamaForCausalLM"])))
    (llm / "model.safetensors").write_bytes(b"not weights")
    make_shapes(tmp_path / "data", seed=1, image_size=32, n_stage1=2, n_stage2=4, n_eval=1, text_only_frac=0.0)
    cfg = run_config(chatml_dir, tmp_path / "data", tmp_path / "run", stage=2)
    cfg.model.llm.config, cfg.model.llm.path, cfg.model.tokenizer = None, str(llm), None
    cfg.model.tokenizer_use_fast = True
    cfg.data.template = cfg.model.template = "chatml"
    save_config(cfg, tmp_path / "run.yaml")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "llava_sft.train", str(tmp_path / "run.yaml")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "[train] error: data.template=chatml is not the tokenizer's own chat template" in result.stderr
    assert QWEN_SYSTEM in result.stderr and "safetensors" not in result.stderr.lower()
    result = subprocess.run([sys.executable, "-m", "llava_sft.train", str(tmp_path / "run.yaml"),
                             "data.template_check=off", "train.max_steps=1"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=280)
    assert result.returncode != 0 and "safetensors" in result.stderr.lower()  # past the check: the weights fail
