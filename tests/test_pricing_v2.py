"""Pricing v0.2: cache_write, above_prompt_tokens tiers, LiteLLM pricing files (exact nano-USD,
YAML wins), check-config's report."""

from __future__ import annotations

import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from meterproxy.config import ConfigError, load_config, parse_config
from meterproxy.metering.usage import Usage
from meterproxy.pricing import Price, PriceTable
from meterproxy.pricing_file import load_pricing_file

SAMPLE = Path(__file__).parent / "fixtures" / "prices" / "litellm_sample.json"
BASE = """
providers: {p: {base_url: "http://127.0.0.1:1", paths: ["/v1/"]}}
"""


def test_cache_write_priced_apart_and_defaults_to_input() -> None:
    t = PriceTable({"c": Price.of(3, 15, cached_input="0.3", cache_write="3.75"), "d": Price.of(3, 15)})
    u = Usage(prompt=1000, cached_prompt=200, completion=10, cache_write=300)
    # 500 uncached * 3000 + 200 * 300 + 300 * 3750 + 10 * 15000 nano
    assert t.cost_nano("c", u) == (1_500_000 + 60_000 + 1_125_000 + 150_000, True)
    assert t.cost_nano("d", u) == (800 * 3000 + 200 * 3000 + 10 * 15000, True)


def test_tier_applies_to_the_whole_request_above_the_threshold() -> None:
    p = Price.of(2, 12, cached_input="0.2",
                 tiers={200_000: Price.of(4, 18, cached_input="0.4")})
    t = PriceTable({"g": p})
    at = Usage(prompt=200_000, cached_prompt=0, completion=100)
    above = Usage(prompt=200_001, cached_prompt=1, completion=100)
    assert t.cost_nano("g", at) == (200_000 * 2000 + 100 * 12_000, True)
    assert t.cost_nano("g", above) == (200_000 * 4000 + 1 * 400 + 100 * 18_000, True)


def test_yaml_tiers_and_cache_write() -> None:
    cfg = parse_config(BASE + """
pricing:
  gemini-3.1-pro: {input: 2.0, cached_input: 0.2, output: 12.0,
                   above_prompt_tokens: {200000: {input: 4.0, output: 18.0}}}
  claude-x: {input: 3, output: 15, cache_write: 3.75}
""")
    t = cfg.prices
    # The tier leaves cached_input out: it keeps the base 0.2.
    assert t.cost_nano("gemini-3.1-pro", Usage(300_000, 100_000, 10)) == (
        200_000 * 4000 + 100_000 * 200 + 10 * 18_000, True)
    assert t.cost_nano("claude-x", Usage(10, 0, 0, cache_write=10)) == (37_500, True)


def test_litellm_file_exact_nano_and_tiers() -> None:
    prices, report = load_pricing_file(SAMPLE)
    t = PriceTable({}, prices)
    assert report.priced == 5           # sample_spec and the image model price no token
    assert t.cost_nano("gpt-4o", Usage(1, 0, 0)) == (2500, True)
    assert t.cost_nano("gpt-4o", Usage(2, 2, 1)) == (2 * 1250 + 10_000, True)
    # 3.75e-06 USD is 3750 nano exactly (a float would give 3749.9999...)
    assert t.cost_nano("claude-sonnet-4-5", Usage(10, 0, 0, cache_write=10)) == (37_500, True)
    big = Usage(prompt=250_000, cached_prompt=50_000, completion=1000, cache_write=100_000)
    assert t.cost_nano("claude-sonnet-4-5", big) == (
        100_000 * 6000 + 50_000 * 600 + 100_000 * 7500 + 1000 * 22_500, True)
    # 1.23456789e-10 USD per token = 0.123456789 nano: exact Decimal, rounded once per request
    assert t.cost_nano("tiny-model", Usage(1_000_000_000, 0, 0)) == (123_456_789, True)
    assert prices["tiny-model"].input == Decimal("0.000123456789")
    assert "output_cost_per_reasoning_token" in report.unknown
    assert "cache_creation_input_token_cost_above_1hr" in report.unknown
    assert "input_cost_per_token_batches" in report.unknown
    assert "litellm_provider" not in report.unknown and "supports_reasoning" not in report.unknown


def test_yaml_wins_over_files_and_globs_win_too(tmp_path: Path) -> None:
    shutil.copy(SAMPLE, tmp_path / "models.json")
    (tmp_path / "c.yaml").write_text(BASE + """
pricing:
  gpt-4o: {input: 1, output: 1}
  "claude-*": {input: 9, output: 9}
pricing_files: [models.json]
""")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.pricing_reports[0].priced == 3    # gpt-4o and claude-sonnet-4-5 are the YAML's
    assert "input_cost_per_token_batches" not in cfg.pricing_reports[0].unknown   # gpt-4o's: unused
    assert cfg.prices.lookup("gpt-4o") == Price.of(1, 1)
    assert cfg.prices.lookup("claude-sonnet-4-5") == Price.of(9, 9)
    assert cfg.prices.cost_nano("gemini-2.5-pro", Usage(1, 0, 1)) == (1250 + 10_000, True)
    assert cfg.prices.lookup("unknown-model") is None


def test_bad_pricing_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("[1, 2]")
    (tmp_path / "c.yaml").write_text(BASE + "pricing_files: [bad.json, missing.json]\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    assert info.value.errors == [
        f"pricing_files.0: {tmp_path / 'bad.json'} must be a JSON object of model entries",
        f"pricing_files.1: cannot read {tmp_path / 'missing.json'}: No such file or directory"]


def test_check_config_reports_files(tmp_path: Path) -> None:
    shutil.copy(SAMPLE, tmp_path / "models.json")
    (tmp_path / "c.yaml").write_text(BASE + "pricing_files: [models.json]\n")
    out = subprocess.run([sys.executable, "-m", "meterproxy", "check-config", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, check=True).stdout
    assert f"pricing file {tmp_path / 'models.json'}: 5 models priced" in out
    assert "unknown fields (not used for cost): cache_creation_input_token_cost_above_1hr, " in out


def test_unpriced_and_stream_usage_config() -> None:
    cfg = parse_config(BASE.replace('paths: ["/v1/"]', 'paths: ["/v1/"], stream_usage: always')
                       + "server: {unpriced: refuse}\n")
    assert cfg.server.unpriced == "refuse"
    assert cfg.route("/v1/x") is not None and cfg.route("/v1/x").stream_usage == "always"  # type: ignore[union-attr]
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + "server: {unpriced: maybe}\n")
    assert info.value.errors == ["server.unpriced: Input should be 'allow' or 'refuse'"]
