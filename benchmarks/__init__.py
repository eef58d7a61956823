"""kdjax's benchmark suite: `python -m benchmarks` (or `kdjax bench`); see benchmarks/suite.py."""
