"""LLM backends for instruction generation, behind one interface:

    backend.complete(messages, temperature, max_tokens) -> llava_sft.chat_client.ChatReply
    backend.model            name recorded with every cached reply
    backend.max_concurrency  how many requests may be in flight at once

* `openai`: any OpenAI-compatible chat-completions endpoint (`llava_sft.chat_client.ChatClient`: base
  URL, model, key, requests-per-minute limit, retries with backoff); requests run concurrently.
* `transformers`: a local causal LM directory (`AutoModelForCausalLM` + its tokenizer), for offline
  use. The messages are rendered with the tokenizer's chat template, or, when it has none, as
  "SYSTEM\\n\\n### User:\\n...\\n\\n### Assistant:\\n..." turns. Greedy at temperature 0, sampling otherwise
  (seeded per request, so a prompt always gets the same reply). One request at a time.
"""
from __future__ import annotations

import argparse
import os
import threading

from llava_sft.chat_client import ChatClient, ChatReply

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class TransformersBackend:
    max_concurrency = 1

    def __init__(self, path: str, device: str = "cpu", dtype: str = "auto", seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch, self.device, self.seed = torch, device, seed
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
        self.model = os.path.basename(os.path.normpath(path))
        self.max_positions = getattr(self.lm.config, "max_position_embeddings", None)
        self._lock = threading.Lock()

    def prompt(self, messages: list[dict]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = []
        for m in messages:
            if m["role"] == "system":
                parts.append(m["content"] + "\n\n")
            else:
                parts.append(f"### {'User' if m['role'] == 'user' else 'Assistant'}:\n{m['content']}\n\n")
        return "".join(parts) + "### Assistant:\n"

    def complete(self, messages: list[dict], temperature: float, max_tokens: int) -> ChatReply:
        torch = self.torch
        text = self.prompt(messages)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=not getattr(
            self.tokenizer, "chat_template", None)).input_ids.to(self.device)
        n = ids.shape[1]
        if self.max_positions and n + max_tokens > self.max_positions:
            raise ValueError(f"prompt of {n} tokens + max_tokens {max_tokens} exceeds the model's "
                             f"{self.max_positions} positions (shorten the prompt set or lower max_tokens)")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else {
            "do_sample": False}
        with self._lock, torch.no_grad():
            torch.manual_seed(self.seed)
            out = self.lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                   pad_token_id=pad, **sampling)
        new = out[0, n:]
        return ChatReply(self.tokenizer.decode(new, skip_special_tokens=True), self.model, n, int(new.shape[0]))


def add_backend_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("LLM backend")
    g.add_argument("--backend", choices=("openai", "transformers"), default="openai")
    g.add_argument("--model", help="openai: model name (env LLAVA_GEN_MODEL); transformers: model directory")
    g.add_argument("--base-url", help=f"openai: endpoint (env LLAVA_GEN_BASE_URL, default {DEFAULT_BASE_URL})")
    g.add_argument("--api-key", help="openai: key (env OPENAI_API_KEY)")
    g.add_argument("--rpm", type=float, default=None, help="openai: at most this many requests per minute")
    g.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight at once")
    g.add_argument("--timeout", type=float, default=120.0, help="openai: seconds per request")
    g.add_argument("--max-retries", type=int, default=8, help="openai: retries on 429/5xx/timeouts")
    g.add_argument("--backoff", type=float, default=1.0, help="openai: first retry delay (s), doubled each retry")
    g.add_argument("--device", default="cpu", help="transformers: torch device")
    g.add_argument("--dtype", default="auto", help="transformers: auto, float32, bfloat16, float16")


def make_backend(args: argparse.Namespace, seed: int = 0):
    if args.backend == "transformers":
        if not args.model:
            raise SystemExit("--backend transformers needs --model DIR (a local causal LM directory)")
        return TransformersBackend(args.model, args.device, args.dtype, seed)
    base_url = args.base_url or os.environ.get("LLAVA_GEN_BASE_URL") or DEFAULT_BASE_URL
    model = args.model or os.environ.get("LLAVA_GEN_MODEL")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if not model:
        raise SystemExit("--backend openai needs --model NAME (or LLAVA_GEN_MODEL)")
    if not api_key and base_url.rstrip("/") == DEFAULT_BASE_URL:
        raise SystemExit("no API key for api.openai.com: set OPENAI_API_KEY or --api-key "
                         "(or point --base-url / LLAVA_GEN_BASE_URL at another OpenAI-compatible server)")
    client = ChatClient(base_url, model, api_key, timeout=args.timeout, max_retries=args.max_retries,
                        backoff=args.backoff, requests_per_minute=args.rpm, name="generate")
    client.max_concurrency = max(1, args.concurrency)
    return client
