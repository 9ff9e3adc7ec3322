"""Where streamed shards come from and how one is opened (``readers/stream.py`` reads them).

``data.train_shards`` is a brace pattern, a URL, a ``pipe:`` command, a local folder of
foreign ``.tar`` shards (no manifest.json), or several of them joined by ``::``. Each URL
is opened by one of two well-kept libraries:

* ``http(s)://``, ``pipe:CMD``, local paths (and schemes only it knows): ``webdataset.gopen``
  (curl, a shell, ``open``);
* every other protocol fsspec knows (``s3://``, ``gs://``, ``az://``, ``hf://`` ...): ``fsspec``
  with that protocol's package (``s3fs``, ``gcsfs``, ``adlfs`` ...). A package that is not
  installed stops the loader when it is built, naming the URL and ``pip install PACKAGE``.
  Such a URL that does not end in ``.tar`` is a folder (``s3://bucket/cc12m/``) or a glob
  (``s3://bucket/cc12m-*.tar``): its ``.tar`` objects, sorted by name, are the shards.

S3 endpoint and credentials are botocore's usual ones (environment or ``~/.aws``):
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE``, ``AWS_REGION``, and
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for MinIO or another S3-compatible store.

A shard's index sidecar (``format.index``) is its URL with ``.tar`` replaced by ``.idx.npy``,
opened the same way (``sidecar_url``, ``read_sidecar``). Absent means the store says so:
``FileNotFoundError`` (local files, fsspec stores) or curl's exit 22 (an HTTP error status
that curl's own retries of 408/429/5xx did not clear). ``pipe:`` commands get none: a
command's failure cannot tell a missing file from a failed read.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import fsspec
from fsspec.registry import known_implementations

from pixelbert_dist.config import ConfigError
from pixelbert_dist.data.format.index import ShardFormatError, index_name
from pixelbert_dist.data.format.shards import MANIFEST

GOPEN_PROTOCOLS = ("", "file", "pipe", "http", "https")  # curl, a shell, open()
GLOB = "*?["
# Remote stores raise types of their own that are not OSError once their own retries
# give up (botocore's EndpointConnectionError when the endpoint is down, ReadTimeoutError
# ...): they are read errors too. Looked up where loaded, so neither is a dependency.
STORE_ERRORS = (("botocore.exceptions", "BotoCoreError"), ("aiohttp", "ClientError"))
# fsspec's read-ahead per open object (s3fs's own default is 50 MiB): a worker reads
# data.shards_in_flight shards at once, 16 x 8 MiB = 128 MiB rather than 800 MiB; one GET per 8 MiB.
READ_AHEAD = 8 * 2**20
CURL_HTTP_ERROR = 22  # curl -f (webdataset.gopen's): the server answered an HTTP error status


def is_stream(spec) -> bool:
    """Shards to stream: a URL, ``pipe:``, a brace pattern, or a local folder of foreign
    webdataset tars (``.tar`` files and no manifest.json: see ``tar_folder``)."""
    spec = str(spec)
    return "://" in spec or spec.startswith("pipe:") or ("{" in spec and ".." in spec) or tar_folder(spec)


def tar_folder(spec) -> bool:
    """A local folder of ``.tar`` files without the manifest this project's builders
    write (img2dataset's output, say): streamed as it is, until ``make_shards.py index``
    gives it a manifest (and with it the indexed mode)."""
    path = Path(str(spec))
    if protocol(str(spec)) not in ("", "file") or not path.is_dir() or (path / MANIFEST).is_file():
        return False
    return any(path.glob("*.tar"))


def protocol(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    scheme, sep, _ = url.partition("://")
    return scheme if sep else ""


def through_fsspec(url: str) -> bool:
    from webdataset.gopen import gopen_schemes

    proto = protocol(url)
    if proto in GOPEN_PROTOCOLS:
        return False
    return proto in known_implementations or proto not in gopen_schemes  # unknown: fsspec's error


def expand(spec: str) -> list[str]:
    """The shard URLs of ``spec``: braces expanded, fsspec folders and globs listed."""
    from webdataset.shardlists import expand_urls

    urls = []
    for url in expand_urls(spec):
        if tar_folder(url):
            urls.extend(str(p) for p in sorted(Path(url).glob("*.tar")))
        elif through_fsspec(url):
            _require_package(url)
            listed = not url.endswith(".tar") or any(c in url for c in GLOB)
            urls.extend(_list_tars(url) if listed else [url])
        else:
            urls.append(url)
    if not urls:
        raise ConfigError(f"data.train_shards={spec!r} names no shard")
    return urls


def _require_package(url: str) -> None:
    proto = protocol(url)
    try:
        fsspec.get_filesystem_class(proto)
    except ImportError:
        package = known_implementations.get(proto, {}).get("class", proto).split(".")[0]
        raise ConfigError(
            f"data.train_shards: {url} needs the '{package}' package for {proto}:// "
            f"(pip install {package}), which is not installed"
        ) from None
    except ValueError:
        raise ConfigError(f"data.train_shards: {url}: unknown protocol {proto}://") from None


def _list_tars(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    pattern = path if any(c in path for c in GLOB) else path.rstrip("/") + "/*.tar"
    found = sorted(p for p in fs.glob(pattern) if p.endswith(".tar"))
    if not found:
        raise ConfigError(f"data.train_shards: no .tar object matches {url} (listed as {pattern})")
    return [fs.unstrip_protocol(p) for p in found]


def seekable(url: str) -> bool:
    """Whether a read of ``url`` can start mid-file: local files and fsspec stores (a
    ranged GET); http(s) through curl and ``pipe:`` read from the start."""
    return protocol(url) in ("", "file") or through_fsspec(url)


def open_shard(url: str, start: int = 0):
    """A binary stream of the shard at ``url`` (a context manager), from byte ``start``
    (only where ``seekable``)."""
    if through_fsspec(url):
        fs, path = fsspec.core.url_to_fs(url)
        stream = fs.open(path, "rb", block_size=READ_AHEAD)
    else:
        from webdataset import gopen

        stream = gopen(url)
    if start:
        stream.seek(start)
    return stream


def sidecar_url(url: str) -> str | None:
    """Where the index sidecar of the shard at ``url`` would be; None where none is looked for."""
    if protocol(url) == "pipe" or not url.endswith(".tar"):
        return None
    return index_name(url)


def read_sidecar(url: str) -> bytes | None:
    """The whole file at ``url``, or None when the store says there is none (above); any
    other failure raises, to be retried as a shard's read is."""
    stream = None
    try:
        stream = open_shard(url)
        with stream:
            return stream.read()
    except FileNotFoundError:
        return None
    except OSError:
        if protocol(url) in ("http", "https") and getattr(stream, "status", None) == CURL_HTTP_ERROR:
            return None
        raise


def retryable(err: BaseException) -> bool:
    """A read error worth another try: not a missing shard, which stays missing, nor a
    file read whole that is not what it should be."""
    if isinstance(err, (FileNotFoundError, ShardFormatError)):
        return False
    stores = tuple(getattr(sys.modules[m], n) for m, n in STORE_ERRORS if m in sys.modules)
    return isinstance(err, (OSError, tarfile.TarError, ValueError) + stores)
