"""What a request body says, read so that the proxy and the provider can never read it differently.

Every JSON object body under a provider path is parsed (not only the metered ones): it names the
model the key's allowlist is checked against (issue #14: images, audio, fine-tuning and moderation
bodies reached the provider with a forbidden model). A body is refused (400) when a reader could
take another value from it than the proxy does: a top-level key the proxy reads written twice
(orjson keeps the last, some providers the first), or nesting that could not be re-serialised. Multipart forms (audio
transcriptions) are read for their `model` field.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from meterproxy.errors import InvalidJSON, InvalidRequest

MAX_MODEL_CHARS = 256   # longer model ids are refused: they are stored on records and aggregates

# The escapes that spell a printable ASCII character another way (a \u escape, "mod\u0065l", or
# "\/"), so that a byte search for a key misses it. Ordinary encoders use neither for keys.
_ESCAPED_ASCII = re.compile(rb"\\u00[2-7][0-9a-fA-F]|\\/")
_WS = b" \t\r\n"
# The top-level members the proxy reads from a body (model, stream, the max-output fields, n, ...):
# the ones a repeat would let the proxy and the provider read differently. Counted wherever they
# appear (a nested or quoted one only costs the exact check).
_READ_KEYS = re.compile(
    rb'"(?:model|stream|stream_options|n|max_tokens|max_completion_tokens|max_output_tokens|async|'
    rb'generationConfig)"')


def json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object when it is one (first non-blank byte `{`), else None.
    Raises InvalidJSON when it looks like an object but does not parse, or is ambiguous."""
    if not body or body.lstrip(_WS)[:1] != b"{":
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON("We could not parse the JSON body of your request.") from exc
    if not isinstance(parsed, dict):  # pragma: no cover - a body starting with { is an object
        raise InvalidJSON("The request body must be a JSON object.")
    if _may_repeat_keys(body) and _repeated_top_level_key(body) is not None:
        raise InvalidJSON("The request body repeats a top-level key; send each key once.")
    return parsed


def _may_repeat_keys(body: bytes) -> bool:
    """Cheap screen, one regex pass (~2 µs for a 1.5 KB chat body, ~0.9 ms per MB): False proves
    that no key the proxy reads (_READ_KEYS) is repeated at the top level. Such a key repeated
    appears twice spelled plainly, or at least once spelled with an escape."""
    if b"\\" in body and _ESCAPED_ASCII.search(body) is not None:
        return True
    found = _READ_KEYS.findall(body)
    return len(found) != len(set(found))


def _repeated_top_level_key(body: bytes) -> str | None:
    """The first top-level key written twice, or None (the slow, exact check)."""
    objects: list[list[tuple[str, Any]]] = []

    def keep(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        objects.append(pairs)
        return {}

    try:
        json.loads(body, object_pairs_hook=keep)   # parses: orjson accepted it already
    except RecursionError as exc:   # deeper than the stdlib parser goes: cannot be checked
        raise InvalidJSON("The JSON body is nested too deeply.") from exc
    except ValueError as exc:       # e.g. an integer past the stdlib's digit limit
        raise InvalidJSON("We could not parse the JSON body of your request.") from exc
    # Objects complete innermost first, so the outermost (the body itself) is the last one.
    seen: set[str] = set()
    for key, _ in objects[-1]:
        if key in seen:
            return key
        seen.add(key)
    return None


_BOUNDARY = re.compile(rb'boundary="?([^";]{1,200})"?', re.IGNORECASE)
_FIELD_NAME = re.compile(rb'(?:^|[; \t])name="?([^";\r\n]*)"?', re.IGNORECASE)


def form_fields(headers: list[tuple[bytes, bytes]], body: bytes) -> dict[str, list[bytes]] | None:
    """The fields of a multipart/form-data body by name (each value as sent), or None for any other
    body. One split of the body at its boundary: ~1 ms per MiB, so callers read forms only to
    enforce an allowlist."""
    ctype = next((v for n, v in headers if n == b"content-type"), b"")
    if ctype[:19].lower() != b"multipart/form-data":
        return None
    m = _BOUNDARY.search(ctype)
    if m is None:
        raise InvalidRequest("The multipart body has no boundary.")
    fields: dict[str, list[bytes]] = {}
    for part in body.split(b"--" + m.group(1))[1:]:
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            continue   # the closing "--" after the last part
        for line in head.split(b"\r\n"):
            if line[:20].lower() == b"content-disposition:":
                name = _FIELD_NAME.search(line[20:])
                if name is not None:
                    fields.setdefault(name.group(1).decode("latin-1"), []).append(value.removesuffix(b"\r\n"))
    return fields


def form_models(fields: dict[str, list[bytes]]) -> list[str]:
    """Every model a form names: its `model` field (audio transcriptions), and the `body.model` of
    each line of a batch input file (`purpose=batch`), whose requests the provider runs later. A
    form that names its model twice, or a batch line that cannot be read unambiguously, is refused:
    which one a provider would read is not ours to guess."""
    models = fields.get("model", [])
    if len(models) > 1:
        raise InvalidRequest("The form names the model more than once.", param="model")
    out = [_utf8(v) for v in models]
    if fields.get("purpose") == [b"batch"]:
        for content in fields.get("file", []):
            for line in content.splitlines():
                if line.strip():
                    out.append(_batch_line_model(line))
    return out


def _batch_line_model(line: bytes) -> str:
    if line.count(b'"model"') > 1 or (b"\\" in line and _ESCAPED_ASCII.search(line) is not None):
        raise InvalidRequest("A batch input line names its model ambiguously.", param="file")
    try:
        request = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("A batch input line is not JSON.", param="file") from exc
    body = request.get("body") if isinstance(request, dict) else None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else ""


def _utf8(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest("The model field is not valid UTF-8.", param="model") from exc


def check_model_id(model: str) -> None:
    """Refuse a model id the ledger would have to store whole (a 256 KiB id was stored, issue #14)."""
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(f"The model id is longer than {MAX_MODEL_CHARS} characters.", param="model")


def with_include_usage(body: bytes, parsed: dict[str, Any]) -> bytes:
    """`body` asking for `stream_options.include_usage: true`. Without a `stream_options` member
    one is spliced in after the opening brace: the client's bytes stay as they are and nothing is
    re-serialised (orjson.dumps stops at 255 levels where loads accepts 1,023: a 300-deep body
    answered 500, issue #14). An existing `stream_options` means re-serialising: refused with a
    400 if the body is too deep for that."""
    if "stream_options" not in parsed:
        start = len(body) - len(body.lstrip(_WS)) + 1      # just after the opening {
        member = b'"stream_options":{"include_usage":true}' + (b"," if parsed else b"")
        return body[:start] + member + body[start:]
    opts = parsed["stream_options"]
    parsed["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    try:
        return orjson.dumps(parsed)
    except orjson.JSONEncodeError as exc:
        raise InvalidJSON("The JSON body is nested too deeply to be forwarded with stream_options; "
                          "nest it less than 250 levels deep.") from exc
