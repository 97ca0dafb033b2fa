"""Benchmarks for OpenAI-compatible chat servers: the `ovis2-bench` tool and the side-by-side script."""
