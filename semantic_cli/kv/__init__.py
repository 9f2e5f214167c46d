"""The KV cache layer: `store` (KVStore, tiers: the one entry point for the core and the REPL),
`index` (the SQLite block index, the only SQL on it), `blockfile` (a block or tail file's whole
life: paths, format, atomic writes, reads, links, deletes, scans), `restore` and `layers` (cache
buffers and snapshots), `failures` (CacheUnavailable), and `admin` (scan -> plan -> evict, verify).

The transcript (semantic_cli.store) is the truth; everything here is derived from it and may be dropped."""
