"""Pure units: reset formatting, header hygiene, key extraction."""

from __future__ import annotations

import pytest

from meterproxy.auth import key_hash, presented_key
from meterproxy.config import Provider
from meterproxy.errors import AuthError
from meterproxy.headers import client_request_id, fmt_reset, response_headers, upstream_headers
from meterproxy.transport import Origin

PROV = Provider(name="p", origin=Origin.parse("http://h"), auth_header=b"authorization", auth_value=b"Bearer S",
                stream_by_default=False, poll_prefix=None, poll_suffix="", runs_ttl_s=1.0)


@pytest.mark.parametrize(("secs", "text"), [(0, "0s"), (0.02, "20ms"), (1, "1s"), (1.2, "2s"),
                                            (360, "6m0s"), (3723, "1h2m3s")])
def test_fmt_reset(secs: float, text: str) -> None:
    assert fmt_reset(secs) == text


def test_presented_key_rules() -> None:
    assert presented_key([(b"authorization", b"Bearer k1")]) == "k1"
    assert presented_key([(b"x-api-key", b"k1")]) == "k1"
    assert presented_key([(b"authorization", b"Bearer k1"), (b"x-api-key", b"k1")]) == "k1"
    assert presented_key([]) is None
    with pytest.raises(AuthError):
        presented_key([(b"authorization", b"Bearer k1"), (b"x-api-key", b"k2")])
    with pytest.raises(AuthError):
        presented_key([(b"authorization", b"Bearer k1"), (b"authorization", b"Bearer k2")])
    with pytest.raises(AuthError):
        presented_key([(b"authorization", b"Basic abc")])
    assert len(key_hash("k1")) == 64
    # Gemini's SDK sends its key as x-goog-api-key (SPEC: client keys).
    assert presented_key([(b"x-goog-api-key", b"k1")]) == "k1"
    with pytest.raises(AuthError):
        presented_key([(b"x-goog-api-key", b"k1"), (b"x-api-key", b"k2")])


def test_upstream_headers_hygiene() -> None:
    hdrs = [(b"host", b"proxy"), (b"authorization", b"Bearer client"), (b"x-api-key", b"client"),
            (b"x-goog-api-key", b"client"),
            (b"connection", b"keep-alive, x-secret-hop"), (b"x-secret-hop", b"1"), (b"te", b"trailers"),
            (b"content-length", b"10"), (b"x-forwarded-for", b"1.2.3.4"), (b"x-keep", b"yes"),
            (b"x-meterproxy-tags", b"env=prod")]   # the proxy's own headers never go upstream
    out = dict(upstream_headers(hdrs, PROV, "127.0.0.1", "rid", False))
    assert out == {b"x-keep": b"yes", b"x-forwarded-for": b"1.2.3.4, 127.0.0.1", b"x-request-id": b"rid",
                   b"authorization": b"Bearer S"}


def test_response_headers_drop_hop_and_provider_ratelimits() -> None:
    raw = [(b"Content-Type", b"application/json"), (b"Transfer-Encoding", b"chunked"),
           (b"X-RateLimit-Limit-Requests", b"9999"), (b"Content-Length", b"5"), (b"x-other", b"1")]
    assert response_headers(raw, drop_length=False) == [
        (b"content-type", b"application/json"), (b"content-length", b"5"), (b"x-other", b"1")]
    assert (b"content-length", b"5") not in response_headers(raw, drop_length=True)


def test_client_request_id_sanity() -> None:
    assert client_request_id([(b"x-request-id", b"abc-1")]) == "abc-1"
    assert client_request_id([(b"x-request-id", b"bad id\r\n")]) is None
    assert client_request_id([(b"x-request-id", b"x" * 200)]) is None
