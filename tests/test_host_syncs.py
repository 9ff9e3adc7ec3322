"""benchmarks/host_syncs.py: the calls that sync a GPU's host, recorded with their caller."""

import warnings

import torch

from benchmarks.host_syncs import SYNC_CALLS, HostSyncs


def _two_items_and_a_list(x):
    total = x.sum().item() + x.max().item()
    return total, x.tolist()


def test_cpu_calls_are_recorded_with_their_caller_and_unpatched_after():
    originals = [getattr(owner, name) for owner, name in SYNC_CALLS]
    x = torch.arange(4.0)
    with HostSyncs("cpu") as syncs:
        assert _two_items_and_a_list(x) == (9.0, [0.0, 1.0, 2.0, 3.0])
        torch.relu(x)  # no sync
    assert [call.what for call in syncs.calls] == ["item", "item", "tolist"]
    assert {call.caller.name for call in syncs.calls} == {"_two_items_and_a_list"}
    sites = syncs.sites()
    assert sorted(sites.values()) == [1, 2]  # two item() on one line, tolist() on the next
    assert all(site.startswith("test_host_syncs.py:") and "(_two_items_and_a_list)" in site for site in sites)
    assert [getattr(owner, name) for owner, name in SYNC_CALLS] == originals
    x.sum().item()  # after the block: not recorded
    assert len(syncs.calls) == 3


def _warns_like_a_sync():
    warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)


def test_cuda_sync_warnings_are_recorded_and_other_warnings_shown(recwarn):
    """The GPU path's warning capture (the sync debug mode itself needs CUDA): every sync
    warning is recorded with its caller, also a repeated one from the same line, while
    other warnings pass through, and the filters are restored after."""
    syncs = HostSyncs("cpu")
    syncs._catch_sync_warnings()
    try:
        for _ in range(3):
            _warns_like_a_sync()
        warnings.warn("something else", UserWarning, stacklevel=1)
    finally:
        syncs.__exit__(None, None, None)
    assert [call.caller.name for call in syncs.calls] == ["_warns_like_a_sync"] * 3
    assert [str(w.message) for w in recwarn] == ["something else"]
