"""Typed identifiers. NewTypes over str: free at runtime, checked by the type checker."""

from typing import NewType

NodeId = NewType("NodeId", str)
InstanceId = NewType("InstanceId", str)
TaskId = NewType("TaskId", str)
ModelId = NewType("ModelId", str)
