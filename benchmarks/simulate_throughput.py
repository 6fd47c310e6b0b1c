"""`switchrl bench simulate_throughput`: see switchrl/bench/ and benchmarks/RESULTS.md (e.g. `python benchmarks/simulate_throughput.py --arch tiny`)."""

import sys

from switchrl.bench.cli import run

if __name__ == "__main__":
    raise SystemExit(run(["simulate_throughput", *sys.argv[1:]]))
