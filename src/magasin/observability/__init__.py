"""Observability: metrics, and (from other modules) tracing, logs."""
