"""`switchrl bench switch_vs_reencode`: see switchrl/bench.py and benchmarks/RESULTS.md (e.g. `python benchmarks/switch_vs_reencode.py --arch tiny`)."""

import sys

from switchrl.bench import main

if __name__ == "__main__":
    raise SystemExit(main(["switch_vs_reencode", *sys.argv[1:]]))
