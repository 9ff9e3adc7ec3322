"""Data: the shard format, shard builders, image loaders and text collation.

Light re-exports only; heavy imports (DALI, transformers) happen inside the modules
that need them.
"""
from pixelbert_dist.data.shards import (FORMAT, Manifest, ShardFormatError, ShardInfo,
                                        ShardWriter, iter_samples, iter_shard, read_manifest,
                                        read_skipped, write_manifest, write_shard)
from pixelbert_dist.data.text import (IGNORE_INDEX, SYNTHETIC_VOCAB_DIR, TextCollator,
                                      load_tokenizer)

__all__ = [
    "FORMAT", "Manifest", "ShardFormatError", "ShardInfo", "ShardWriter", "iter_samples",
    "iter_shard", "read_manifest", "read_skipped", "write_manifest", "write_shard",
    "IGNORE_INDEX", "SYNTHETIC_VOCAB_DIR", "TextCollator", "load_tokenizer",
]
