"""`switchrl bench switch_vs_single`: see switchrl/bench/ and benchmarks/RESULTS.md (e.g. `python benchmarks/switch_vs_single.py --arch tiny`)."""

import sys

from switchrl.bench.cli import run

if __name__ == "__main__":
    raise SystemExit(run(["switch_vs_single", *sys.argv[1:]]))
