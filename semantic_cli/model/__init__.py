"""Models: resolving a name to an mlx-lm directory, loading it, its fingerprint, and converting GGUF files."""
