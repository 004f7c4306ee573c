"""The admission reservation: the largest max-output field of any family, times the answers."""

from __future__ import annotations

from typing import Any

import pytest

from meterproxy.metering.estimate import cheap_prompt_estimate
from meterproxy.metering.reserve import reservation_tokens


@pytest.mark.parametrize(("body", "completion"), [
    ({"max_tokens": 100}, 100),
    ({"max_completion_tokens": 50, "max_tokens": 300}, 300),        # the largest wins
    ({"max_completion_tokens": 400, "max_tokens": 30}, 400),
    ({"max_output_tokens": 70}, 70),                                  # Responses
    ({"generationConfig": {"maxOutputTokens": 90}}, 90),              # Gemini
    ({"generationConfig": {"maxOutputTokens": 90, "candidateCount": 2}}, 180),
    ({"max_tokens": 10, "n": 3}, 30),
    ({"max_tokens": -5}, 4096),                                       # nonsense: the default
    ({"max_tokens": True}, 4096),
    ({}, 4096),
])
def test_reservation(body: dict[str, Any], completion: int) -> None:
    assert reservation_tokens(body, 400, 4096) == cheap_prompt_estimate(400) + completion


def test_no_body_reserves_nothing() -> None:
    assert reservation_tokens(None, 400, 4096) == 0


def test_n_is_capped() -> None:
    assert reservation_tokens({"max_tokens": 1, "n": 10_000}, 0, 0) == 128
