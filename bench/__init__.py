"""mirrorgate's hot-path benchmark: mirrorgate against the bare aiohttp server it runs on.

Run from the project root with ``.venv/bin/python -m bench.run`` (see bench/README.md). Not part of
the test suite: it starts real processes, pins them to cores and takes minutes.
"""
