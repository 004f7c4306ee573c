"""Bounded metric label values for models.

Model ids come from clients, so used raw as a label they would let any caller create unbounded
series. Rule: a model that has a price in the config is always its own label value; other model ids
get their own value for the first `max_labels` distinct ones a process sees, then "other". The
ledger always keeps the real model id.
"""

from __future__ import annotations

import re

from meterproxy.pricing import PriceTable

_SANE = re.compile(r"^[A-Za-z0-9._:/@+-]{1,128}$")


class ModelLabels:
    def __init__(self, max_labels: int) -> None:
        self._max = max_labels
        self._seen: set[str] = set()

    def label(self, model: str, prices: PriceTable) -> str:
        if model in self._seen:
            return model
        if not model:
            return "none"
        if not _SANE.match(model):
            return "other"
        if prices.lookup(model) is not None or len(self._seen) < self._max:
            self._seen.add(model)
            return model
        return "other"
