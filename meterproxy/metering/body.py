"""Usage and generated text from a whole (non-streamed) JSON response, for every flavor."""

from __future__ import annotations

from typing import Any

from meterproxy.metering.usage import Usage, usage_from_obj


def usage_in_json(obj: Any) -> Usage | None:
    """The provider usage of a response body: top-level `usage` (chat, completions, embeddings,
    responses), or nested in `response` (responses events) or `result` (async run polls)."""
    if not isinstance(obj, dict):
        return None
    found = usage_from_obj(obj.get("usage"))
    if found is not None:
        return found
    for nest in ("response", "result"):
        inner = obj.get(nest)
        if isinstance(inner, dict):
            found = usage_from_obj(inner.get("usage"))
            if found is not None:
                return found
    return None


def text_in_json(obj: Any) -> str:
    """Every piece of generated text in a response body, joined (for estimates when usage is absent)."""
    if not isinstance(obj, dict):
        return ""
    parts: list[str] = []
    result = obj.get("result")
    if isinstance(result, dict):
        parts.append(text_in_json(result))
    for choice in _dicts(obj.get("choices")):
        if isinstance(choice.get("text"), str):
            parts.append(choice["text"])
        msg = choice.get("message")
        if isinstance(msg, dict):
            for field in ("content", "reasoning_content", "reasoning"):
                if isinstance(msg.get(field), str):
                    parts.append(msg[field])
            for call in _dicts(msg.get("tool_calls")):
                fn = call.get("function")
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    parts.append(fn["arguments"])
    for item in _dicts(obj.get("output")):
        for content in _dicts(item.get("content")):
            if isinstance(content.get("text"), str):
                parts.append(content["text"])
        if isinstance(item.get("arguments"), str):
            parts.append(item["arguments"])
    for block in _dicts(obj.get("content")):   # Anthropic messages
        if isinstance(block.get("text"), str):
            parts.append(block["text"])
    return "".join(parts)


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []
