"""exo-rkllama lab stand-in (rkllm.fleet lab only)."""
