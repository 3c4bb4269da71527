"""Benchmark harness: runs the hfbconvert CLI over a matrix of models and methods,
measures accuracy, cost, size, latency and conversion time, and writes BENCHMARKS.md.

Entry points: ``python -m bench.run`` (``make bench`` / ``make bench-quick``) and
``python -m bench.compare`` (``make bench-compare``).
"""

RESULTS_SCHEMA = "hfbconvert-bench/1"
