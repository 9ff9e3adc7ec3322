"""Data: the shard format, shard builders, image loaders and text collation.

The re-exports below load on first use (PEP 562): importing a submodule, e.g. the shard
builders behind ``make_shards.py --help``, must not pull in transformers and torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "pixelbert_dist.data.format.shards": (
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
    "pixelbert_dist.data.text": ("IGNORE_INDEX", "SYNTHETIC_VOCAB_DIR", "TextCollator", "load_tokenizer"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
