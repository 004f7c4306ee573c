"""Usage readers per wire family, on samples shaped as the providers' public API docs show them."""

from __future__ import annotations

from typing import Any

import pytest

from meterproxy.metering.body import text_in_json, usage_in_json
from meterproxy.metering.readers import UsageReader
from meterproxy.metering.usage import Usage


def fold(family: str, *events: dict[str, Any]) -> Usage | None:
    r = UsageReader(family)
    for ev in events:
        r.take(ev)
    return r.usage()


# -- OpenAI family -------------------------------------------------------------------------

def test_openai_chat_with_cache_write_and_details() -> None:
    u = {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
         "prompt_tokens_details": {"cached_tokens": 1920, "cache_write_tokens": 64, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0,
                                       "accepted_prediction_tokens": 0}}
    assert usage_in_json({"object": "chat.completion", "usage": u}) == Usage(
        2006, 1920, 300, 128, cache_write=64)


def test_groq_usage_under_x_groq() -> None:
    ev = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {}, "finish_reason": "stop"}],
        "x_groq": {"id": "req_01", "usage": {"queue_time": 0.02, "prompt_tokens": 24,
                                              "prompt_time": 0.001, "completion_tokens": 377,
                                              "completion_time": 0.3, "total_tokens": 401,
                                              "total_time": 0.31}}}
    assert fold("chat", ev) == Usage(24, 0, 377, 0)


def test_xai_reasoning_excluded_from_completion_is_added() -> None:
    # xAI: completion_tokens excludes reasoning_tokens; total = prompt + completion + reasoning.
    u = {"prompt_tokens": 32, "completion_tokens": 9, "total_tokens": 345,
         "prompt_tokens_details": {"text_tokens": 32, "cached_tokens": 6},
         "completion_tokens_details": {"reasoning_tokens": 304},
         "cost_in_usd_ticks": 37756000}
    got = usage_in_json({"usage": u})
    assert got == Usage(32, 6, 313, 304, provider_cost_nano=3775600)


def test_gemini_openai_compat_hidden_thinking() -> None:
    # Only total_tokens shows the thinking: 74 = 12 + 12 + 50 hidden.
    got = usage_in_json({"usage": {"prompt_tokens": 12, "completion_tokens": 12, "total_tokens": 74}})
    assert got == Usage(12, 0, 62, 50)


def test_deepseek_prompt_cache_hit_tokens() -> None:
    u = {"prompt_tokens": 120, "completion_tokens": 20, "total_tokens": 140,
         "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 56}
    assert usage_in_json({"usage": u}) == Usage(120, 64, 20, 0)


def test_openrouter_cost_is_kept_exactly() -> None:
    u = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14, "cost": 0.000123456789,
         "is_byok": False}
    assert usage_in_json({"usage": u}) == Usage(10, 0, 4, 0, provider_cost_nano=123457)


def test_openai_stream_last_usage_wins_never_summed() -> None:
    # vLLM continuous usage stats: cumulative usage on every chunk.
    evs = [{"choices": [{"delta": {"content": "a"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": i, "total_tokens": 5 + i}}
           for i in range(1, 4)]
    assert fold("chat", *evs) == Usage(5, 0, 3, 0)


def test_async_run_result_usage() -> None:
    assert usage_in_json({"status": "completed", "result": {"usage": {
        "prompt_tokens": 3, "completion_tokens": 2}}}) == Usage(3, 0, 2, 0)


def test_embeddings_usage() -> None:
    assert usage_in_json({"object": "list", "usage": {"prompt_tokens": 8, "total_tokens": 8}},
                         "embeddings") == Usage(8, 0, 0, 0)


# -- Responses -------------------------------------------------------------------------------

def test_responses_completed_event_and_json() -> None:
    u = {"input_tokens": 328, "input_tokens_details": {"cached_tokens": 128},
         "output_tokens": 52, "output_tokens_details": {"reasoning_tokens": 30}, "total_tokens": 380}
    want = Usage(328, 128, 52, 30)
    assert fold("responses", {"type": "response.created", "response": {"usage": None}},
                {"type": "response.completed", "response": {"usage": u}}) == want
    assert usage_in_json({"object": "response", "usage": u}, "responses") == want


# -- Anthropic Messages ------------------------------------------------------------------------

def test_anthropic_stream_start_and_cumulative_delta() -> None:
    start = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [],
        "model": "claude-sonnet-4-5", "stop_reason": None,
        "usage": {"input_tokens": 472, "cache_creation_input_tokens": 1024,
                  "cache_read_input_tokens": 2048, "output_tokens": 2,
                  "service_tier": "standard"}}}
    delta1 = {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 40}}
    delta2 = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
              "usage": {"input_tokens": None, "cache_creation_input_tokens": None,
                        "cache_read_input_tokens": None, "output_tokens": 89}}
    assert fold("anthropic", start, delta1, delta2) == Usage(
        472 + 1024 + 2048, 2048, 89, 0, cache_write=1024)


def test_anthropic_json() -> None:
    body = {"id": "msg_1", "type": "message", "content": [
        {"type": "thinking", "thinking": "Let me think", "signature": "sig"},
        {"type": "text", "text": "Hi!"}],
        "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 30, "output_tokens": 77}}
    assert usage_in_json(body, "anthropic") == Usage(42, 30, 77, 0)
    assert text_in_json(body) == "Let me thinkHi!"


def test_anthropic_error_event_is_not_usage() -> None:
    assert fold("anthropic", {"type": "ping"}, {"type": "error", "error": {"type": "overloaded_error"}}) is None


# -- Gemini ------------------------------------------------------------------------------------

GEMINI_FINAL = {"promptTokenCount": 1200, "cachedContentTokenCount": 1024,
                "candidatesTokenCount": 48, "thoughtsTokenCount": 310,
                "toolUsePromptTokenCount": 16, "totalTokenCount": 1574,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1200}]}


def test_gemini_usage_metadata() -> None:
    body = {"candidates": [{"content": {"role": "model", "parts": [
        {"text": "plan", "thought": True}, {"text": "Answer"},
        {"functionCall": {"name": "f", "args": {"q": 1}}}]}, "finishReason": "STOP"}],
        "usageMetadata": GEMINI_FINAL, "modelVersion": "gemini-2.5-pro"}
    assert usage_in_json(body, "gemini") == Usage(1216, 1024, 358, 310)
    assert text_in_json(body) == 'planAnswer{"q":1}'


def test_gemini_stream_cumulative_last_wins_and_json_array() -> None:
    first = {"candidates": [{"content": {"parts": [{"text": "A"}]}}],
             "usageMetadata": {"promptTokenCount": 1200, "totalTokenCount": 1200}}
    last = {"candidates": [{"content": {"parts": [{"text": "B"}]}, "finishReason": "STOP"}],
            "usageMetadata": GEMINI_FINAL}
    want = Usage(1216, 1024, 358, 310)
    assert fold("gemini", first, last) == want
    assert usage_in_json([first, last], "gemini") == want   # streamGenerateContent without alt=sse


@pytest.mark.parametrize("family", ["chat", "responses", "anthropic", "gemini"])
def test_no_usage_is_none(family: str) -> None:
    assert fold(family, {"choices": [], "usage": None}, {"candidates": []}) is None


def test_anthropic_stream_cut_after_message_start_claims_no_provider_usage() -> None:
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}}
    assert fold("anthropic", start) is None     # output_tokens 1 is a placeholder, not the answer
    assert fold("anthropic", start, {"type": "message_delta", "usage": {"output_tokens": 30}}) == Usage(10, 0, 30, 0)
