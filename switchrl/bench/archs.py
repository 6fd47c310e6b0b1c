"""The model shapes the benchmarks build with random weights (``--arch``): nothing is downloaded.

``vocab_size`` is the base candidate's; :data:`CANDIDATE_ROWS` gives an arch whose candidates have
different embedding row counts its per-candidate rows.
"""

ARCHS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
    ),
}

# embedding rows of candidates 0, 1, ... (the last repeats): "8b" is the real trio, Llama-3.1-8B
# (128256) then the Tulu-3 SFT and aligned models (128264: an added <pad> and 7 unused rows)
CANDIDATE_ROWS: dict[str, tuple[int, ...]] = {"8b": (128256, 128264)}


def candidate_rows(arch: str, index: int) -> int:
    """Embedding rows of candidate ``index`` of ``arch``."""
    rows = CANDIDATE_ROWS.get(arch, (ARCHS[arch]["vocab_size"],))
    return rows[min(index, len(rows) - 1)]
