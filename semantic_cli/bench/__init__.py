"""`semantic bench`: benchmarks as product features; each writes a results JSON and prints a table."""
