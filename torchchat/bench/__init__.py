"""Benchmarks: decode/prefill speed, time to first token, bandwidth, memory."""
