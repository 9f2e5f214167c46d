"""semantic: chat with named local-LLM agents whose conversations and KV caches persist."""

__version__ = "0.1.0"
