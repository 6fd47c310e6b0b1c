"""`switchrl bench dataset_throughput`: see switchrl/bench/ and benchmarks/RESULTS.md (e.g. `python benchmarks/dataset_throughput.py --arch tiny --queries 64 --max-batch 8`)."""

import sys

from switchrl.bench.cli import run

if __name__ == "__main__":
    raise SystemExit(run(["dataset_throughput", *sys.argv[1:]]))
