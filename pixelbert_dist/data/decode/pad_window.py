"""The padded (H, W) of a batch, known from its image headers before DALI decodes it.

DALI pads a batch to its largest image (``fn.pad``), a second pass over the float batch
after ``crop_mirror_normalize``: at 8 x 3 x 1088 x 1344 float32 that pass cost about
a fifth of DALI-CPU's time per image. Given the padded size up front, the normalise
step writes the padded batch itself (a crop window larger than the image, filled with
zeros). The size rule needs only each image's width and height, read from its header
(``format.image_size``) unless the image may be stored sideways: a JPEG with an EXIF
block, or a PNG / WebP, is opened with PIL for its EXIF orientation (header only: ~60 µs
for a 640x480 JPEG with EXIF, as for one without, on the 2-core VM), and where that
orientation transposes (5..8) the window takes both ways round, since whether a decoder
applies it is the decoder's business. The window
is never smaller than the batch DALI decodes (``dali.py`` checks, and trims a larger one).
"""

from __future__ import annotations

import io

from PIL import Image

from pixelbert_dist.data.decode.images import padded_batch_size, resized_size, round_up
from pixelbert_dist.data.format.image_size import image_size

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING = frozenset({5, 6, 7, 8})  # the orientations that swap width and height
_JPEG = b"\xff\xd8"


def _stored_sizes(data: bytes) -> list[tuple[int, int]] | None:
    """The (height, width) a decoder may return for ``data``: one, or both ways round
    when its EXIF orientation transposes; None when no header reads."""
    if data[:2] == _JPEG and b"Exif\x00\x00" not in data:
        width, height = image_size(data)
        return [(height, width)] if width and height else None
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return [(height, width), (width, height)] if orientation in _TRANSPOSING else [(height, width)]


def pad_window(images: list[bytes], shorter: int, max_size: int) -> tuple[int, int]:
    """The (H, W) to pad a batch of encoded ``images`` to: ``padded_batch_size`` of
    their resized sizes, or, when one has no readable header, the bound every resized
    image fits in (``max_size`` both ways, rounded up to x64)."""
    sizes = []
    for data in images:
        stored = _stored_sizes(data if isinstance(data, bytes) else bytes(data))
        if stored is None:  # the resize rule keeps both sides <= max_size
            return round_up(max_size), round_up(max_size)
        sizes += [resized_size(height, width, shorter, max_size) for height, width in stored]
    return padded_batch_size(sizes)
