"""The model output of one decoded stream event, for estimates when no usage arrived.

Every piece of output counts once (docs/api.md "Metered endpoints"): content, reasoning
(`reasoning_content`, Groq's `reasoning`, thinking blocks) and tool-call arguments.
"""

from __future__ import annotations

from typing import Any

from meterproxy.metering.body import gemini_parts_text

# Responses API delta events whose `delta` string is model output.
_RESPONSES_DELTAS = frozenset({
    "response.output_text.delta",
    "response.refusal.delta",
    "response.reasoning_text.delta",
    "response.reasoning_summary_text.delta",
    "response.function_call_arguments.delta",
})
_DELTA_FIELDS = ("reasoning_content", "reasoning", "content")
_ANTHROPIC_FIELDS = ("text", "thinking", "partial_json")


def _append_str(out: list[str], v: Any) -> None:
    if isinstance(v, str) and v:
        out.append(v)


def _choice_text(ch: dict[str, Any], out: list[str]) -> None:
    d = ch.get("delta")
    if not isinstance(d, dict):
        _append_str(out, ch.get("text"))  # legacy /v1/completions
        return
    # A chat delta is the output; some servers (Together) repeat it as `text` beside the delta:
    # counting both would count it twice.
    for k in _DELTA_FIELDS:
        _append_str(out, d.get(k))
    calls = d.get("tool_calls")
    if isinstance(calls, list):
        for tc in calls:
            fn = tc.get("function") if isinstance(tc, dict) else None
            if isinstance(fn, dict):
                _append_str(out, fn.get("arguments"))


def extract_text(obj: dict[str, Any], out: list[str]) -> None:
    """Append the model-output strings of one decoded event to `out`."""
    choices = obj.get("choices")
    if isinstance(choices, list):
        for ch in choices:
            if isinstance(ch, dict):
                _choice_text(ch, out)
        return
    candidates = obj.get("candidates")
    if isinstance(candidates, list):   # Gemini
        for cand in candidates:
            if isinstance(cand, dict):
                out.extend(gemini_parts_text(cand))
        return
    typ = obj.get("type")
    if typ in _RESPONSES_DELTAS:
        _append_str(out, obj.get("delta"))
    elif typ == "content_block_delta":  # Anthropic: text, thinking, tool input JSON
        d = obj.get("delta")
        if isinstance(d, dict):
            for k in _ANTHROPIC_FIELDS:
                _append_str(out, d.get(k))
