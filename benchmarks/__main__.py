"""`python -m benchmarks`: the step-throughput suite (benchmarks/suite.py)."""

import sys

from benchmarks import suite

if __name__ == "__main__":
    try:
        sys.exit(suite.main(sys.argv[1:]))
    except ValueError as e:  # a bad argument, or PyTorch missing for the torch section
        sys.exit(f"python -m benchmarks: error: {e}")
