"""The Python floor: a bare raw-ASGI + aiohttp pass-through with no logic at all.

No auth, no admission, no metering: the request goes upstream as it came (minus hop-by-hop
headers) and every upstream body chunk is handed to `send` as it arrives. Run on the same stack as
the proxy (uvicorn, uvloop, httptools, one aiohttp session), it is what forwarding alone costs in
Python, so `proxy - bare` is what meterproxy's own work costs (issue #6's per-chunk target is
stated over exactly this).

    python bench/bare.py --port P --upstream http://127.0.0.1:SIM
"""

from __future__ import annotations

import argparse
import gc
from typing import Any

import aiohttp
import uvicorn

_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
                  b"host", b"content-length", b"proxy-connection"})


class Bare:
    """ASGI app: forward everything to `upstream`."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                        cookie_jar=aiohttp.DummyCookieJar(),
                        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"))
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    if self.session is not None:
                        await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in _HOP]
        url = self.upstream + scope["raw_path"].decode("latin-1")
        assert self.session is not None
        async with self.session.request(scope["method"], url, headers=headers, data=body or None,
                                        allow_redirects=False) as resp:
            out = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in _HOP]
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                async for chunk in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await send({"type": "http.response.body", "body": await resp.read(), "more_body": False})


def main() -> None:
    # The proxy's GC setting (meterproxy/app.py), so that proxy - bare is the proxy's own work.
    gc.set_threshold(10_000, 10, 10)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    a = p.parse_args()
    uvicorn.run(Bare(a.upstream), host="127.0.0.1", port=a.port, loop="uvloop", http="httptools",
                lifespan="on", access_log=False, log_level="warning", server_header=False,
                date_header=False, backlog=4096)


if __name__ == "__main__":
    main()
