"""meterproxy: metering and rate-limiting reverse proxy for LLM providers."""
__version__ = "0.2.0"
