"""`python -m benchmarks`: the step-throughput suite (benchmarks/suite.py)."""

import sys

from benchmarks import suite

if __name__ == "__main__":
    sys.exit(suite.main(sys.argv[1:]))
