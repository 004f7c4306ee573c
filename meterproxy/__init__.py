"""meterproxy: metering and rate-limiting reverse proxy for OpenAI-compatible providers."""
__version__ = "0.1.0"
