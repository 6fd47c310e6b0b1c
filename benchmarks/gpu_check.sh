#!/usr/bin/env bash
# The GPU check: one command, JSON lines on stdout, exit status non-zero if any check failed.
#
#   benchmarks/gpu_check.sh           # on one H100/H200: Llama-3.1-8B shapes, bf16, random weights (< 8 min)
#   benchmarks/gpu_check.sh --tiny    # the same checks on the CPU with the tiny shapes (< 2 min)
#
# The first line describes the machine; then simulate's peak GPU memory at states_per_batch 2 and 8,
# one GRPO step with a LoRA switcher, and the bench (switched, single, unfused, batched transformers
# generate, re-encode). What each line holds: benchmarks/gpu_check.py. Logs go to stderr.
# PYTHON picks the interpreter (default: python3); this checkout's switchrl is the one imported.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCH="${ARCH:-8b}"
LIMIT=480
case "${1:-}" in
  --tiny) ARCH=tiny; LIMIT=240 ;;  # about a minute on 2 busy cores
  "") ;;
  *) echo "usage: $0 [--tiny]" >&2; exit 2 ;;
esac
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TRL_EXPERIMENTAL_SILENCE=1
export TOKENIZERS_PARALLELISM=false
status=0
timeout --signal=TERM --kill-after=10 "$LIMIT" "${PYTHON:-python3}" "$ROOT/benchmarks/gpu_check.py" --arch "$ARCH" || status=$?
if [ "$status" -ne 0 ]; then
  reason=failed; [ "$status" -eq 124 ] && reason="ran past ${LIMIT}s"
  echo "{\"check\": \"gpu_check\", \"ok\": false, \"exit\": $status, \"error\": \"$reason\"}"
  echo "gpu_check: $reason (exit $status)" >&2
fi
exit "$status"
