"""Webdataset samples as other tools write them: tar members grouped into samples, and a
sample's caption, for shards this project did not build (img2dataset, OpenCLIP,
DataComp) as much as for its own.

The grouping is webdataset's: a member's key is its path up to the first dot of its
base name, the rest is its field (``000010011.hq.jpg``: key ``000010011``, field
``hq.jpg``), and consecutive members with the same key make one sample. A field's type is
its last dot-part, lower-cased, so ``hq.jpg`` and ``JPG`` are images too:

* image: the first member of type ``jpg``, ``jpeg``, ``png`` or ``webp`` (OpenCLIP's
  ``jpg;png;jpeg;webp``);
* caption (``caption_text``): with ``data.caption_key`` at its default ``txt``, the
  ``txt`` member, else the JSON's ``caption`` (img2dataset), else its ``captions`` list
  (this project's builders); with another value, that field of the JSON;
* everything else (``cls``, ``npy``, a stray file) is ignored. Tar-level extras (PAX
  headers, directories) never reach here: ``tarfile`` reads them as headers.
"""

from __future__ import annotations

import json
import tarfile
from typing import Callable, Iterable, Iterator, NamedTuple

IMAGE_TYPES = ("jpg", "jpeg", "png", "webp")
# Where a tar's bytes end (or stop being a tar) before its end-of-archive blocks.
TRUNCATION = (tarfile.ReadError, EOFError)
TEXT_TYPE, META_TYPE = "txt", "json"
DEFAULT_CAPTION_KEY = "txt"


def split_member(name: str) -> tuple[str, str]:
    """(key, field) of a tar member name by webdataset's rule (see the module docstring)."""
    folder, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (field.lower() if dot else "")


def field_type(field: str) -> str:
    return field.rpartition(".")[2]


class Sample(NamedTuple):
    key: str
    image: bytes | None
    image_offset: int  # where the image's data starts in the tar (-1: none)
    text: bytes | None
    meta: bytes | None
    text_offset: int = -1  # of the .txt member's data
    meta_offset: int = -1  # of the .json member's data


class Member(NamedTuple):
    name: str
    data: bytes
    offset: int  # of its data in the tar


def tar_members(tar: tarfile.TarFile, broke: list) -> Iterator[Member]:
    """The file members of a tar read front to back; where the tar ends early the error
    goes to ``broke`` and the members end, so that the sample read last before the damage
    is still grouped and yielded (the caller raises or counts ``broke[0]``)."""
    try:
        for member in tar:
            if member.isfile():
                yield Member(member.name, tar.extractfile(member).read(), member.offset_data)
    except TRUNCATION as err:
        broke.append(err)


def group_members(
    members: Iterable[Member], on_dotted: Callable[[str, str, str], None] | None = None
) -> Iterator[Sample]:
    """The samples of a tar's file members, in tar order. ``on_dotted(name, key, field)``
    hears of each member whose field has a dot (webdataset's rule cut its name there)."""
    key, parts = None, {}
    for member in members:
        got, field = split_member(member.name)
        if "." in field and on_dotted is not None:
            on_dotted(member.name, got, field)
        if got != key:
            if key is not None:
                yield _sample(key, parts)
            key, parts = got, {}
        kind = field_type(field)
        if kind in IMAGE_TYPES:
            parts.setdefault("image", member)
        elif kind in (TEXT_TYPE, META_TYPE):
            parts.setdefault(kind, member)
    if key is not None:
        yield _sample(key, parts)


def _sample(key: str, parts: dict) -> Sample:
    image = parts.pop("image", None)
    text, meta = parts.get(TEXT_TYPE), parts.get(META_TYPE)
    return Sample(
        key,
        image.data if image is not None else None,
        image.offset if image is not None else -1,
        text.data if text is not None else None,
        meta.data if meta is not None else None,
        text.offset if text is not None else -1,
        meta.offset if meta is not None else -1,
    )


class NoCaption(ValueError):
    """A sample without a caption (or with one that cannot be read)."""


def caption_meta(text: bytes | None, meta: bytes | None, caption_key: str = DEFAULT_CAPTION_KEY) -> dict:
    """The sample's metadata (its JSON, or {}) with ``captions``: the list the loaders
    choose from. Raises NoCaption naming what was looked for."""
    parsed = {}
    if meta is not None:
        try:
            parsed = json.loads(meta)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if text is None or caption_key != DEFAULT_CAPTION_KEY:
                raise NoCaption(f"its .json is not valid JSON ({err})") from None
        if not isinstance(parsed, dict):
            parsed = {}
    captions = _captions(text, parsed, caption_key)
    if not captions:
        looked = (
            "a .txt member, or 'caption' / 'captions' in its .json"
            if caption_key == DEFAULT_CAPTION_KEY
            else f"data.caption_key={caption_key!r} in its .json"
        )
        raise NoCaption(f"no caption ({looked})")
    return {**parsed, "captions": captions}


def has_caption(text: bytes | None, meta: bytes | None, caption_key: str = DEFAULT_CAPTION_KEY) -> bool:
    """Whether ``caption_key``'s rule finds a caption (what an index sidecar of foreign
    shards lists, and what a streamed shard with such a sidecar counts as its rows)."""
    try:
        caption_meta(text, meta, caption_key)
    except NoCaption:
        return False
    return True


def _captions(text: bytes | None, meta: dict, caption_key: str) -> list[str]:
    if caption_key == DEFAULT_CAPTION_KEY and text is not None:
        caption = text.decode("utf-8", "replace").strip()
        return [caption] if caption else []
    fields = ("caption", "captions") if caption_key == DEFAULT_CAPTION_KEY else (caption_key,)
    for name in fields:
        value = meta.get(name)
        if isinstance(value, str) and value.strip():
            return [value.strip()]
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value  # as the builders wrote them
    return []
