"""How one model instance is split over several ranks (shared by the master's planner and the worker)."""

from __future__ import annotations

import enum


class Sharding(enum.StrEnum):
    TENSOR = "tensor"  # every rank holds a slice of every layer (heads, MLP columns): all-reduce per layer
    PIPELINE = "pipeline"  # every rank holds a range of whole layers: activations passed rank to rank
