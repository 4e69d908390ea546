"""The master's desired placements on disk (`--state-dir`): one small versioned JSON file, replaced
atomically (write a temporary file, fsync it, rename it over the old one, fsync the directory), so
a crash at any moment leaves either the old placements or the new ones, never a torn file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import structlog

from exo_master.core.config import CoreConfig
from exo_master.core.instances.desired import PlacementSpec, StateFileError, decode_desired, encode_desired
from exo_master.core.instances.records import ControllerConfig
from exo_master.runtime import MasterRuntime

log = structlog.get_logger("exo_master")
SaveDesired = Callable[[tuple[PlacementSpec, ...]], None]

FILE_NAME = "instances.json"


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FILE_NAME

    def load(self) -> tuple[PlacementSpec, ...]:
        """The saved placements (none when there is no file yet); StateFileError when unreadable."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return ()
        return decode_desired(data)

    def save(self, placements: tuple[PlacementSpec, ...]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".json.tmp")
        with open(temporary, "wb") as out:
            out.write(encode_desired(placements))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def instance_config(config: CoreConfig, drain_grace: float = 60.0) -> ControllerConfig:
    # Commands re-sent every heartbeat; after a restart, nodes get one liveness period to report
    # what they hold (adopted, not reloaded) before anything is placed.
    return ControllerConfig(
        resend=config.heartbeat_interval,
        adopt_grace=config.node_timeout,
        start_timeout=max(10.0, 5 * config.node_timeout),
        drain_grace=drain_grace,
    )


def restore_desired(runtime: MasterRuntime, state_dir: Path | None) -> SaveDesired | Literal[False] | None:
    """Restore the saved placements; the function that saves them (None: no --state-dir; False: the
    state file is unreadable, and the master must not start and later overwrite it)."""
    if state_dir is None:
        runtime.core.instances.restore((), runtime.clock())
        return None
    store = StateStore(state_dir)
    try:
        specs = store.load()
    except (StateFileError, OSError) as exc:
        log.error("master.bad_state_file", path=str(store.path), error=str(exc))
        return False
    runtime.core.instances.restore(specs, runtime.clock())
    log.info("master.state_restored", path=str(store.path), placements=len(specs))
    return store.save
