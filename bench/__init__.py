"""kmsguard's benchmarks; run them with ``make bench`` (``python -m bench [topic ...]``)."""
