"""The KV cache layer: `store` (KVStore, tiers: the one entry point for the core and the REPL),
`index` (the SQLite block index, the only SQL on it), `blockfile` (a block or tail file's whole
life: paths, format, atomic writes, reads, links, deletes, scans), `restore` and `layers` (cache
buffers and snapshots), `failures` (CacheUnavailable), and `admin` (scan -> plan -> evict, verify).

The transcript (semantic_cli.store) is the truth; everything here is derived from it and may be dropped.
Nothing read from the cache directory is trusted: files and index rows are data, checked against the
loaded model's cache spec and the cache's own name patterns, and anything that fails a check is damage
(dropped with one warning, re-prefilled), never an instruction."""
