"""The metadata benchmark's two instruments: the open-policy replay equals the opens a
real ShardIndex makes, and start-up's file-system calls (strace) do not grow with the
shard count; the shard-window order opens far fewer shards than the global order."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.bench_metadata import check_replay, count_startup, write_split
from benchmarks.common import ROOT


@pytest.mark.parametrize("window", [0, 16])
def test_the_replay_counts_the_opens_a_real_reader_makes(tmp_path, window):
    row = check_replay(write_split(tmp_path / "s", 90, 6), world=2, window=window)
    assert row["real_tar_opens"] == row["replay_tar_opens"] > 0


def test_the_shard_window_order_opens_each_shard_once(tmp_path):
    split = write_split(tmp_path / "s", 90, 6)
    assert check_replay(split, 2, 16)["real_tar_opens"] <= 90 // 2 + 16
    assert check_replay(split, 2, 0)["real_tar_opens"] > 90


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_start_up_file_calls_do_not_grow_with_the_shards(tmp_path):
    few = count_startup(write_split(tmp_path / "few", 10), ROOT)
    many = count_startup(write_split(tmp_path / "many", 400), ROOT)
    assert few["file_calls"] == many["file_calls"] <= 8
