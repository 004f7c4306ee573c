"""SPEC "Read-your-writes": a client that sends its requests one after another is never refused
for its own previous request. A real proxy process, the openai SDK as the client, the in-process
and the Redis limiter, streamed and not.

The key allows one request at a time and a tokens-per-minute capacity that holds one reservation
plus the real usage of all 120 requests, but not two reservations: had the previous request's
lease or reservation still stood when the next one came, the next would get 429 concurrency or
tokens. The provider here is scripted (a thread in this process) so that a stream's last event
([DONE]) and the end of its body arrive apart, as they do over a real network: the SDK acts on
[DONE] (it closes the response and sends the next request) while the proxy still waits for the
body's end, which is where a settlement after the last byte lost the race (issue #12).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

from tests.e2e.cluster import KEYS, make_config, proxy, write_config

N = 120
MODEL = "gpt-5.4"
MAX_TOKENS = 8000
USAGE = {"prompt_tokens": 14, "completion_tokens": 3, "total_tokens": 17}
SLACK = 4000  # > N x USAGE's tokens; < one reservation
END_DELAY_S = 0.02  # between a stream's [DONE] and the end of its body


class _Provider(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        base = {"id": "chatcmpl-1", "created": 1, "model": MODEL}
        if not body.get("stream"):
            data = json.dumps({**base, "object": "chat.completion", "usage": USAGE, "choices": [
                {"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Rivers shape stones."}}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [
            {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Rivers"}}]},
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**chunk, "choices": [], "usage": USAGE},
        ]
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for data in [*(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events), b"data: [DONE]\n\n"]:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        time.sleep(END_DELAY_S)
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture(scope="module")
def provider_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Provider)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_sequential_requests_are_never_refused(provider_port: int, store_url: str | None,
                                               tmp_path: Path, stream: bool) -> None:
    messages = [{"role": "user", "content": "Tell me about rivers and stones."}]
    # the SDK's body, byte for byte as it sends it, for request.reservation()
    body = json.dumps({"messages": messages, "model": MODEL, "max_tokens": MAX_TOKENS,
                       **({"stream": True} if stream else {})}).encode()
    reserved = (len(body) + 3) // 4 + MAX_TOKENS
    limits = {"concurrency": 1, "tpm": reserved + SLACK}
    cfg = make_config(provider_port, store_url=store_url, keys={"alice-1": {"limits": limits}},
                      store={"timeout_ms": 2000})
    with proxy(write_config(tmp_path / "c.yaml", cfg)) as px:
        client = openai.OpenAI(base_url=f"{px.base}/v1", api_key=KEYS["alice-1"][1], max_retries=0)
        for i in range(N):
            try:
                if stream:
                    chunks = list(client.chat.completions.create(
                        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, stream=True))  # type: ignore[arg-type]
                    assert chunks[0].choices[0].delta.content == "Rivers"
                else:
                    r = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                                       max_tokens=MAX_TOKENS)
                    assert r.usage is not None and r.usage.total_tokens == USAGE["total_tokens"]
            except openai.RateLimitError as exc:
                pytest.fail(f"request {i + 1} of {N} refused: {exc}")
