"""The transport's conformance suite: the client against real sockets, a scripted asyncio HTTP
server (tests/transport/scripted.py). Every scenario runs on both event loops (the proxy runs on uvloop; asyncio's
is the reference) and over each client factory in CLIENTS: a replacement client (a library behind
the same interface) is added there and must pass the same scenarios.
The server counts accepted connections, so keep-alive reuse is observed from the server's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from meterproxy.transport import Client, TLSFiles
from meterproxy.transport.connection import READ_HIGH_WATER
from meterproxy.transport.errors import BrokenStream, ConnectError, DNSError, Timeout
from tests.procs import free_port
from tests.transport.scripted import OK5, Handler, Reader, Request, Server, Writer, answer, get, request, wait_until

# --- framing ------------------------------------------------------------------------------------

def test_content_length_body_and_request_head(run: Any, new_client: Any) -> None:
    async def main() -> None:
        async with Server(answer(OK5)) as srv:
            client = new_client()
            hdrs = [("x-b", "1"), ("Authorization", "Bearer k"), ("x-a", "é")]
            resp, data = await get(client, srv.url + "/v1/chat?x=1", "POST", b'{"a":1}', headers=hdrs)
            assert (resp.status, data) == (200, b"hello")
            assert resp.header(b"content-type") == b"application/json"
            assert resp.header(b"content-length") == b"5" and resp.header(b"x-missing") is None
            req = srv.requests[0]
            # one head, exactly: request line, Host, the given headers in order, Content-Length
            assert req.head == (f"POST /v1/chat?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nx-b: 1\r\n"
                                "Authorization: Bearer k\r\nx-a: é\r\nContent-Length: 7\r\n\r\n").encode("latin-1")
            assert req.body == b'{"a":1}'
            # a GET without a body has no Content-Length; an empty body has Content-Length: 0
            await get(client, srv.url)
            await get(client, srv.url + "?q", "POST", b"")
            assert srv.requests[1].head == f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n\r\n".encode()
            assert srv.requests[2].target == "/?q" and ("Content-Length", "0") in srv.requests[2].headers
            await client.close()
    run(main())


def test_header_injection_refused(run: Any, new_client: Any) -> None:
    async def main() -> None:
        async with Server(answer(OK5)) as srv:
            client = new_client()
            for bad in ([("x", "a\r\nHost: evil")], [("x", "a\nb")], [("x\r", "a")]):
                with pytest.raises(ValueError):
                    await request(client, "GET", srv.url, bad, None, 5)
            assert srv.accepted == 0
            await client.close()
    run(main())


def test_chunked_body_arrives_piece_by_piece(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n")
        for i in range(5):
            piece = f"data: {i}\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(b"0\r\nx-trailer: t\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            resp = await request(client, "POST", srv.url + "/s", [], b"{}", 5)
            pieces = []
            while chunk := await resp.readany():
                pieces.append(chunk)
            resp.release()
            assert b"".join(pieces) == b"".join(f"data: {i}\n\n".encode() for i in range(5))
            assert len(pieces) >= 3  # handed out as they came, not at the end
            assert [k for k, _ in resp.raw_headers] == [b"Transfer-Encoding", b"Content-Type"]  # no trailer
            _, data = await get(client, srv.url)  # and the connection is reused after a chunked body
            assert data.startswith(b"data: 0") and srv.accepted == 1
            await client.close()
    run(main())


def test_close_delimited_body(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"the end")
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            _, data = await get(client, srv.url)
            assert data == b"until the end"
            _, data = await get(client, srv.url)  # a new connection: the last one ended the body
            assert data == b"until the end" and srv.accepted == 2
            await client.close()
    run(main())


def test_head_and_204_have_no_body(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        if req.method == "HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            resp, data = await get(client, srv.url, "HEAD")
            assert (resp.status, data, resp.header(b"content-length")) == (200, b"", b"1000")
            resp, data = await get(client, srv.url, "DELETE")
            assert (resp.status, data) == (204, b"")
            assert srv.accepted == 2  # a HEAD's connection is not reused
            resp, data = await get(client, srv.url, "DELETE")
            assert (resp.status, data) == (204, b"") and srv.accepted == 2  # a 204's is
            await client.close()
    run(main())


def test_informational_1xx_is_skipped(run: Any, new_client: Any) -> None:
    async def main() -> None:
        raw = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK5
        async with Server(answer(raw)) as srv:
            client = new_client()
            resp, data = await get(client, srv.url)
            assert (resp.status, data) == (200, b"hello")
            assert resp.header(b"link") is None
            await client.close()
    run(main())


def test_raw_headers_order_and_bytes(run: Any, new_client: Any) -> None:
    raw = (b"HTTP/1.1 200 OK\r\nX-B: 1\r\nx-a: two  words\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n"
           b"Content-Length: 2\r\nX-Bin: \xe9t\xe9\r\n\r\nok")

    async def main() -> None:
        async with Server(answer(raw)) as srv:
            client = new_client()
            resp, _ = await get(client, srv.url)
            assert resp.raw_headers == [(b"X-B", b"1"), (b"x-a", b"two  words"), (b"Set-Cookie", b"a=1"),
                                        (b"set-cookie", b"b=2"), (b"Content-Length", b"2"),
                                        (b"X-Bin", b"\xe9t\xe9")]
            assert resp.header(b"set-cookie") == b"a=1" and resp.header(b"x-b") == b"1"
            await client.close()
    run(main())


def test_malformed_response_is_a_broken_stream(run: Any, new_client: Any) -> None:
    async def main() -> None:
        async with Server(answer(b"SMTP ready\r\n\r\n")) as srv:
            client = new_client()
            with pytest.raises(BrokenStream) as info:
                await request(client, "GET", srv.url, [], None, 5)
            assert info.value.kind == "broken_stream"
            await client.close()
    run(main())


def test_endless_headers_are_refused(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        with contextlib.suppress(ConnectionError):
            for i in range(100_000):
                writer.write(b"x-h%d: %s\r\n" % (i, b"v" * 100))
                await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            with pytest.raises(BrokenStream, match="too large"):
                await request(client, "GET", srv.url, [], None, 10)
            await client.close()
    run(main())


# --- keep-alive ---------------------------------------------------------------------------------

def test_keepalive_reuses_one_connection(run: Any, new_client: Any) -> None:
    async def main() -> None:
        async with Server(answer(OK5)) as srv:
            client = new_client()
            for _ in range(5):
                _, data = await get(client, srv.url + "/x", "POST", b"{}")
                assert data == b"hello"
            assert srv.accepted == 1 and len(srv.requests) == 5
            # concurrent requests each get a connection, all kept for later
            await asyncio.gather(*(get(client, srv.url) for _ in range(4)))
            assert srv.accepted == 4
            await asyncio.gather(*(get(client, srv.url) for _ in range(4)))
            assert srv.accepted == 4
            await client.close()
    run(main())


def test_server_connection_close_is_honoured(run: Any, new_client: Any) -> None:
    raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"

    async def main() -> None:
        async with Server(answer(raw)) as srv:
            client = new_client()
            for _ in range(3):
                _, data = await get(client, srv.url)
                assert data == b"ok"
            assert srv.accepted == 3
            await client.close()
    run(main())


def test_server_closing_an_idle_connection(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        writer.write(OK5)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # the server's own idle timeout, short

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            await get(client, srv.url)
            await asyncio.sleep(0.3)
            pool = next(iter(client._pools.values()))
            assert not pool.idle and not pool.conns  # removed when asyncio reported it lost
            _, data = await get(client, srv.url)
            assert data == b"hello" and srv.accepted == 2
            await client.close()
    run(main())


def test_keepalive_race_retries_only_idempotent_requests(run: Any, new_client: Any) -> None:
    """The provider closes a kept-alive connection just as a request arrives on it (its idle timeout
    racing ours), reading nothing and answering nothing. A GET (a run poll) is sent once more on a
    new connection; a POST (an LLM call, maybe taken, costs money) fails with BrokenStream."""
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        if req.target == "/race":
            writer.transport.abort()  # the request's bytes were read; no answer at all
            return
        writer.write(OK5)
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            await get(client, srv.url + "/warm")                      # one kept-alive connection
            srv.handler = _race_once(handler)
            _, data = await get(client, srv.url + "/x")                # reused: raced, then retried
            assert data == b"hello" and srv.accepted == 2
            assert [r.target for r in srv.requests] == ["/warm", "/x", "/x"]
            srv.handler = _race_once(handler)
            with pytest.raises(BrokenStream):
                await get(client, srv.url + "/y", "POST", b"{}")
            assert [r.target for r in srv.requests][3:] == ["/y"]      # sent once, never again
            # A new connection that closes unanswered is not a keep-alive race: no retry.
            srv.handler = handler
            await client.close()
            client = new_client()
            n = len(srv.requests)
            with pytest.raises(BrokenStream):
                await get(client, srv.url + "/race")
            assert len(srv.requests) == n + 1
            await client.close()
    run(main())


def _race_once(handler: Handler) -> Handler:
    """The next request is answered by closing the connection; later ones by `handler`."""
    state = {"raced": False}

    async def racing(req: Request, reader: Reader, writer: Writer) -> None:
        if not state["raced"]:
            state["raced"] = True
            writer.transport.abort()
            return
        await handler(req, reader, writer)
    return racing


def test_closing_transport_is_never_picked(run: Any, new_client: Any) -> None:
    async def main() -> None:
        async with Server(answer(OK5)) as srv:
            client = new_client()
            await get(client, srv.url)
            pool = next(iter(client._pools.values()))
            pool.idle[0].transport.close()  # closing, connection_lost not delivered yet
            _, data = await get(client, srv.url)
            assert data == b"hello" and srv.accepted == 2
            await client.close()
    run(main())


def test_unsolicited_bytes_on_an_idle_connection(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        writer.write(OK5)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            await get(client, srv.url)
            await asyncio.sleep(0.2)
            resp, data = await get(client, srv.url)
            assert (resp.status, data) == (200, b"hello") and srv.accepted == 2
            await client.close()
    run(main())


def test_idle_connections_expire(run: Any, new_client: Any) -> None:
    async def main() -> None:
        async with Server(answer(OK5)) as srv:
            client = new_client(keepalive_s=0.2)
            await asyncio.gather(*(get(client, srv.url) for _ in range(3)))
            pool = next(iter(client._pools.values()))
            assert len(pool.idle) == 3
            await wait_until(lambda: srv.eofs == 3)
            assert not pool.idle and pool.sweeper is None
            await client.close()
    run(main())


# --- failures and timeouts ----------------------------------------------------------------------

def test_timeout_waiting_for_headers(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        await reader.read()  # never answers; returns at the client's EOF

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            t0 = time.monotonic()
            with pytest.raises(Timeout) as info:
                await request(client, "POST", srv.url, [], b"{}", 0.3)
            assert 0.25 < time.monotonic() - t0 < 1.0
            assert info.value.kind == "timeout"
            await asyncio.wait_for(srv.eof.wait(), 2)  # the connection was closed
            await client.close()
    run(main())


def test_timeout_mid_body(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            resp = await request(client, "GET", srv.url, [], None, 0.4)
            assert await resp.readany() == b"first"
            t0 = time.monotonic()
            with pytest.raises(Timeout):
                await resp.readany()
            assert time.monotonic() - t0 < 1.0
            resp.close()
            await asyncio.wait_for(srv.eof.wait(), 2)
            resp = await request(client, "GET", srv.url, [], None, 0.3)  # read() too
            with pytest.raises(Timeout):
                await resp.read()
            resp.close()
            await client.close()
    run(main())


def test_connect_refused(run: Any, new_client: Any) -> None:
    async def main() -> None:
        client = new_client(connect_timeout_s=2)
        with pytest.raises(ConnectError) as info:
            await request(client, "GET", f"http://127.0.0.1:{free_port()}/x", [], None, 5)
        # the error is the proxy's answer too: 502 upstream_unreachable, naming no host
        assert (info.value.kind, info.value.status, info.value.code) == ("connect", 502, "upstream_unreachable")
        assert "127.0.0.1" not in info.value.body().decode() and "127.0.0.1" in str(info.value)
        await client.close()
    run(main())


def test_dns_failure(run: Any, new_client: Any) -> None:
    async def main() -> None:
        client = new_client(connect_timeout_s=5)
        with pytest.raises(DNSError) as info:
            await request(client, "GET", "http://nonexistent.invalid/x", [], None, 5)
        assert info.value.kind == "dns"
        await client.close()
    run(main())


def test_connect_timeout(run: Any, new_client: Any) -> None:
    # A listening socket with a full accept queue: the SYN is never answered.
    async def main() -> None:
        hole, fillers = blackhole()
        port = hole.getsockname()[1]
        upstream = new_client(connect_timeout_s=0.3)
        t0 = time.monotonic()
        try:
            with pytest.raises(Timeout) as err:
                await request(upstream, "GET", f"http://127.0.0.1:{port}/", [], None, 5)
            assert time.monotonic() - t0 < 1.5
            assert (err.value.kind, err.value.status, err.value.code) == ("timeout", 504, "upstream_timeout")
        finally:
            await upstream.close()
            for s in [*fillers, hole]:
                s.close()
    run(main())


def blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full: a connect to it is never answered."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(hole.getsockname())
        fillers.append(s)
    return hole, fillers


def test_a_black_holed_address_does_not_use_up_the_connect_timeout(run: Any, new_client: Any) -> None:
    async def main() -> None:
        hole, fillers = blackhole()
        async with Server(answer(OK5)) as srv:
            client = new_client(connect_timeout_s=1.0)
            # a name resolving to a black hole first, then to the server (as an unroutable IPv6
            # address before a working IPv4 one would)
            client._dns[("example.test", 80)] = (time.monotonic() + 60, [
                (socket.AF_INET, socket.IPPROTO_TCP, "127.0.0.1", hole.getsockname()[1]),
                (socket.AF_INET, socket.IPPROTO_TCP, "127.0.0.1", srv.port)])
            t0 = time.monotonic()
            _, data = await get(client, "http://example.test/x")
            assert data == b"hello" and 0.4 < time.monotonic() - t0 < 0.9  # half the timeout each
            assert srv.requests[0].head.startswith(b"GET /x HTTP/1.1\r\nHost: example.test\r\n")
            await client.close()
        for s in [*fillers, hole]:
            s.close()
    run(main())


def test_server_breaks_mid_body(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            resp = await request(client, "GET", srv.url, [], None, 5)
            assert await resp.readany() == b"partial"
            with pytest.raises(BrokenStream) as info:
                await resp.readany()
            assert info.value.kind == "broken_stream"
            resp.close()
            resp = await request(client, "GET", srv.url, [], None, 5)
            with pytest.raises(BrokenStream):
                await resp.read()
            resp.close()
            assert srv.accepted == 2
            await client.close()
    run(main())


def test_server_closes_before_answering(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        writer.close()

    async def main() -> None:
        async with Server(handler) as srv:
            upstream = new_client()
            with pytest.raises(BrokenStream) as err:
                await request(upstream, "POST", srv.url, [], b"{}", 5)
            assert (err.value.kind, err.value.status) == ("broken_stream", 502)
            await upstream.close()
    run(main())


# --- the caller lets go -------------------------------------------------------------------------

def test_close_mid_body_closes_the_socket(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(200):
                writer.write(b"5\r\nchunk\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        await reader.read()

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            resp = await request(client, "GET", srv.url, [], None, 10)
            assert await resp.readany()
            t0 = time.monotonic()
            resp.close()
            await asyncio.wait_for(srv.eof.wait(), 1)
            assert time.monotonic() - t0 < 1
            with pytest.raises(BrokenStream):
                await resp.readany()
            await client.close()
    run(main())


def test_cancel_while_waiting_for_headers_closes_the_socket(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        await reader.read()

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            task = asyncio.ensure_future(request(client, "POST", srv.url, [], b"{}", 10))
            await wait_until(lambda: len(srv.requests) == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(srv.eof.wait(), 1)
            await client.close()
    run(main())


async def slow_reader_scenario(url: str, srv_ctx: ssl.SSLContext | None, client: Client,
                               tls: TLSFiles | None = None) -> None:
    """A 32 MB body (more than loopback socket buffers hold) read by a slow consumer: the client
    stops reading the socket past READ_HIGH_WATER, and TCP holds the server back."""
    size = 32 * 1024 * 1024
    finished = asyncio.Event()

    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = bytes(range(256)) * 256
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        finished.set()

    async with Server(handler, tls=srv_ctx) as srv:
        resp = await request(client, "GET", url.format(port=srv.port), [], None, 20, tls)
        got = len(await resp.readany())
        await asyncio.sleep(0.5)  # a slow consumer
        conn = resp._conn
        assert conn is not None and conn.paused
        assert resp._size <= READ_HIGH_WATER + 256 * 1024  # one socket read past the mark at most
        assert not finished.is_set()  # the server is held back by TCP, not buffered by us
        while chunk := await resp.readany():
            got += len(chunk)
            assert resp._size <= READ_HIGH_WATER + 256 * 1024
        assert got == size and finished.is_set()
        resp.release()
        await client.close()


def test_slow_reader_pauses_the_socket(run: Any, new_client: Any) -> None:
    async def main() -> None:
        await slow_reader_scenario("http://127.0.0.1:{port}/", None, new_client())
    run(main())


def test_large_request_body(run: Any, new_client: Any) -> None:
    async def handler(req: Request, reader: Reader, writer: Writer) -> None:
        digest = str(len(req.body)).encode() + b":" + req.body[-8:]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(digest), digest))
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            client = new_client()
            body = b"x" * (1024 * 1024 - 8) + b"the-tail"  # past the join limit: two buffers, one write
            _, data = await get(client, srv.url, "POST", body)
            assert data == b"1048576:the-tail"
            await client.close()
    run(main())


# --- TLS ----------------------------------------------------------------------------------------

def test_https_with_sni_and_verification(run: Any, new_client: Any, cert: tuple[Path, Path]) -> None:
    crt, key = cert
    seen: list[str | None] = []

    async def main() -> None:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(crt, key)
        server_ctx.sni_callback = lambda sock, name, ctx: seen.append(name)  # type: ignore[assignment,func-returns-value]
        async with Server(answer(OK5), tls=server_ctx) as srv:
            client = new_client()
            tls = TLSFiles(ca_file=str(crt))
            for _ in range(2):
                _, data = await get(client, f"https://localhost:{srv.port}/v1", tls=tls)
                assert data == b"hello"
            assert srv.accepted == 1 and seen == ["localhost"]
            assert srv.requests[0].head.startswith(f"GET /v1 HTTP/1.1\r\nHost: localhost:{srv.port}\r\n".encode())
            # an untrusted certificate is a connect error
            strict = new_client()
            with pytest.raises(ConnectError):
                await request(strict, "GET", f"https://localhost:{srv.port}/v1", [], None, 5)
            await strict.close()
            await client.close()
    run(main())


def test_https_slow_reader_pauses_the_socket(run: Any, new_client: Any, cert: tuple[Path, Path]) -> None:
    crt, key = cert

    async def main() -> None:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(crt, key)
        await slow_reader_scenario("https://localhost:{port}/", server_ctx, new_client(),
                                   TLSFiles(ca_file=str(crt)))
    run(main())
