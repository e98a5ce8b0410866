"""Ways out to storage: the blob store (instance bytes) and the index (SQL)."""
