"""The master's pure scheduling core: no sockets, no clock reads, no randomness (see master.py)."""

from exo_master.core.config import CoreConfig, CoreStats
from exo_master.core.master import MasterCore
from exo_master.core.view import CoreCounters
from protocol.cluster_view import TaskStatus

__all__ = ["CoreConfig", "CoreCounters", "CoreStats", "MasterCore", "TaskStatus"]
