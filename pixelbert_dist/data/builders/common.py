"""What every builder shares: image checking/re-encoding and resumable, parallel shard writing.

A builder turns its source's annotations into a list of ``Item`` (one per image, with
all of its captions) and hands it to ``build_split``. That cuts the list into chunks of
``samples_per_shard`` items, one chunk per shard, so a shard's content depends only on
its chunk: a rerun finds the shards whose chunk is unchanged already done (a record in
``DIR/.progress/``) and skips them, and worker count never changes the bytes written.
A chunk is unchanged when its annotations and its input files (size, mtime) are, and a
finished shard is reused only while its bytes still hash to the recorded sha256.

Every input left out lands in ``skipped.jsonl``; the counts keep apart the images that
were not written (``kind="image"``) and the captions dropped (``kind="caption"``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import json
import logging
import os
import re
import signal
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pixelbert_dist.data.format import shards as fmt
from pixelbert_dist.data.format.index import SUFFIX as index_suffix

JPEG_QUALITY = 95
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
PROGRESS_DIR = ".progress"
log = logging.getLogger(__name__)


@dataclass
class Item:
    """One image to write: where its pixels come from and the captions that go with it."""

    key: str
    image_id: str
    source: str
    captions: list[str]
    file: str = ""  # image path; "" when ``render`` draws the image
    extra: dict = field(default_factory=dict)  # source-specific meta fields
    skipped: list[dict] = field(default_factory=list)  # captions dropped before this stage
    render: Callable[[], Image.Image] | None = None  # picklable (module-level / partial)

    def fingerprint(self) -> str:
        return json.dumps([self.key, self.image_id, self.captions, self.file, self.extra, self.skipped], sort_keys=True)


@dataclass
class BuildResult:
    directory: Path
    written: int
    skipped: int  # entries in skipped.jsonl (images + captions)
    shards_reused: int = 0
    images_skipped: int = 0  # images not written (missing, unreadable, no caption, duplicate)
    captions_dropped: int = 0  # captions left out (empty, or naming an unknown image)


def image_key(source: str, image_id) -> str:
    """The one shard-key convention: the data set's name and the id its own annotation
    files give the image (``coco391895``, ``vg1``, ``flickr30k42``). Readers of task files
    (VQA's ``image_id``, a Karpathy file's ``cocoid``/``imgid``) rebuild it without a table."""
    return f"{source}{image_id}"


def skip(file, reason: str, kind: str = "image") -> dict:
    """A skipped.jsonl entry: an image that is not written, or (``kind="caption"``) a caption."""
    return {"file": str(file), "reason": reason, "kind": kind}


def drop_uncaptioned(file, caption_skips: list[dict]) -> list[dict]:
    """The entries for an image none of whose captions survived: each caption, then the image."""
    why = f"no usable caption ({len(caption_skips)} empty)" if caption_skips else "no captions"
    return caption_skips + [skip(file, why)]


def load_json(path: str | Path, error: type[Exception] = ValueError, missing: type[Exception] | None = None):
    """Parse a JSON file; a missing file raises ``missing`` (default ``error``), bad JSON
    ``error``, each naming the file (readers pass their own format error class)."""
    path = Path(path)
    if not path.is_file():
        raise (missing or error)(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None


def read_json(path: str | Path, required: tuple[str, ...] = (), kind: type = dict):
    """Parse an annotation file, with errors that name it."""
    data = load_json(path, missing=FileNotFoundError)
    if not isinstance(data, kind):
        raise ValueError(f"{path}: expected a JSON {kind.__name__}, found {type(data).__name__}")
    missing = [key for key in required if key not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    return data


def clean_captions(captions: Iterable, file: str) -> tuple[list[str], list[dict]]:
    """Stripped non-empty captions (control characters such as NUL read as spaces: the
    tokenizer and every JSON tool downstream would trip on them), and a skipped entry for
    every empty one."""
    kept, skipped = [], []
    for caption in captions:
        text = _CONTROL.sub(" ", caption).strip() if isinstance(caption, str) else ""
        if text:
            kept.append(" ".join(text.split()))
        else:
            skipped.append(skip(file, f"empty caption {caption!r}", kind="caption"))
    return kept, skipped


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: applies the EXIF orientation, scales 16-bit grey to 8 bits, composes
    transparency onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):  # 16-bit grey (PNG): convert("RGB") would clip at 255
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).round().astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB") if image.mode != "RGB" else image


def encode_jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, progressive=False, optimize=False)
    return buf.getvalue()


def load_image(path: str) -> Image.Image:
    """Decode the whole file (``load()`` catches truncation) and return it upright RGB;
    a JPEG must also pass ``strict_jpeg_check``."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\xff\xd8":
        strict_jpeg_check(data)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


def strict_jpeg_check(data: bytes) -> None:
    """Raise ValueError when libjpeg finds the JPEG's data corrupt. PIL decodes such a
    file and says nothing (200 changed bytes can leave half the pixels off by > 20 grey
    levels); libjpeg warns ("Corrupt JPEG data: ...") and torchvision's decoder, which
    links it, either fails or prints the warning to the process's stderr, caught here at
    the file-descriptor level. Costs a second decode of each JPEG, once, when shards
    are built. On 24 such files (200 XORed bytes, PIL silent on all) it flagged 24, and
    none of the clean ones."""
    import torch
    from torchvision.io import decode_jpeg

    with tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchvision's deprecation of its codecs
                decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError as err:
            raise ValueError(f"corrupt JPEG data ({str(err).splitlines()[-1][:200]})") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        said = caught.read().decode("utf-8", "replace")
    if "Corrupt JPEG data" in said:
        raise ValueError(f"corrupt JPEG data (libjpeg: {said.strip().splitlines()[0][:200]})")


def process_item(item: Item) -> tuple[bytes, int, int] | str:
    """Worker: (jpeg bytes, width, height), or the reason the image is skipped."""
    try:
        image = item.render() if item.render is not None else load_image(item.file)
    except FileNotFoundError:
        return "missing image file"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"unreadable image ({type(err).__name__}: {err})"
    return encode_jpeg(image), image.width, image.height


def die_with_parent(parent: int) -> None:
    """Worker initializer: the kernel kills this worker when the builder dies, even by
    ``kill -9`` (no exit hook runs then, and a ProcessPoolExecutor worker would wait for
    work forever, holding its memory). Linux only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the builder died before prctl: nobody will send the signal
        os._exit(1)


def _file_state(path: str) -> list[int] | None:
    """(size, mtime) of an input image, None when it is missing: a file fixed, replaced or
    added after a build changes its chunk's hash, so the rerun rebuilds that shard."""
    if not path:
        return None  # drawn by ``render``: the fingerprint covers it
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _chunk_hash(items: list[Item]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.fingerprint().encode())
        digest.update(json.dumps(_file_state(item.file)).encode())
    return digest.hexdigest()


def _done_record(progress: Path, shard: str, chunk_hash: str, out_dir: Path) -> dict | None:
    """The record of a finished shard that can be reused as it is, else None."""
    path = progress / (shard + ".json")
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("chunk") != chunk_hash:
        return None
    if not record.get("num_samples"):
        return record  # every image skipped: no tar to check
    tar = out_dir / shard
    if not tar.is_file() or tar.stat().st_size != record.get("size"):
        return None
    if fmt.sha256_file(tar) != record.get("sha256"):
        log.warning("%s: its sha256 no longer matches the manifest: rebuilding it", tar)
        return None
    return record


def _samples(chunk: list[Item], results: Iterable, skipped: list[dict]) -> Iterator:
    for item, result in zip(chunk, results):
        skipped.extend(item.skipped)
        if isinstance(result, str):
            skipped.append(skip(item.file or item.key, result))
            continue
        jpeg, width, height = result
        meta = {
            "key": item.key,
            "captions": item.captions,
            "source": item.source,
            "image_id": item.image_id,
            "width": width,
            "height": height,
            **item.extra,
        }
        yield item.key, jpeg, meta


def _write_chunk(chunk, shard_path: Path, pool, chunk_hash: str, progress: Path) -> dict:
    skipped: list[dict] = []
    results = pool.map(process_item, chunk, chunksize=8) if pool else map(process_item, chunk)
    info = fmt.write_shard(shard_path, _samples(chunk, results, skipped))
    size = shard_path.stat().st_size
    if info.num_samples == 0:
        shard_path.unlink()  # every image skipped: an empty tar would only trouble readers
    record = {
        "chunk": chunk_hash,
        "file": info.file,
        "num_samples": info.num_samples,
        "sha256": info.sha256,
        "size": size,
        "skipped": skipped,
    }
    tmp = progress / (info.file + ".json.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, progress / (info.file + ".json"))
    return record


def _remove_stale(out_dir: Path, name: str, num_shards: int) -> None:
    """Shards left by an earlier, longer run of the same split would be read by globbing
    loaders, and their index sidecars by anyone streaming the folder: both go."""
    for path in [*out_dir.glob(f"{name}-*.tar"), *out_dir.glob(f"{name}-*{index_suffix}")]:
        index = path.name.removesuffix(index_suffix).removesuffix(".tar").rsplit("-", 1)[-1]
        if index.isdigit() and int(index) >= num_shards:
            path.unlink()
            (out_dir / PROGRESS_DIR / (path.name + ".json")).unlink(missing_ok=True)


def _unique(items: list[Item]) -> tuple[list[Item], list[dict]]:
    """The first item of each key; a later one (a duplicate id in the annotations, or one
    image reached by two paths) would be a second copy of the same sample."""
    first: dict[str, Item] = {}
    kept, dropped = [], []
    for item in items:
        seen = first.setdefault(item.key, item)
        if seen is item:
            kept.append(item)
        else:
            dropped.append(
                skip(
                    item.file or item.key,
                    f"duplicate image id {item.image_id} (key {item.key}): written once, from {seen.file or seen.key}",
                )
            )
    if dropped:
        log.warning(
            "%d duplicate image(s) written once each, e.g. %s: %s",
            len(dropped),
            dropped[0]["file"],
            dropped[0]["reason"],
        )
    return kept, dropped


def _counts(entries: list[dict]) -> tuple[int, int]:
    """(images skipped, captions dropped) among skipped.jsonl entries."""
    captions = sum(1 for e in entries if e.get("kind") == "caption")
    return len(entries) - captions, captions


def build_split(
    items: list[Item],
    out_dir: str | Path,
    name: str,
    source: str,
    samples_per_shard: int = 2000,
    workers: int = 0,
    progress: bool = True,
    pre_skipped: Iterable[dict] = (),
) -> BuildResult:
    """Write ``items`` as shards + manifest + skipped.jsonl in ``out_dir`` (resumable).

    ``pre_skipped`` lists inputs dropped before any image was read (e.g. an image whose
    captions are all empty); ``workers`` > 0 decodes/encodes in that many processes.
    """
    from tqdm import tqdm

    pre_skipped = list(pre_skipped)
    if not items:
        example = f", e.g. {pre_skipped[0]['file']}: {pre_skipped[0]['reason']}" if pre_skipped else ""
        raise ValueError(f"{source}/{name}: no image to write ({len(pre_skipped)} input(s) skipped{example})")
    items, duplicates = _unique(items)
    pre_skipped += duplicates
    out_dir = Path(out_dir)
    progress_dir = out_dir / PROGRESS_DIR
    progress_dir.mkdir(parents=True, exist_ok=True)
    chunks = [items[i : i + samples_per_shard] for i in range(0, len(items), samples_per_shard)]
    records, reused = [], 0
    pool = ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),)) if workers > 0 else None
    try:
        bar = tqdm(total=len(items), desc=f"{source}/{name}", unit="img", disable=not progress)
        for index, chunk in enumerate(chunks):
            shard, chunk_hash = fmt.shard_name(name, index), _chunk_hash(chunk)
            record = _done_record(progress_dir, shard, chunk_hash, out_dir)
            if record is None:
                record = _write_chunk(chunk, out_dir / shard, pool, chunk_hash, progress_dir)
            else:
                reused += 1
            records.append(record)
            bar.update(len(chunk))
        bar.close()
    finally:
        if pool is not None:
            pool.shutdown()
    _remove_stale(out_dir, name, len(chunks))
    skipped = pre_skipped + [e for r in records for e in r["skipped"]]
    fmt.write_skipped(out_dir, skipped)
    infos = [fmt.ShardInfo(r["file"], r["num_samples"], r["sha256"]) for r in records if r["num_samples"] > 0]
    images_skipped, captions_dropped = _counts(skipped)
    manifest = fmt.Manifest(
        name=name,
        num_samples=sum(i.num_samples for i in infos),
        shards=infos,
        source=source,
        skipped=len(skipped),
        images_skipped=images_skipped,
        captions_dropped=captions_dropped,
    )
    fmt.write_manifest(out_dir, manifest)
    return BuildResult(out_dir, manifest.num_samples, len(skipped), reused, images_skipped, captions_dropped)
