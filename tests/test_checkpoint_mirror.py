"""A checkpoint mirror in object storage, against moto's local S3 server (as the data path
tests it): an async save is copied with its sha256 manifest, a run folder without a
checkpoint resumes from the mirror exactly, and a damaged remote copy is refused."""

from __future__ import annotations

import json
import threading

import pytest

from pixelbert_dist.checkpoint.checkpointer import Checkpointer
from pixelbert_dist.checkpoint.files import CheckpointError, read_meta
from tests.test_checkpoint import _engine, _seed_all, _train
from tests.test_streaming_s3 import LocalS3

pytestmark = [pytest.mark.usefixtures("dist_env"), pytest.mark.slow]
BUCKET = "mirror"


@pytest.fixture
def s3fs_mirror(monkeypatch):
    s3fs = pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    endpoint = LocalS3()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint.endpoint,
        "AWS_MAX_ATTEMPTS": "1",
    }.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    endpoint.start()
    fs = s3fs.S3FileSystem()
    fs.makedirs(BUCKET, exist_ok=True)  # moto keeps its buckets from one test to the next
    yield fs
    endpoint.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_run_without_local_checkpoints_resumes_from_the_mirror(s3fs_mirror, tmp_path):
    fs, url = s3fs_mirror, f"s3://{BUCKET}/runs/r1"
    _seed_all(7)
    engine, opt = _engine(2, seed=0)
    reference = _train(engine, opt, range(6))

    _seed_all(7)
    engine, opt = _engine(2, seed=0)
    first = Checkpointer(tmp_path / "cluster_a", keep_last=1, async_save=True, mirror=url)
    first.attach(engine)
    _train(engine, opt, range(3))
    first.save(3, {"trainer": {"step": 3}}, rank_state={"data": {"batches_seen": 3}})
    first.close()  # the local save, then its copy, complete
    local = first.folder / "step_00000003"
    assert fs.cat_file(f"{BUCKET}/runs/r1/latest").decode() == "step_00000003\n"
    assert json.loads(fs.cat_file(f"{BUCKET}/runs/r1/step_00000003/meta.json")) == read_meta(local)
    remote = {p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/runs/r1/step_00000003")}
    assert remote == {p.name for p in local.iterdir()}

    _seed_all(123)  # a new cluster: no local run folder, other RNG streams, another init
    second = Checkpointer(tmp_path / "cluster_b", mirror=url)
    assert second.choose("auto", {}, world_size=1) == second.folder / "step_00000003"
    engine, opt = _engine(2, seed=99)
    second.attach(engine)
    client = second.resume()
    assert client["trainer"] == {"step": 3} and client["rank_state"] == {"data": {"batches_seen": 3}}
    for (loss, lrs), (ref_loss, ref_lrs) in zip(_train(engine, opt, range(3, 6)), reference[3:]):
        assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-7)
        assert lrs == pytest.approx(ref_lrs)

    name = next(n for n in read_meta(local)["files"] if n.endswith("optim_states.pt"))
    fs.pipe_file(f"{BUCKET}/runs/r1/step_00000003/{name}", b"damaged")
    third = Checkpointer(tmp_path / "cluster_c", mirror=url)
    with pytest.raises(CheckpointError, match=rf"cannot resume from the mirror .*{name}: 7 bytes.*damaged"):
        third.choose("auto", {}, world_size=1)
    assert not (third.folder / "step_00000003").exists()


def test_a_slow_upload_holds_up_neither_the_next_save_nor_local_retention(s3fs_mirror, tmp_path, monkeypatch):
    fs, url = s3fs_mirror, f"s3://{BUCKET}/runs/slow"
    engine, opt = _engine(2, seed=0)
    saver = Checkpointer(tmp_path / "run", keep_last=1, async_save=True, mirror=url)
    saver.attach(engine)
    gate, real_put = threading.Event(), saver.mirror.fs.put_file

    def stalled_put(*args, **kwargs):  # the object store answers only once the test lets it
        gate.wait(timeout=60)
        return real_put(*args, **kwargs)

    monkeypatch.setattr(saver.mirror.fs, "put_file", stalled_put)
    for step in (1, 2):
        _train(engine, opt, [step])
        saver.save(step, {"trainer": {"step": step}})
        saver.wait()  # this save's local writing and commit: done while step 1's upload hangs
    assert not gate.is_set() and not fs.exists(f"{BUCKET}/runs/slow/latest")
    assert saver.folder.joinpath("latest").read_text() == "step_00000002\n"
    assert not (saver.folder / "step_00000001").exists()  # retention went ahead (keep_last=1)
    gate.set()
    saver.close()  # the end of a run waits for the uploads
    assert fs.cat_file(f"{BUCKET}/runs/slow/latest").decode() == "step_00000002\n"
    manifest = json.loads(fs.cat_file(f"{BUCKET}/runs/slow/step_00000001/meta.json"))["files"]
    for name, entry in manifest.items():  # step 1 uploaded whole from its hard links
        assert fs.info(f"{BUCKET}/runs/slow/step_00000001/{name}")["size"] == entry["size"]
    assert not list(saver.folder.glob(".mirror.*"))
