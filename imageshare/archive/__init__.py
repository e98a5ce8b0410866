"""The archive: one ingest pipeline, queries (QIDO-RS / C-FIND) and retrieval."""
