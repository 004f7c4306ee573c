"""SPEC "Read-your-writes": a client that sends its requests one after another is never refused
for its own previous request. Real proxy and simulator processes, the openai SDK as the client,
the in-process and the Redis limiter, streamed and not.

The key allows one request at a time and a tokens-per-minute capacity that holds one reservation
plus the real usage of all 120 requests, but not two reservations: had the previous request's
lease or reservation still stood when the next one came (a settlement after the last byte), the
next would get 429 concurrency or tokens (issue #12 reproduced it on the second request).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.cluster import KEYS, make_config, proxy, write_config
from tests.procs import Proc, simulator

N = 120
MODEL = "gpt-5.4"
MAX_TOKENS = 8000
SLACK = 5000  # > N x the ~33 tokens each request really uses; < one reservation


@pytest.fixture(scope="module")
def sim() -> Iterator[Proc]:
    with simulator() as s:
        yield s


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_sequential_requests_are_never_refused(sim: Proc, store_url: str | None, tmp_path: Path,
                                               stream: bool) -> None:
    messages = [{"role": "user", "content": "Tell me about rivers and stones."}]
    body = json.dumps({"messages": messages, "model": MODEL, "max_tokens": MAX_TOKENS,
                       "stream": stream}, separators=(",", ":")).encode()
    reserved = (len(body) + 3) // 4 + MAX_TOKENS  # request.reservation(), an upper bound here
    limits = {"concurrency": 1, "tpm": reserved + SLACK}
    cfg = make_config(sim.port, store_url=store_url, keys={"alice-1": {"limits": limits}},
                      store={"timeout_ms": 2000})
    with proxy(write_config(tmp_path / "c.yaml", cfg)) as px:
        client = openai.OpenAI(base_url=f"{px.base}/v1", api_key=KEYS["alice-1"][1], max_retries=0,
                               default_headers={"x-sim-chunks": "3"})
        for i in range(N):
            try:
                if stream:
                    chunks = list(client.chat.completions.create(
                        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, stream=True))  # type: ignore[arg-type]
                    assert chunks
                else:
                    r = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                                       max_tokens=MAX_TOKENS)
                    assert r.usage is not None and r.usage.total_tokens * N < SLACK
            except openai.RateLimitError as exc:
                pytest.fail(f"request {i + 1} of {N} refused: {exc}")
