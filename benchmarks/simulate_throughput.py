"""`switchrl bench simulate_throughput`: see switchrl/bench.py and benchmarks/RESULTS.md (e.g. `python benchmarks/simulate_throughput.py --arch tiny`)."""

import sys

from switchrl.bench import main

if __name__ == "__main__":
    raise SystemExit(main(["simulate_throughput", *sys.argv[1:]]))
