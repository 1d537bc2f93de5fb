"""A small OpenAI-compatible chat-completions client (standard library only), shared by the LLM judge
(`llava_sft.eval.judge`) and the instruction generator (`data_prep.gen_instruct`).

    client = ChatClient("http://127.0.0.1:8000/v1", "my-model", api_key=None, requests_per_minute=600)
    reply = client.complete([{"role": "user", "content": "Hi"}], temperature=0.2, max_tokens=64)
    reply.text, reply.model, reply.prompt_tokens, reply.completion_tokens

POST {base_url}/chat/completions with {model, messages, temperature, max_tokens}; the key is sent as a
Bearer token. 408/409/429/5xx, timeouts and connection errors are retried with exponential backoff
(`backoff * 2**attempt`, at most `max_backoff`, Retry-After honoured); 401/403 and other 4xx stop with a
`ChatError` naming the status and the server's message. `requests_per_minute` spaces the start of
consecutive requests (retries included) by 60/rpm seconds across all threads, so one client can be
shared by a thread pool (the caller's concurrency). Token usage is taken from the reply's `usage`
field (None when the server does not report it) and summed in `prompt_tokens` / `completion_tokens`.
"""
from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class ChatError(RuntimeError):
    """The endpoint cannot be used (bad key, bad request, retries exhausted, malformed response)."""


@dataclass(frozen=True)
class ChatReply:
    text: str
    model: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ChatClient:
    """OpenAI-compatible chat-completions client (urllib), with retries, rate limit and usage accounting."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 8, backoff: float = 1.0, max_backoff: float = 60.0,
                 requests_per_minute: float | None = None, name: str = "llm",
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        if requests_per_minute is not None and requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute must be > 0, got {requests_per_minute}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout, self.name = model, api_key, timeout, name
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.min_interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.sleep, self.clock = sleep, clock
        self._lock = threading.Lock()
        self._next_start = None
        self.n_requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    # ------------------------------------------------------------------ internals
    def _throttle(self) -> None:
        with self._lock:
            self.n_requests += 1
            if not self.min_interval:
                return
            now = self.clock()
            start = now if self._next_start is None else max(now, self._next_start)
            self._next_start = start + self.min_interval
        if start > now:
            self.sleep(start - now)

    def _wait(self, attempt: int, retry_after: str | None = None) -> None:
        delay = min(self.backoff * 2 ** attempt, self.max_backoff)
        if retry_after:
            try:
                delay = min(max(float(retry_after), delay), self.max_backoff)
            except ValueError:
                pass
        self.sleep(delay)

    def _parse(self, data) -> ChatReply:
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ChatError(f"{self.url}: unexpected response (no choices[0].message.content): "
                            f"{json.dumps(data)[:500]}") from None
        usage = data.get("usage") or {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        with self._lock:
            self.prompt_tokens += prompt or 0
            self.completion_tokens += completion or 0
        return ChatReply(text, data.get("model", self.model), prompt, completion)

    # ------------------------------------------------------------------ API
    def complete(self, messages: list[dict], temperature: float, max_tokens: int) -> ChatReply:
        """One chat completion (retried on transient errors)."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            self._throttle()
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read().decode("utf-8")
                try:
                    data = json.loads(raw)
                except json.JSONDecodeError:
                    raise ChatError(f"{self.url}: response is not JSON: {raw[:300]!r}") from None
                return self._parse(data)
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:500]
                if e.code in RETRY_STATUS:
                    last = f"HTTP {e.code}: {detail}"
                    print(f"{self.name}: {last.strip()} -- retry {attempt + 1}/{self.max_retries}", file=sys.stderr)
                    if attempt < self.max_retries:
                        self._wait(attempt, e.headers.get("Retry-After"))
                    continue
                if e.code in (401, 403):
                    raise ChatError(f"{self.name} {self.url} refused the credentials (HTTP {e.code}): "
                                    f"{detail.strip()} -- check --api-key / OPENAI_API_KEY") from None
                raise ChatError(f"{self.name} {self.url} rejected the request (HTTP {e.code}): {detail.strip()} "
                                f"(model {self.model!r})") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                print(f"{self.name}: {last} -- retry {attempt + 1}/{self.max_retries}", file=sys.stderr)
                if attempt < self.max_retries:
                    self._wait(attempt)
        raise ChatError(f"{self.name} {self.url}: giving up after {self.max_retries + 1} attempts ({last.strip()})")

    def chat(self, messages: list[dict], temperature: float, max_tokens: int) -> tuple[str, str]:
        """(reply content, model name reported by the server)."""
        reply = self.complete(messages, temperature, max_tokens)
        return reply.text, reply.model
