"""Streaming from S3 through fsspec + s3fs, against a real local S3 server (moto's, on
127.0.0.1, reached through ``AWS_ENDPOINT_URL`` as MinIO would be): the same batches as
the shards on local disk, folders and globs listed, a missing object named, an endpoint
that is down retried with back-off, and a protocol whose package is missing refused when
the loader is built."""

from __future__ import annotations

import importlib.util
import socket
import threading

import pytest

from pixelbert_dist.data.readers.stream_urls import READ_AHEAD, open_shard
from tests.stream_helpers import BATCH, PATTERN, pil_stream, same_batches, write_stream_shards

BUCKET = "pixelbert"


class LocalS3:
    """moto's S3 server on a free port, which a test may stop and start again (its
    objects live in this process and outlive a restart)."""

    def __init__(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer("127.0.0.1", self.port, verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()
        self.server._server.server_close()  # stop() leaves the port listening: connections would hang


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_stream_shards(tmp_path_factory.mktemp("stream") / "train")


@pytest.fixture(scope="module")
def s3(shards):
    s3fs = pytest.importorskip("s3fs")  # the dev extra installs both
    pytest.importorskip("moto.server")
    endpoint = LocalS3()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", endpoint.endpoint)  # as for MinIO (README)
        env.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries would only slow the down-endpoint test
        s3fs.S3FileSystem.clear_instance_cache()
        endpoint.start()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        fs.put([str(p) for p in sorted(shards.iterdir())], f"{BUCKET}/train/")  # shards, indexes, manifest
        yield endpoint
        endpoint.stop()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_s3_equals_local_and_folders_are_listed(shards, s3):
    spec = f"s3://{BUCKET}/train/{PATTERN}"
    for rank in (0, 1):
        same_batches(
            list(pil_stream(spec, rank=rank, num_workers=2)), list(pil_stream(str(shards / PATTERN), rank=rank))
        )
    brace = pil_stream(spec).urls
    assert brace == [f"s3://{BUCKET}/train/train-{i:06d}.tar" for i in range(4)]
    with open_shard(brace[0]) as stream:  # each shard in flight holds one read-ahead block, not s3fs's 50 MiB
        assert stream.blocksize == READ_AHEAD
    assert pil_stream(f"s3://{BUCKET}/train/").urls == brace  # the folder's .tar objects, not its .npy / .json
    assert pil_stream(f"s3://{BUCKET}/train/train-*.tar").urls == brace
    with pytest.raises(ValueError, match=f"no .tar object matches s3://{BUCKET}/nothing/"):
        pil_stream(f"s3://{BUCKET}/nothing/")


@pytest.mark.slow  # the server and the shards take ~3 s to set up
def test_a_missing_object_is_named(s3):
    loader = pil_stream(f"s3://{BUCKET}/train/gone-{{0..1}}.tar", world_size=1, num_workers=0, epoch_samples=6)
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/train/gone-0.tar: no such shard"):
        next(iter(loader))
    assert loader.read_errors == 0  # not retried: a missing object stays missing


def test_a_missing_package_is_named_when_the_loader_is_built():
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here: gs:// would be read")
    with pytest.raises(ValueError, match=r"gs://bucket/cc-0.tar needs the 'gcsfs' package .*pip install gcsfs"):
        pil_stream("gs://bucket/cc-{0..3}.tar")
    with pytest.raises(ValueError, match="unknown protocol nosuchstore://"):
        pil_stream("nosuchstore://bucket/cc-{0..3}.tar")


@pytest.mark.slow
def test_an_endpoint_that_is_down_is_retried(shards, s3):
    spec, local = f"s3://{BUCKET}/train/{PATTERN}", list(pil_stream(str(shards / PATTERN), world_size=1, num_workers=0))
    s3.stop()
    restart = threading.Timer(1.0, s3.start)
    try:  # botocore's EndpointConnectionError is no OSError: it is retried all the same
        with pytest.raises(OSError, match=r"s3://\S+: read failed 2 times, last: Could not connect to the endpoint"):
            list(pil_stream(spec, world_size=1, num_workers=0, stream_retries=1))
        # down when the first shard is opened, up again 1 s later: the back-off (0.5, 1, 2 s) rides it out
        restart.start()
        loader = pil_stream(spec, world_size=1, num_workers=0, stream_retries=3)
        got = list(loader)
    finally:
        if restart.ident is None:  # failed before the restart was timed: up again for the other tests
            s3.start()
        else:
            restart.join()
    same_batches(got, local)
    assert loader.read_errors >= 1
    assert len(got) == 24 // BATCH
