"""Benchmarks of llm-proxy against a minimal pass-through (the floor) and direct-to-upstream.

`python -m bench [--quick]` (or `bench/run`, which first installs nginx, wrk and redis-server);
see bench/README.md for what each figure means.
"""
