"""Training and generation: torch + transformers, no web imports."""
