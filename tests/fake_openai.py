"""A fake OpenAI-compatible chat server on 127.0.0.1 for tests (never the internet).

`FakeChatServer(respond)` answers POST .../chat/completions with `respond(body) -> (status, content)`
(content: the reply text for 200, the error message otherwise), records every request, reports
`usage` (`prompt_tokens`, `completion_tokens`) when set, and tracks the most requests in flight at once.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class FakeChatServer:
    def __init__(self, respond: Callable[[dict], tuple[int, str]], usage: tuple[int, int] | None = (100, 20),
                 delay: float = 0.0):
        self.respond, self.usage, self.delay = respond, usage, delay
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                            "body": body})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    status, content = server.respond(body)
                finally:
                    with lock:
                        server.in_flight -= 1
                if status == 200:
                    payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                            "finish_reason": "stop"}]}
                    if server.usage:
                        payload["usage"] = {"prompt_tokens": server.usage[0], "completion_tokens": server.usage[1],
                                            "total_tokens": sum(server.usage)}
                else:
                    payload = {"error": {"message": content, "type": "test"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def no_proxy(monkeypatch) -> None:
    """Make urllib talk to 127.0.0.1 directly whatever proxy the environment sets."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
