"""usage_from_obj over every provider shape, and Usage arithmetic."""

from __future__ import annotations

from typing import Any

import pytest

from meterproxy.metering.usage import Usage, usage_from_obj


@pytest.mark.parametrize(("obj", "expected"), [
    ({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
     Usage(10, 0, 5, 0)),
    ({"prompt_tokens": 100, "completion_tokens": 50, "total_time": 0.2,
      "prompt_tokens_details": {"cached_tokens": 40},
      "completion_tokens_details": {"reasoning_tokens": 30}},
     Usage(100, 40, 50, 30)),
    ({"prompt_tokens": 7, "completion_tokens": 3,
      "prompt_tokens_details": None, "completion_tokens_details": None},
     Usage(7, 0, 3, 0)),
    ({"prompt_tokens": 8, "total_tokens": 8}, Usage(8, 0, 0, 0)),  # embeddings
    ({"input_tokens": 20, "output_tokens": 9, "input_tokens_details": {"cached_tokens": 4},
      "output_tokens_details": {"reasoning_tokens": 6}},
     Usage(20, 4, 9, 6)),  # Responses API
    ({"input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": 100,
      "cache_creation_input_tokens": 10},
     Usage(115, 100, 1, 0, cache_write=10)),  # Anthropic: input excludes cache reads and writes
])
def test_shapes(obj: dict[str, Any], expected: Usage) -> None:
    assert usage_from_obj(obj) == expected


@pytest.mark.parametrize("obj", [None, [], "usage", 3, {}, {"total_tokens": 5}])
def test_not_usage(obj: Any) -> None:
    assert usage_from_obj(obj) is None


def test_bad_numbers_count_zero_and_parts_are_capped() -> None:
    u = usage_from_obj({"prompt_tokens": "10", "completion_tokens": -4,
                        "prompt_tokens_details": {"cached_tokens": True}})
    assert u == Usage(0, 0, 0, 0)
    u = usage_from_obj({"prompt_tokens": 5.0, "completion_tokens": 2,
                        "prompt_tokens_details": {"cached_tokens": 9},
                        "completion_tokens_details": {"reasoning_tokens": 7}})
    assert u == Usage(5, 5, 2, 2)


def test_total() -> None:
    assert Usage(10, 2, 5, 1).total == 15
