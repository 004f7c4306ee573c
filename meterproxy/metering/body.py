"""Usage and generated text from a whole (non-streamed) JSON response, for every flavor."""

from __future__ import annotations

from typing import Any

import orjson

from meterproxy.metering.readers import UsageReader
from meterproxy.metering.usage import Usage


def usage_in_json(obj: Any, family: str = "chat") -> Usage | None:
    """The provider usage of a response body, read as its wire family puts it. A Gemini
    streamGenerateContent answer without `alt=sse` is a JSON array of chunks: each is read."""
    reader = UsageReader(family)
    for item in obj if isinstance(obj, list) else [obj]:
        reader.take(item)
    return reader.usage()


def text_in_json(obj: Any) -> str:
    """Every piece of generated text in a response body, joined (for estimates when usage is absent)."""
    if isinstance(obj, list):   # Gemini's streamGenerateContent as one JSON array
        return "".join(text_in_json(item) for item in obj)
    if not isinstance(obj, dict):
        return ""
    parts: list[str] = []
    result = obj.get("result")
    if isinstance(result, dict):
        parts.append(text_in_json(result))
    for choice in _dicts(obj.get("choices")):
        msg = choice.get("message")
        if isinstance(msg, dict):
            for field in ("content", "reasoning_content", "reasoning"):
                if isinstance(msg.get(field), str):
                    parts.append(msg[field])
            for call in _dicts(msg.get("tool_calls")):
                fn = call.get("function")
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    parts.append(fn["arguments"])
        elif isinstance(choice.get("text"), str):   # legacy completions
            parts.append(choice["text"])
    for item in _dicts(obj.get("output")):
        for content in _dicts(item.get("content")):
            if isinstance(content.get("text"), str):
                parts.append(content["text"])
        if isinstance(item.get("arguments"), str):
            parts.append(item["arguments"])
    for block in _dicts(obj.get("content")):   # Anthropic messages: text, thinking, tool_use
        for field in ("text", "thinking"):
            if isinstance(block.get(field), str):
                parts.append(block[field])
        if block.get("type") == "tool_use" and isinstance(block.get("input"), dict):
            parts.append(_json(block["input"]))
    for cand in _dicts(obj.get("candidates")):   # Gemini: text and thought parts, function calls
        parts.extend(gemini_parts_text(cand))
    return "".join(parts)


def gemini_parts_text(cand: dict[str, Any]) -> list[str]:
    """The text of one Gemini candidate's parts (thoughts included) and its function-call args."""
    content = cand.get("content")
    out: list[str] = []
    for part in _dicts(content.get("parts") if isinstance(content, dict) else None):
        if isinstance(part.get("text"), str):
            out.append(part["text"])
        call = part.get("functionCall")
        if isinstance(call, dict) and isinstance(call.get("args"), dict):
            out.append(_json(call["args"]))
    return out


def _json(v: Any) -> str:
    try:
        return orjson.dumps(v).decode()
    except orjson.JSONEncodeError:   # nested past orjson's depth limit: count what we can
        return ""


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []
