"""Small helpers shared across layers (no imports from the rest of switchrl)."""
