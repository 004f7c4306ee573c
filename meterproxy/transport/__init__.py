"""The upstream hop: a lean HTTP/1.1 client built for exactly what the proxy needs.

Not httpx (issue #2: ~1 ms CPU per request at concurrency 32) and no longer aiohttp (its client
was the largest single cost in the proxy's profile): one write per request on a pooled keep-alive
connection, the answer parsed with httptools inside the loop's read callback.

    origin.py      Origin, TLSFiles: a provider's scheme/host/port/TLS, resolved at config load
    pool.py        Client (one per process, made in the lifespan) and one Pool per origin
    connection.py  Connection (asyncio.Protocol + httptools) and the Response it reads
    proxy.py       HTTPS_PROXY / HTTP_PROXY / NO_PROXY, and the CONNECT handshake
    errors.py      TransportError classes (each a 502/504 ProxyError with its metric kind) and
                   the one table (EXC_MAP) that maps foreign exceptions to them

What it supports and what it does not: README.md beside this file.
"""

from meterproxy.transport.connection import Response
from meterproxy.transport.errors import TransportError
from meterproxy.transport.origin import Origin, TLSFiles
from meterproxy.transport.pool import Client
from meterproxy.transport.proxy import Proxies

__all__ = ["Client", "Origin", "Proxies", "Response", "TLSFiles", "TransportError"]
