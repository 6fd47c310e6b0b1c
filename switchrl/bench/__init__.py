"""Throughput benchmarks for switched generation (``switchrl bench`` and ``benchmarks/*.py``).

Every benchmark builds random-weight Llama models from a config (``--arch tiny|1b|8b``, nothing is
downloaded), runs the compared paths in the same process on the same inputs, and prints one JSON
line per measurement with the ratio measured in that run. EOS is unreachable (the tokenizer's EOS id
lies outside the model's vocabulary), so every response uses its whole token budget and paths are
compared on equal work. Greedy decoding is used throughout; ``switch_vs_reencode`` reports the
fraction of responses on which both paths wrote the same tokens (``same_tokens``).

The package: :mod:`~switchrl.bench.setup` (models, timing), :mod:`~switchrl.bench.measures` (the
benchmarks), :mod:`~switchrl.bench.dataset` (``dataset_throughput``: the scheduler over a dataset),
:mod:`~switchrl.bench.vllm_throughput` (switched on vLLM engines vs vLLM's own ``generate``; needs vLLM),
:mod:`~switchrl.bench.cli` (options, parsed without importing torch, so that
``switchrl --help`` stays fast).
"""
