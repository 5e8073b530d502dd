"""Samples and verdicts turned into Prometheus metric families, and the HTTP server."""
