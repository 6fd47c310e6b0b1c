"""`switchrl bench switch_vs_single`: see switchrl/bench.py and benchmarks/RESULTS.md (e.g. `python benchmarks/switch_vs_single.py --arch tiny`)."""

import sys

from switchrl.bench import main

if __name__ == "__main__":
    raise SystemExit(main(["switch_vs_single", *sys.argv[1:]]))
