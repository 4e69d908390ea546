"""End-to-end fixtures: real exo-master and exo-worker processes on free loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from exo_master.devtools.launcher import ClusterSpec, LocalCluster

ClusterFactory = Callable[..., LocalCluster]


@pytest.fixture
def start_cluster(tmp_path: Path) -> Iterator[ClusterFactory]:
    """Start clusters from ClusterSpec fields; every process is stopped at teardown, by PID."""
    started: list[LocalCluster] = []

    def start(**fields: object) -> LocalCluster:
        spec = ClusterSpec(log_dir=tmp_path / f"cluster{len(started)}", **fields)  # type: ignore[arg-type]
        cluster = LocalCluster(spec)
        started.append(cluster)
        cluster.start()
        return cluster

    yield start
    for cluster in started:
        cluster.stop()
