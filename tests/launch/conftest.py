"""The ``slurm_cluster`` fixture: a real munged + slurmctld + two slurmd started once per session."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, why_unavailable

# munged's and slurmstepd's unix sockets live under the cluster folder; their paths must fit in 108 bytes.
MAX_ROOT_LEN = 60


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running two-node cluster (n1, n2) for the session; skips with the reason when SLURM or root is missing."""
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    short = None
    if len(str(root)) > MAX_ROOT_LEN:
        root = short = Path(tempfile.mkdtemp(prefix="slurm-"))
    try:
        with SlurmCluster(root) as cluster:
            yield cluster
    finally:
        if short is not None:
            shutil.rmtree(short, ignore_errors=True)
