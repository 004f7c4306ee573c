"""Metering: SSE decoding, usage extraction, offline token estimates, and the stream tap."""
