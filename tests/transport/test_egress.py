"""Egress (HTTPS_PROXY / HTTP_PROXY / NO_PROXY through a CONNECT proxy this file runs), per-provider
TLS (a private CA, a client certificate the server requires) and the idle timeout."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meterproxy.config import ConfigError, parse_config
from meterproxy.transport import Origin, Proxies, TLSFiles, TransportError
from meterproxy.transport.errors import ConnectError, IdleTimeout
from tests.transport.pki import make_pki
from tests.transport.scripted import OK5, ConnectProxy, Reader, Request, Server, Writer, answer, get, request


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    yield make_pki(tmp_path_factory.mktemp("pki"))


def server_tls(pki: dict[str, Path], require_client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki["server.pem"], pki["server.key"])
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki["ca.pem"])
    return ctx


def mtls(pki: dict[str, Path]) -> TLSFiles:
    return TLSFiles(str(pki["ca.pem"]), str(pki["client.pem"]), str(pki["client.key"]))


# --- egress proxies -------------------------------------------------------------------------------

def test_https_through_connect_proxy_with_auth(run: Any, new_client: Any, pki: dict[str, Path]) -> None:
    async def main() -> None:
        async with Server(answer(OK5), tls=server_tls(pki, True)) as srv, ConnectProxy() as proxy:
            env = {"HTTPS_PROXY": f"http://user:p%40ss@127.0.0.1:{proxy.port}"}
            client = new_client(proxies=Proxies.from_env(env))
            for _ in range(2):
                resp, data = await get(client, f"https://localhost:{srv.port}/v1/x", tls=mtls(pki))
                assert (resp.status, data) == (200, b"hello")
            # one tunnel, kept alive; the proxy saw the host name only, and the Basic credential
            assert proxy.connects == [(f"CONNECT localhost:{srv.port}", "Basic dXNlcjpwQHNz")]
            assert srv.accepted == 1 and srv.requests[0].target == "/v1/x"
            await client.close()
    run(main())


def test_no_proxy_bypasses_the_proxy(run: Any, new_client: Any, pki: dict[str, Path]) -> None:
    async def main() -> None:
        async with Server(answer(OK5), tls=server_tls(pki, False)) as srv, ConnectProxy() as proxy:
            env = {"https_proxy": proxy.url, "NO_PROXY": "example.com,.localhost"}
            client = new_client(proxies=Proxies.from_env(env))
            _, data = await get(client, f"https://localhost:{srv.port}/", tls=TLSFiles(str(pki["ca.pem"])))
            assert data == b"hello" and proxy.connects == []
            await client.close()
    run(main())


def test_proxy_refusing_connect_is_a_connect_error(run: Any, new_client: Any, pki: dict[str, Path]) -> None:
    async def main() -> None:
        async with ConnectProxy(status=403) as proxy:
            client = new_client(proxies=Proxies.from_env({"HTTPS_PROXY": proxy.url}))
            with pytest.raises(ConnectError, match="refused CONNECT") as err:
                await request(client, "GET", "https://localhost:1/", [], None, 5)
            assert (err.value.kind, err.value.status, err.value.code) == ("connect", 502, "upstream_unreachable")
            await client.close()
    run(main())


def test_http_origin_through_http_proxy_uses_absolute_form(run: Any, new_client: Any) -> None:
    async def main() -> None:
        async with Server(answer(OK5)) as proxy:   # a forward proxy sees absolute-form targets
            client = new_client(proxies=Proxies.from_env({"HTTP_PROXY": f"http://u:p@127.0.0.1:{proxy.port}"}))
            _, data = await get(client, "http://provider.test:8080/v1/chat?q=1")
            assert data == b"hello"
            req: Request = proxy.requests[0]
            assert req.target == "http://provider.test:8080/v1/chat?q=1"
            assert ("Host", "provider.test:8080") in req.headers
            assert ("Proxy-Authorization", "Basic dTpw") in req.headers
            await client.close()
    run(main())


def test_proxies_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("https_proxy", "http_proxy", "no_proxy", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "internal.corp, 10.0.0.7:8443")
    proxies = Proxies.from_env()
    assert proxies.for_origin(Origin.parse("https://api.openai.com")) == proxies.https
    assert proxies.https is not None and (proxies.https.host, proxies.https.port) == ("proxy.corp", 3128)
    assert proxies.for_origin(Origin.parse("https://llm.internal.corp")) is None
    assert proxies.for_origin(Origin.parse("https://10.0.0.7:8443")) is None
    assert proxies.for_origin(Origin.parse("https://10.0.0.7")) is not None  # another port
    assert proxies.for_origin(Origin.parse("http://api.openai.com")) is None  # no HTTP_PROXY
    monkeypatch.setenv("NO_PROXY", "*")
    assert Proxies.from_env().for_origin(Origin.parse("https://api.openai.com")) is None
    with pytest.raises(ValueError, match="only http://"):
        Proxies.from_env({"HTTPS_PROXY": "socks5://proxy:1080"})


# --- per-provider TLS ----------------------------------------------------------------------------

def test_client_certificate_required_by_the_provider(run: Any, new_client: Any, pki: dict[str, Path]) -> None:
    async def main() -> None:
        async with Server(answer(OK5), tls=server_tls(pki, True)) as srv:
            client = new_client()
            _, data = await get(client, f"https://localhost:{srv.port}/", tls=mtls(pki))
            assert data == b"hello"
            # trusted CA but no client certificate: the server refuses the handshake
            with pytest.raises(TransportError) as err:
                await get(client, f"https://localhost:{srv.port}/", tls=TLSFiles(str(pki["ca.pem"])))
            assert err.value.status == 502
            # the private CA is trusted only where configured
            with pytest.raises(ConnectError):
                await get(client, f"https://localhost:{srv.port}/", tls=TLSFiles())
            await client.close()
    run(main())


def _provider_yaml(extra: str) -> str:
    return f"""
providers:
  p:
    base_url: https://localhost:9
    paths: ["/v1/"]
{extra}
keys: []
"""


def test_tls_files_are_checked_at_config_load(pki: dict[str, Path], tmp_path: Path) -> None:
    cfg = parse_config(_provider_yaml(
        f"    ca_file: {pki['ca.pem']}\n"
        f"    client_cert: {{cert: {pki['client.pem']}, key: {pki['client.key']}}}"))
    origin = cfg.routes[0][1].origin
    assert origin.tls is not None and (origin.host, origin.port) == ("localhost", 9)
    assert (origin.tls.ca_file, origin.tls.cert, origin.tls.key) == (str(pki["ca.pem"]), str(pki["client.pem"]),
                                                                     str(pki["client.key"]))
    with pytest.raises(ConfigError) as err:
        parse_config(_provider_yaml(f"    ca_file: {tmp_path / 'missing.pem'}"))
    assert str(err.value).endswith(f"providers.p: ca_file: no such file {tmp_path / 'missing.pem'}")
    with pytest.raises(ConfigError, match=r"ca_file / client_cert: .*KEY_VALUES_MISMATCH"):  # another cert's key
        parse_config(_provider_yaml(
            f"    client_cert: {{cert: {pki['client.pem']}, key: {pki['server.key']}}}"))
    with pytest.raises(ConfigError, match="need an https:// base_url"):
        parse_config(_provider_yaml(f"    ca_file: {pki['ca.pem']}").replace("https://", "http://"))


# --- idle timeout --------------------------------------------------------------------------------

def test_idle_timeout_cuts_a_stalled_stream(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):  # bytes every 0.1 s keep an idle timeout of 0.3 s from firing
            writer.write(b"2\r\nab\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
        await asyncio.sleep(5)  # then a stall

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            resp = await request(client, "GET", srv.url, [], None, 10, idle_s=0.3)
            got = b""
            with pytest.raises(IdleTimeout) as err:
                while chunk := await resp.readany():
                    got += chunk
            assert got == b"ab" * 5
            assert (err.value.kind, err.value.status, err.value.code) == ("idle_timeout", 504, "upstream_timeout")
            resp.close()
            await client.close()
    run(main())


def test_idle_timeout_before_headers_is_a_504(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        await asyncio.sleep(5)

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(IdleTimeout) as err:
                await request(client, "POST", srv.url, [], b"{}", 10, idle_s=0.3)
            assert 0.25 < loop.time() - t0 < 2 and err.value.status == 504
            await client.close()
    run(main())


def test_a_certificate_rotated_in_place_takes_effect_on_reload(pki: dict[str, Path], tmp_path: Path) -> None:
    """The origin (the client's pool and TLS context key) changes when a file changed since the
    last load, and only then: a reload (SIGHUP) after a rotation connects with the new files."""
    for name in ("client.pem", "client.key"):
        (tmp_path / name).write_bytes(pki[name].read_bytes())
    text = _provider_yaml(f"    client_cert: {{cert: {tmp_path / 'client.pem'}, key: {tmp_path / 'client.key'}}}")
    first = parse_config(text).routes[0][1].origin
    assert parse_config(text).routes[0][1].origin == first
    os.utime(tmp_path / "client.pem", ns=(1, 1))  # a rotated file: another modification time
    assert parse_config(text).routes[0][1].origin != first
