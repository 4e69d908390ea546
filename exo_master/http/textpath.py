"""The one response path of a text task, as every API surface sees it.

A surface adapter translates its request into TextGenerationParams, then hands the Api a
`TextReply`: how that surface spells a whole answer, a stream's opening, each piece, the end (with
tool calls and usage) and a failure mid-stream. The Api runs the task (placement, waiting,
disconnects, re-placement, shutdown) the same way for all of them; nothing of that is copied into a
surface. Errors before the first byte are raised as ApiError and rendered by the route's error style.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from exo_master.http.errors import ApiError
from protocol.messages import FinishReason, ToolCall, Usage


@dataclass(frozen=True, slots=True)
class Ending:
    """How a text task ended: the engine's reason, its usage, the tool calls it made, and the
    request's stop string that ended it, if one did (only Anthropic's surface has a field for it)."""

    finish_reason: FinishReason
    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()
    stop_sequence: str | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason is FinishReason.LENGTH


class TextReply(Protocol):
    """How one surface spells a text answer (one object per request)."""

    @property
    def stream_media_type(self) -> str: ...

    def whole(self, text: str, end: Ending) -> bytes: ...

    def opening(self) -> bytes: ...

    def piece(self, text: str) -> bytes: ...

    def ending(self, end: Ending) -> bytes: ...

    def failure(self, error: ApiError) -> bytes: ...


class RelayStream(StreamingResponse):
    """A stream whose task is handed back when the response ends, however it ends (even unsent)."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], None],
        headers: dict[str, str],
        media_type: str,
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
