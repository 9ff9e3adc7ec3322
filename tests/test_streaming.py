"""Streaming mode over real shards: from a local `python -m http.server` (127.0.0.1
only), from `pipe:` commands and from local brace patterns. Unequal shards still give
every rank the same batches, a resumed run (also in resampled mode, also with a JPEG that
does not decode) continues exactly, and a failed read is retried and counted."""

from __future__ import annotations

import itertools
import json
import logging
import shutil

import pytest

from tests.stream_helpers import BATCH, PATTERN, pil_stream, same_batches, serve, write_stream_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_stream_shards(tmp_path_factory.mktemp("stream") / "train")


@pytest.fixture(scope="module")
def server(shards):
    with serve(shards) as url:
        yield url


@pytest.mark.slow
def test_http_equals_local_and_ranks_stay_in_step(shards, server):
    per_rank = []
    for rank in (0, 1):
        http = list(pil_stream(f"{server}/{PATTERN}", rank=rank))
        local = list(pil_stream(str(shards / PATTERN), rank=rank))
        same_batches(http, local)
        assert len(http) == 24 // (2 * BATCH)
        assert all(len(b["keys"]) == BATCH for b in http)
        per_rank.append({k for b in http for k in b["keys"]})
    assert not per_rank[0] & per_rank[1], "ranks read different shards"
    assert "img0008" not in per_rank[0] | per_rank[1]
    with pytest.raises(ValueError, match="4 shards cannot feed 4 ranks x 2 workers.*resampled"):
        pil_stream(f"{server}/{PATTERN}", world_size=4, num_workers=2)  # fails before step 1


@pytest.mark.slow
@pytest.mark.parametrize("resampled", [False, True])
def test_resume_is_exact(server, resampled):
    spec = f"{server}/{PATTERN}"
    loader = pil_stream(spec, resampled=resampled, num_workers=2, epoch_samples=36)
    full = [list(loader)]
    loader.set_epoch(1)
    full.append(list(loader))
    assert [b["keys"] for b in full[0]] != [b["keys"] for b in full[1]]
    first = pil_stream(spec, resampled=resampled, num_workers=2, epoch_samples=36)
    taken = []
    for batch in first:
        taken.append(batch)
        if len(taken) == 3:
            break
    state = json.loads(json.dumps(first.state_dict()))
    fresh = pil_stream(spec, resampled=resampled, num_workers=2, epoch_samples=36)
    fresh.load_state_dict(state)
    same_batches(taken + list(fresh), full[0])
    fresh.set_epoch(1)
    same_batches(list(fresh), full[1])
    with pytest.raises(ValueError, match="num_workers"):
        pil_stream(spec, resampled=resampled, num_workers=1, epoch_samples=36).load_state_dict(state)


@pytest.mark.slow
def test_pipe_and_a_retried_read(shards, tmp_path):
    local = list(pil_stream(str(shards / PATTERN), world_size=1, epoch_samples=21))
    marker = tmp_path / "failed-once"
    # the first read of each shard stops after 3000 bytes and exits 1: a transient failure
    command = (
        f"pipe:sh -c 'if [ -e {marker}-$0 ]; then cat {shards}/$0; else touch {marker}-$0; "
        f"head -c 3000 {shards}/$0; exit 1; fi' train-{{000000..000003}}.tar"
    )
    loader = pil_stream(command, world_size=1, epoch_samples=21)
    same_batches(list(loader), local)
    assert loader.read_errors == 4
    assert loader.damaged == 1  # img0008 does not decode: skipped, counted


@pytest.mark.slow
def test_a_streamed_position_without_every_ranks_positions_is_not_replanned(shards):
    """A re-plan needs every rank's stream positions (rank 0's copy gathers them at each
    save): a state without them (an earlier version's) is refused, naming what to do."""
    from pixelbert_dist.train.resume import replan_data_state

    spec = str(shards / PATTERN)
    saved = pil_stream(spec, world_size=2).state_dict()  # this rank's own cursors only
    one = pil_stream(spec, world_size=1)
    with pytest.raises(ValueError, match=r"no stream positions of its 2 ranks .*on 2 ranks with data.num_workers=2"):
        replan_data_state(saved, one.state_dict())


@pytest.mark.slow
def test_moved_shards_resume_and_renamed_ones_are_refused(shards, tmp_path, caplog):
    """A streamed position resumes over the same shard files at another place (a local copy
    of a bucket, say), said once in the log; shards under other names are refused."""
    moved, renamed = tmp_path / "moved", tmp_path / "renamed"
    shutil.copytree(shards, moved)
    renamed.mkdir()
    for path in shards.iterdir():
        shutil.copy(path, renamed / path.name.replace("train-", "other-"))
    full = list(pil_stream(str(shards / PATTERN), world_size=1, epoch_samples=21))
    first = pil_stream(str(shards / PATTERN), world_size=1, epoch_samples=21)
    taken = list(itertools.islice(first, 2))
    state = json.loads(json.dumps(first.state_dict()))
    again = pil_stream(str(moved / PATTERN), world_size=1, epoch_samples=21)
    with caplog.at_level(logging.WARNING, logger="pixelbert_dist.data"):
        again.load_state_dict(state)
    assert "over the same 4 shard names at other URLs" in caplog.text
    same_batches(taken + list(again), full)
    other = pil_stream(str(renamed / "other-{000000..000003}.tar"), world_size=1, epoch_samples=21)
    with pytest.raises(ValueError, match="only over the same shard files, in the same order"):
        other.load_state_dict(state)
