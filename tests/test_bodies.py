"""Units of issue #14's request reading: bodies.py, endpoints.check_path/path_model, runs.run_path_uid."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterproxy.bodies import check_model_id, form_fields, form_models, json_object, with_include_usage
from meterproxy.endpoints import check_path, path_model
from meterproxy.errors import InvalidJSON, InvalidRequest
from meterproxy.runs import run_path_uid

keys = st.text(min_size=1, max_size=8)
values = st.recursive(st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=12),
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(keys, c, max_size=3), max_leaves=8)
objects = st.dictionaries(keys, values, max_size=6)


@settings(max_examples=300, deadline=None)
@given(obj=objects, ensure_ascii=st.booleans(), indent=st.sampled_from([None, 1]))
def test_any_object_without_repeats_reads_as_itself(obj: dict[str, Any], ensure_ascii: bool,
                                                    indent: int | None) -> None:
    body = json.dumps(obj, ensure_ascii=ensure_ascii, indent=indent).encode()
    assert json_object(body) == obj


READ = ["model", "stream", "stream_options", "n", "max_tokens", "max_completion_tokens",
        "max_output_tokens", "async", "generationConfig"]


@settings(max_examples=300, deadline=None)
@given(obj=objects, key=st.sampled_from(READ), value=values, data=st.data(),
       escape=st.sampled_from(["none", "all", "one"]), ensure_ascii=st.booleans())
def test_any_repeated_read_key_is_refused(obj: dict[str, Any], key: str, value: Any, data: st.DataObject,
                                          escape: str, ensure_ascii: bool) -> None:
    """A key the proxy reads, written twice anywhere among the top-level members, plainly or with
    \\u escapes, is refused (the proxy would read the last, some providers the first)."""
    obj = {**obj, key: value}
    members = [json.dumps({k: v}, ensure_ascii=ensure_ascii)[1:-1] for k, v in obj.items()]
    if escape == "all":
        spelled = "".join(f"\\u{ord(ch):04x}" for ch in key)
    elif escape == "one":
        spelled = key[:-1] + f"\\u{ord(key[-1]):04x}"
    else:
        spelled = key
    members.insert(data.draw(st.integers(0, len(members))), f'"{spelled}": 1')
    body = ("{" + ", ".join(members) + "}").encode()
    with pytest.raises(InvalidJSON, match="repeats"):
        json_object(body)


def test_slash_escape_is_seen() -> None:
    with pytest.raises(InvalidJSON, match="repeats"):
        json_object(b'{"a/b": 1, "a\\/b": 2}')


def test_not_an_object_is_not_read() -> None:
    assert json_object(b"") is None
    assert json_object(b"[1]") is None
    assert json_object(b"model=x") is None
    with pytest.raises(InvalidJSON):
        json_object(b'  {"model": ')


def test_nested_repeats_are_the_providers_business() -> None:
    assert json_object(b'{"a": {"x": 1, "x": 2}, "b": [{"y": 1, "y": 1}]}') == {"a": {"x": 2}, "b": [{"y": 1}]}


@pytest.mark.parametrize("body", [b'{"model": "m", "messages": []}', b'  \n{"model":"m"}', b"{}"])
def test_include_usage_is_spliced_without_reserialising(body: bytes) -> None:
    parsed = orjson.loads(body)
    out = with_include_usage(body, parsed)
    assert orjson.loads(out) == {**parsed, "stream_options": {"include_usage": True}}
    assert body.strip()[1:] in out        # the client's own bytes, unchanged


def test_include_usage_merges_into_existing_options_and_refuses_too_deep() -> None:
    body = b'{"model": "m", "stream_options": {"x": 1}}'
    assert orjson.loads(with_include_usage(body, orjson.loads(body)))["stream_options"] == \
        {"x": 1, "include_usage": True}
    deep = b'{"stream_options": null, "x": ' + b"[" * 300 + b"]" * 300 + b"}"
    with pytest.raises(InvalidJSON, match="nested too deeply"):
        with_include_usage(deep, orjson.loads(deep))
    spliced = with_include_usage(deep.replace(b'"stream_options": null, ', b""), orjson.loads(deep.replace(
        b'"stream_options": null, ', b"")))
    assert orjson.loads(spliced)["stream_options"] == {"include_usage": True}


CT = [(b"content-type", b"multipart/form-data; boundary=XX")]


def _form(*parts: tuple[str, str]) -> bytes:
    out = b""
    for disposition, value in parts:
        out += b"--XX\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + value.encode() + b"\r\n"
    return out + b"--XX--\r\n"


def _models(body: bytes, headers: list[tuple[bytes, bytes]] = CT) -> list[str] | None:
    fields = form_fields(headers, body)
    return None if fields is None else form_models(fields)


def test_form_models() -> None:
    assert _models(_form(('form-data; name="file"; filename="a"', "xx\r\n--X"),
                         ('form-data; name="model"', "whisper-1"))) == ["whisper-1"]
    assert _models(_form(('form-data; name=model', "m2"))) == ["m2"]
    assert _models(_form(('form-data; filename="x"; name="model"', "m3"))) == ["m3"]
    assert _models(_form(('form-data; name="model_size"', "m"))) == []
    assert _models(_form(('form-data; name="file"; filename="model"', "m"))) == []
    assert _models(_form(('form-data; name="model"', "m")), [(b"content-type", b"application/json")]) is None
    with pytest.raises(InvalidRequest):
        _models(_form(('form-data; name="model"', "a"), ('form-data; name="model"', "b")))


def test_batch_input_file_models() -> None:
    lines = "\n".join(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": m, "messages": []}}) for i, m in enumerate(["a", "b"]))
    form = _form(('form-data; name="purpose"', "batch"), ('form-data; name="file"; filename="b.jsonl"', lines))
    assert _models(form) == ["a", "b"]
    other = _form(('form-data; name="purpose"', "assistants"), ('form-data; name="file"; filename="x"', lines))
    assert _models(other) == []
    for bad in ('{"body": {"model": "a", "model": "b"}}', '{"body": {"mod\\u0065l": "b"}}', "{nope"):
        with pytest.raises(InvalidRequest):
            _models(_form(('form-data; name="purpose"', "batch"), ('form-data; name="file"; filename="b"', bad)))


def test_model_id_length() -> None:
    check_model_id("m" * 256)
    with pytest.raises(InvalidRequest) as exc:
        check_model_id("m" * 257)
    assert exc.value.param == "model"


@pytest.mark.parametrize(("path", "raw"), [("/v1/a\x00", b"/v1/a%00"), ("/v1/a\nb", b"/v1/a%0Ab"),
                                           ("/v1/a/b", b"/v1/a%2Fb"), ("/v1/a/b", b"/v1/a%2fb"),
                                           ("/v1/a\\b", b"/v1/a%5cb"), ("/v1/\x7f", b"/v1/%7F")])
def test_odd_paths_refused(path: str, raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        check_path(path, raw)


def test_ordinary_paths_pass() -> None:
    check_path("/v1/chat/completions", b"/v1/chat/completions")
    check_path("/v1/files/a b", b"/v1/files/a%20b")


def test_path_model() -> None:
    assert path_model("/v1beta/models/gemini-3.1-pro:generateContent") == "gemini-3.1-pro"
    assert path_model("/v1beta/models/gemini-3.1-pro:countTokens") == "gemini-3.1-pro"
    assert path_model("/v1/models/gpt-5.4") is None
    assert path_model("/v1/chat/completions") is None


@pytest.mark.parametrize(("path", "want"), [
    ("/r/uid", ("uid", True)), ("/r/uid/x", ("uid", False)), ("/r", ("", False)), ("/r/", ("", False)),
    ("/rx/uid", None), ("/v1/other", None),
])
def test_run_path_uid(path: str, want: tuple[str, bool] | None) -> None:
    assert run_path_uid("/r/", "", path) == want


def test_run_path_uid_with_suffix() -> None:
    assert run_path_uid("/runs/", "/result", "/runs/u/result") == ("u", True)
    assert run_path_uid("/runs/", "/result", "/runs/u") == ("u", False)
