"""Issue #14, hostile clients on the wire: raw sockets against a real `meterproxy serve`.

Slowloris on the head and on the body is cut within the configured time (408, closed); oversized
heads are refused (431) without anything reaching the provider; a chunked trailer never
authenticates nor reaches the provider; 16 concurrent unauthenticated 32 MiB heads leave the
proxy's RSS almost where it was; a legitimate slow stream download outlives every timeout.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.cluster import KEYS, PROVIDER_SECRETS, make_config, proxy, write_config
from tests.procs import Proc, simulator

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
ALICE = KEYS["alice-1"][1]
BODY = b'{"model": "gpt-5.4", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc, httpx.Client]]:
    server = {"header_timeout_s": HEADER_TIMEOUT, "body_read_timeout_s": BODY_TIMEOUT,
              "keep_alive_timeout_s": 2.0, "max_header_bytes": 65536, "max_headers": 100,
              "max_connections": 64}
    with simulator() as sim:
        cfg = make_config(sim.port, server=server)
        with proxy(write_config(tmp_path_factory.mktemp("limits") / "c.yaml", cfg)) as px, \
                httpx.Client(timeout=30) as client:
            yield sim, px, client
            assert px.proc.poll() is None
            assert "Traceback" not in px.output(), px.output()[-3000:]


def _sim_requests(client: httpx.Client, sim: Proc) -> int:
    n: int = client.get(f"{sim.base}/_sim/stats").json()["requests"]
    return n


def _connect(px: Proc) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", px.port), timeout=10)
    return s


def _read_all(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until the proxy closes the connection (fails the test if it does not)."""
    s.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def _error_code(data: bytes) -> str:
    code: str = json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"]
    return code


def _head(path: str = "/v1/chat/completions", extra: bytes = b"", length: int = len(BODY)) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {ALICE}\r\nContent-Length: {length}\r\n").encode() + extra + b"\r\n"


def test_silent_connection_is_closed(target: tuple[Proc, Proc, httpx.Client]) -> None:
    _sim, px, _client = target
    with _connect(px) as s:
        t0 = time.monotonic()
        data = _read_all(s)
        took = time.monotonic() - t0
    assert HEADER_TIMEOUT * 0.8 <= took < HEADER_TIMEOUT + 3, took
    assert _status(data) == 408 and _error_code(data) == "request_timeout"


def test_slowloris_head_is_cut(target: tuple[Proc, Proc, httpx.Client]) -> None:
    """A client trickling its head (one byte every 0.1 s, forever) is cut at header_timeout_s,
    however steadily it sends."""
    sim, px, client = target
    before = _sim_requests(client, sim)
    head = _head()
    with _connect(px) as s:
        t0 = time.monotonic()
        closed = False
        for i in range(len(head) - 2):   # never completes the head
            try:
                s.sendall(head[i:i + 1])
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - t0 > HEADER_TIMEOUT + 3:
                break
        data = _read_all(s)
        took = time.monotonic() - t0
    assert closed or took < HEADER_TIMEOUT + 3
    assert _status(data) == 408, data[:200]
    assert _sim_requests(client, sim) == before


def test_slowloris_body_is_cut(target: tuple[Proc, Proc, httpx.Client]) -> None:
    """The head whole, then the body stalls: 408 after body_read_timeout_s, nothing forwarded."""
    sim, px, client = target
    before = _sim_requests(client, sim)
    with _connect(px) as s:
        s.sendall(_head() + BODY[:10])
        t0 = time.monotonic()
        data = _read_all(s)
        took = time.monotonic() - t0
    assert BODY_TIMEOUT * 0.8 <= took < BODY_TIMEOUT + 3, took
    assert _status(data) == 408 and _error_code(data) == "request_timeout", data[:300]
    assert _sim_requests(client, sim) == before


def test_trickled_body_is_not_cut_while_it_flows(target: tuple[Proc, Proc, httpx.Client]) -> None:
    """The timeout is per read: a body sent in pieces 0.35 s apart (under the 1 s limit), longer
    than the limit in all, is served."""
    _sim, px, _client = target
    with _connect(px) as s:
        s.sendall(_head())
        for i in range(0, len(BODY), len(BODY) // 4 + 1):
            time.sleep(BODY_TIMEOUT * 0.35)
            s.sendall(BODY[i:i + len(BODY) // 4 + 1])
        s.settimeout(10)
        first = s.recv(65536)
    assert _status(first) == 200, first[:300]


def test_one_mib_of_headers_is_refused_unforwarded(target: tuple[Proc, Proc, httpx.Client]) -> None:
    sim, px, client = target
    before = _sim_requests(client, sim)
    with _connect(px) as s:
        with contextlib.suppress(OSError):   # closed under us once refused
            s.sendall(_head(extra=b"x-big: " + b"a" * (1 << 20) + b"\r\n") + BODY)
        data = _read_all(s)
    assert _status(data) == 431 and _error_code(data) == "request_header_fields_too_large", data[:300]
    assert _sim_requests(client, sim) == before


@pytest.mark.parametrize("extra", [
    b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 800) for i in range(90)),      # 72 KB over many fields
    b"".join(b"x-h%d: v\r\n" % i for i in range(101)),                    # too many fields
])
def test_large_or_many_headers_in_one_read_are_refused(target: tuple[Proc, Proc, httpx.Client],
                                                       extra: bytes) -> None:
    sim, px, client = target
    before = _sim_requests(client, sim)
    with _connect(px) as s:
        s.sendall(_head(extra=extra) + BODY)
        data = _read_all(s)
    assert _status(data) == 431, data[:300]
    assert _sim_requests(client, sim) == before


def test_ordinary_headers_pass(target: tuple[Proc, Proc, httpx.Client]) -> None:
    """Just under both limits: served."""
    _sim, px, _client = target
    extra = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 500) for i in range(90))
    with _connect(px) as s:
        s.sendall(_head(extra=extra + b"Connection: close\r\n") + BODY)
        data = _read_all(s)
    assert _status(data) == 200, data[:300]


def _chunked(trailer: bytes, auth: bool) -> bytes:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n")
    if auth:
        head += f"Authorization: Bearer {ALICE}\r\n".encode()
    return head + b"\r\n" + b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n" + trailer + b"\r\n"


def test_trailer_never_authenticates(target: tuple[Proc, Proc, httpx.Client]) -> None:
    sim, px, client = target
    before = _sim_requests(client, sim)
    with _connect(px) as s:
        s.sendall(_chunked(f"Authorization: Bearer {ALICE}\r\nx-api-key: {ALICE}\r\n".encode(), auth=False))
        data = _read_all(s)
    assert _status(data) == 401, data[:300]
    assert _sim_requests(client, sim) == before


def test_trailer_never_reaches_the_provider(target: tuple[Proc, Proc, httpx.Client]) -> None:
    sim, px, client = target
    with _connect(px) as s:
        s.sendall(_chunked(b"x-trailer-smuggled: 1\r\nx-sim-status: 500\r\n", auth=True))
        data = _read_all(s)
    assert _status(data) == 200, data[:300]
    seen = client.get(f"{sim.base}/_sim/last_request").json()
    assert "x-trailer-smuggled" not in seen["headers"] and "x-sim-status" not in seen["headers"]
    assert seen["headers"]["authorization"] == f"Bearer {PROVIDER_SECRETS[0]}"


def test_huge_trailer_is_refused(target: tuple[Proc, Proc, httpx.Client]) -> None:
    """A trailer field is bounded like the head (the parser would hold it whole otherwise)."""
    sim, px, client = target
    before = _sim_requests(client, sim)
    with _connect(px) as s:
        with contextlib.suppress(OSError):
            s.sendall(_chunked(b"x-t: " + b"a" * (4 << 20) + b"\r\n", auth=True))
        data = _read_all(s)
    # The application may already have answered (the body was complete before the trailer):
    # then the connection is just closed; it never waits for the rest of a 4 MiB trailer.
    assert _status(data) in (200, 431), data[:300]
    assert _sim_requests(client, sim) - before <= 1


def test_slow_stream_download_outlives_the_timeouts(target: tuple[Proc, Proc, httpx.Client]) -> None:
    """A stream whose chunks come 0.6 s apart for ~3 s (longer than every client timeout above
    together) arrives whole, over a keep-alive connection that then serves another request."""
    _sim, px, _client = target
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", f"{px.base}/v1/chat/completions",
                      headers={"Authorization": f"Bearer {ALICE}", "x-sim-chunk-delay-ms": "600",
                               "x-sim-chunks": "5"},
                      json={"model": "gpt-5.4", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as r:
            t0 = time.monotonic()
            text = "".join(r.iter_text())
            took = time.monotonic() - t0
        assert r.status_code == 200
        assert took > HEADER_TIMEOUT + BODY_TIMEOUT, took
        assert text.rstrip().endswith("data: [DONE]"), text[-200:]
        again = c.post(f"{px.base}/v1/chat/completions", headers={"Authorization": f"Bearer {ALICE}"},
                       json={"model": "gpt-5.4", "messages": [{"role": "user", "content": "hi"}]})
        assert again.status_code == 200


def test_idle_keep_alive_is_closed(target: tuple[Proc, Proc, httpx.Client]) -> None:
    _sim, px, _client = target
    with _connect(px) as s:
        s.sendall(_head() + BODY)
        s.settimeout(10)
        first = s.recv(65536)
        assert _status(first) == 200
        t0 = time.monotonic()
        rest = _read_all(s)
        took = time.monotonic() - t0
    assert 1.0 <= took < 5.0, took      # keep_alive_timeout_s: 2
    assert _status(rest) == 0


def test_connection_limit_answers_503(tmp_path: Path) -> None:
    """Beyond max_connections a request gets a JSON 503 `server_overloaded` and the connection
    closes; below it, requests pass again."""
    with simulator() as sim:
        cfg = make_config(sim.port, server={"max_connections": 4, "header_timeout_s": 30})
        with proxy(write_config(tmp_path / "c.yaml", cfg)) as px:
            held = [_connect(px) for _ in range(4)]
            time.sleep(0.3)
            try:
                with _connect(px) as s:
                    s.sendall(_head(extra=b"Connection: close\r\n") + BODY)
                    data = _read_all(s)
                assert _status(data) == 503 and _error_code(data) == "server_overloaded", data[:300]
                assert b"retry-after: 1" in data.lower()
            finally:
                for h in held:
                    h.close()
            time.sleep(0.3)
            r = httpx.post(f"{px.base}/v1/chat/completions", headers={"Authorization": f"Bearer {ALICE}"},
                           json={"model": "gpt-5.4", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200


def test_big_unauthenticated_heads_keep_rss_flat(target: tuple[Proc, Proc, httpx.Client]) -> None:
    """16 concurrent 32 MiB heads without a key: the proxy's RSS grows by less than 50 MB (it was
    ~128 MB for 4 of them before: the parser held every head whole)."""
    sim, px, client = target
    before_fwd = _sim_requests(client, sim)
    proc = psutil.Process(px.proc.pid)
    rss0 = proc.memory_info().rss
    peak = rss0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.01)

    statuses: list[int] = []
    chunk = b"a" * (1 << 20)

    def attack() -> None:
        with _connect(px) as s:
            try:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-big: ")
                for _ in range(32):
                    s.sendall(chunk)
                s.sendall(b"\r\n\r\n")
            except OSError:
                pass
            statuses.append(_status(_read_all(s)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=attack) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    sampler.join()
    growth = (peak - rss0) / 1e6
    assert growth < 50, f"RSS grew by {growth:.1f} MB"
    assert statuses.count(431) >= 1 and set(statuses) <= {0, 431}, statuses
    assert _sim_requests(client, sim) == before_fwd


def test_limits_apply_in_every_worker(tmp_path: Path) -> None:
    """`--workers N` builds its workers from the same server config: a big head is 431 there too."""
    with simulator() as sim:
        cfg = make_config(sim.port, server={"max_header_bytes": 4096})
        with proxy(write_config(tmp_path / "c.yaml", cfg), workers=2) as px:
            for _ in range(4):      # whichever worker accepts
                with _connect(px) as s:
                    s.sendall(_head(extra=b"x-big: " + b"a" * 8192 + b"\r\n") + BODY)
                    data = _read_all(s)
                assert _status(data) == 431, data[:300]
            r = httpx.post(f"{px.base}/v1/chat/completions", headers={"Authorization": f"Bearer {ALICE}"},
                           json={"model": "gpt-5.4", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /v1/\xff HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_unparseable_requests_get_a_json_400(target: tuple[Proc, Proc, httpx.Client], request_bytes: bytes) -> None:
    _sim, px, _client = target
    with _connect(px) as s:
        s.sendall(request_bytes)
        data = _read_all(s)
    assert _status(data) == 400 and _error_code(data) == "invalid_request", data[:300]


def test_head_under_the_limit_sent_in_pieces_passes(target: tuple[Proc, Proc, httpx.Client]) -> None:
    """48 KB of headers (under 64 KiB) arriving in 4 KB reads is served: the bytes of reads inside
    the head and the fields completed by them are not added up twice."""
    _sim, px, _client = target
    extra = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 990) for i in range(48))
    request = _head(extra=extra + b"Connection: close\r\n") + BODY
    with _connect(px) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(request), 4096):
            s.sendall(request[i:i + 4096])
            time.sleep(0.02)
        data = _read_all(s)
    assert _status(data) == 200, data[:300]
