"""The `slurm` lane: jobs submitted with launch/submit.py to the real two-node cluster that
tests/slurm/cluster.sh starts (node1 + node2 on this host, 2 CPUs each, no GPUs).

Without a running cluster every test here is skipped with one reason line. Without
accounting storage, a job's outcome is read from ``scontrol -o show job`` (the cluster
keeps finished jobs for MinJobAge = 10 minutes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from slurm_helpers import CLUSTER_CONF, cluster_reason

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cluster() -> Path:
    """Skips (one reason for the whole lane) unless the local cluster runs."""
    reason = cluster_reason()
    if reason:
        pytest.skip(reason)
    return CLUSTER_CONF


@pytest.fixture
def slurm_env(cluster, monkeypatch):
    """The submitting process's environment: the cluster's config, no rendezvous of ours."""
    monkeypatch.setenv("SLURM_CONF", str(cluster))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(REPO)
    return cluster
