"""The KV cache layer: block files, the block index, restore into cache buffers, tiers, and cache admin.

The transcript (semantic_cli.store) is the truth; everything here is derived from it and may be dropped."""
