"""SPEC "Egress" end to end: a real `meterproxy serve` process with HTTPS_PROXY in its environment
reaches an https provider that requires a client certificate from a private CA (the provider's
`ca_file` and `client_cert` in the config) through a CONNECT proxy; the openai SDK is the client."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

from tests.e2e.cluster import KEYS, make_config, proxy, write_config
from tests.transport.pki import make_pki
from tests.transport.scripted import ConnectProxy

USAGE = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}


class _Provider(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # http.server's name
        self.rfile.read(int(self.headers["content-length"]))
        data = json.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-5.4",
                           "usage": USAGE, "choices": [{"index": 0, "finish_reason": "stop",
                                                        "message": {"role": "assistant", "content": "hi"}}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture()
def mtls_provider(pki: dict[str, Path]) -> Iterator[int]:
    """An https provider on localhost that refuses clients without a certificate from the CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki["server.pem"], pki["server.key"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(pki["ca.pem"])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Provider)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def connect_proxy() -> Iterator[ConnectProxy]:
    """The CONNECT proxy of tests/transport, on its own event loop in a thread."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    cp = ConnectProxy()
    stop = asyncio.Event()

    async def main() -> None:
        async with cp:
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield cp
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()


def _config(tmp_path: Path, port: int, pki: dict[str, Path], client_cert: bool) -> Path:
    cfg = make_config(port)
    sim = cfg["providers"]["sim"]
    sim["base_url"] = f"https://localhost:{port}"
    sim["ca_file"] = str(pki["ca.pem"])
    if client_cert:
        sim["client_cert"] = {"cert": str(pki["client.pem"]), "key": str(pki["client.key"])}
    return write_config(tmp_path / "c.yaml", cfg)


def _sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEYS["alice-1"][1], max_retries=0)


def test_provider_with_mtls_through_an_egress_proxy(tmp_path: Path, pki: dict[str, Path],
                                                    mtls_provider: int, connect_proxy: ConnectProxy) -> None:
    env = {"HTTPS_PROXY": connect_proxy.url, "NO_PROXY": "example.com"}
    with proxy(_config(tmp_path, mtls_provider, pki, client_cert=True), env=env) as px:
        r = _sdk(px.base).chat.completions.create(model="gpt-5.4", messages=[{"role": "user", "content": "hi"}])
        assert r.usage is not None and r.usage.total_tokens == USAGE["total_tokens"]
    assert connect_proxy.connects == [(f"CONNECT localhost:{mtls_provider}", None)]


def test_without_the_client_certificate_the_provider_is_unreachable(
        tmp_path: Path, pki: dict[str, Path], mtls_provider: int) -> None:
    with proxy(_config(tmp_path, mtls_provider, pki, client_cert=False)) as px:
        with pytest.raises(openai.APIStatusError) as err:
            _sdk(px.base).chat.completions.create(model="gpt-5.4", messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 502
        assert err.value.code == "upstream_unreachable"
