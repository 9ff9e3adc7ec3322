"""Data: the shard format, shard builders, image loaders and text collation.

The re-exports below load on first use (PEP 562): importing a submodule, e.g. the shard
builders behind ``make_shards.py --help``, must not pull in transformers and torch.
"""

from __future__ import annotations

from pixelbert_dist.lazy import lazy_exports

_EXPORTS = {
    "format.shards": (
        "FORMAT",
        "Manifest",
        "ShardFormatError",
        "ShardInfo",
        "ShardWriter",
        "iter_samples",
        "iter_shard",
        "read_manifest",
        "read_skipped",
        "write_manifest",
        "write_shard",
    ),
    "text": ("IGNORE_INDEX", "SYNTHETIC_VOCAB_DIR", "TextCollator", "load_tokenizer"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__, __getattr__ = lazy_exports(__name__, _MODULE_OF)
