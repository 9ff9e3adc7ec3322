"""The on-disk format: WebDataset tar shards, their manifest (``shards``) and the per-shard
index sidecars (``index``). The builders that write them live in ``data.builders``."""
