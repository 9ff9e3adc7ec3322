"""benchmarks/tensor_memory.py: the CPU allocator's trace counts what a region allocates,
when it frees it, and what activation checkpointing keeps for the backward."""

from __future__ import annotations


import pytest
import torch
from torch.utils.checkpoint import checkpoint

from benchmarks.tensor_memory import AllocationTrace, live_bytes

MIB = 2**20


def test_trace_follows_allocations_and_frees():
    x = torch.ones(MIB // 4)  # 1 MiB, live before the trace: not counted
    with AllocationTrace() as trace:
        with trace.phase("two"):
            a = x * 2
            b = x * 3
        del a
        with trace.phase("one"):
            c = b + 1  # noqa: F841
            del b
    assert trace.peak_bytes() == pytest.approx(2 * MIB, rel=0.01)
    assert trace.bytes_after("two") == pytest.approx(2 * MIB, rel=0.01)
    assert trace.bytes_after("one") == pytest.approx(MIB, rel=0.01)
    assert trace.peak_bytes("one") == pytest.approx(2 * MIB, rel=0.01)  # b and c together
    with pytest.raises(KeyError, match="no phase 'three'"):
        trace.bytes_after("three")


def test_each_trace_counts_from_its_own_start():
    """The allocator's running total spans profiled regions: a tensor from an earlier
    trace that is still live must not count in the next one, nor its free go below zero."""
    with AllocationTrace():
        kept = torch.ones(2 * MIB // 4)
    with AllocationTrace() as trace:
        with trace.phase("new"):
            fresh = torch.ones(MIB // 4)  # noqa: F841
        del kept
    assert trace.bytes_after("new") == pytest.approx(MIB, rel=0.01)
    assert trace.peak_bytes() == pytest.approx(MIB, rel=0.01)


def test_checkpointing_keeps_less_for_backward():
    layers = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
    x = torch.randn(256, 512, requires_grad=True)  # 0.5 MiB per activation
    held = {}
    for name, run in {"plain": layers, "checkpointed": lambda t: checkpoint(layers, t, use_reentrant=False)}.items():
        with AllocationTrace() as trace:
            with trace.phase("forward"):
                y = run(x)
            y.sum().backward()
        held[name] = trace.bytes_after("forward")
        layers.zero_grad(set_to_none=True)
    assert held["plain"] == pytest.approx(4 * MIB // 2, rel=0.05)  # the 4 outputs (3 saved + y)
    assert held["checkpointed"] == pytest.approx(MIB // 2, rel=0.05)  # y alone


def test_live_bytes_counts_a_storage_once():
    base = torch.zeros(1024)
    assert live_bytes([base, base[:10], base.view(32, 32), torch.zeros(0)]) == 4096
