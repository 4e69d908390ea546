"""The OpenAI Responses surface (`POST /v1/responses`): an adapter over the one request path.

Out: a `response` object (a message item with the text, then one `function_call` item per tool
call), or its event stream (response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta ..., the matching .done events,
function-call items with their arguments, response.completed). `previous_response_id` continues a
conversation kept in a bounded store with a TTL (response_store); `store: false` keeps nothing.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from exo_master.http.api import Api
from exo_master.http.decoding import decode_json
from exo_master.http.errors import ApiError, ErrorStyle, error_payload, invalid
from exo_master.http.response_store import ResponseStore
from exo_master.http.responses_schema import ResponsesRequest, input_messages
from exo_master.http.routes import ApiRoute
from exo_master.http.textpath import Ending
from protocol.ids import TaskId
from protocol.messages import ChatMessage, ToolCall

_json = msgspec.json.Encoder()


@dataclass
class ResponsesReply:
    """A `response` object or its event stream (a TextReply); stores the conversation at the end."""

    response_id: str
    body: ResponsesRequest
    conversation: tuple[ChatMessage, ...]
    store: ResponseStore | None
    created_at: int = field(default_factory=lambda: int(time.time()))
    stream_media_type: str = "text/event-stream"
    _text: list[str] = field(default_factory=list)
    _seq: int = 0

    @property
    def _message_id(self) -> str:
        return "msg_" + self.response_id.removeprefix("resp_")

    def _calls(self, end: Ending) -> tuple[ToolCall, ...]:
        calls = end.tool_calls
        if self.body.parallel_tool_calls is False:
            calls = calls[:1]
        return calls[: self.body.max_tool_calls] if self.body.max_tool_calls else calls

    def _message_item(self, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {
            "type": "message",
            "id": self._message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def _call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
        arguments = call.arguments if status == "completed" else ""
        return {
            "type": "function_call",
            "id": "fc_" + call.id.removeprefix("call_"),
            "call_id": call.id,
            "name": call.name,
            "arguments": arguments,
            "status": status,
        }

    def _response(self, status: str, output: list[dict[str, Any]], end: Ending | None) -> dict[str, Any]:
        body = self.body
        usage = None
        if end is not None:
            u = end.usage
            usage = {
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens,
            }
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "tool_choice": "auto",
            "tools": [
                {"type": "function", "name": t.name, "parameters": t.parameters} for t in body.tools or ()
            ],
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "store": self.store is not None,
            "metadata": {},
            "usage": usage,
        }

    def _finish(self, text: str, end: Ending) -> tuple[dict[str, Any], tuple[ToolCall, ...]]:
        calls = self._calls(end)
        output = [self._message_item(text, "completed")] if text or not calls else []
        output += [self._call_item(c) for c in calls]
        if self.store is not None:
            answer = ChatMessage(role="assistant", content=text, tool_calls=calls)
            self.store.put(self.response_id, (*self.conversation, answer))
        status = "incomplete" if end.truncated else "completed"
        return self._response(status, output, end), calls

    def whole(self, text: str, end: Ending) -> bytes:
        return _json.encode(self._finish(text, end)[0])

    def _event(self, kind: str, **payload: Any) -> bytes:
        self._seq += 1
        data = _json.encode({"type": kind, "sequence_number": self._seq - 1, **payload})
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def _text_ids(self) -> dict[str, Any]:
        return {"item_id": self._message_id, "output_index": 0, "content_index": 0}

    def opening(self) -> bytes:
        started = self._response("in_progress", [], None)
        part = {"type": "output_text", "text": "", "annotations": []}
        return (
            self._event("response.created", response=started)
            + self._event("response.in_progress", response=started)
            + self._event(
                "response.output_item.added", output_index=0, item=self._message_item("", "in_progress")
            )
            + self._event("response.content_part.added", **self._text_ids(), part=part)
        )

    def piece(self, text: str) -> bytes:
        self._text.append(text)
        return self._event("response.output_text.delta", **self._text_ids(), delta=text, logprobs=[])

    def ending(self, end: Ending) -> bytes:
        text = "".join(self._text)
        response, calls = self._finish(text, end)
        part = {"type": "output_text", "text": text, "annotations": []}
        out = (
            self._event("response.output_text.done", **self._text_ids(), text=text, logprobs=[])
            + self._event("response.content_part.done", **self._text_ids(), part=part)
            + self._event(
                "response.output_item.done", output_index=0, item=self._message_item(text, "completed")
            )
        )
        # The stream always carries the message item first (index 0), even when empty.
        if not response["output"] or response["output"][0]["type"] != "message":
            response["output"].insert(0, self._message_item(text, "completed"))
        for index, call in enumerate(calls, start=1):
            item_id = "fc_" + call.id.removeprefix("call_")
            out += self._event(
                "response.output_item.added", output_index=index, item=self._call_item(call, "in_progress")
            )
            out += self._event(
                "response.function_call_arguments.delta",
                item_id=item_id,
                output_index=index,
                delta=call.arguments,
            )
            out += self._event(
                "response.function_call_arguments.done",
                item_id=item_id,
                output_index=index,
                name=call.name,
                arguments=call.arguments,
            )
            out += self._event("response.output_item.done", output_index=index, item=self._call_item(call))
        name = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return out + self._event(name, response=response)

    def failure(self, error: ApiError) -> bytes:
        payload = error_payload(error, ErrorStyle.OPENAI)["error"]
        return self._event("error", code=payload["code"], message=payload["message"], param=payload["param"])


class ResponsesRoutes:
    def __init__(self, api: Api, store: ResponseStore) -> None:
        self.api = api
        self.store = store

    async def create(self, request: Request) -> Response:
        body = decode_json(await request.body(), ResponsesRequest)
        body.refuse_unsupported()
        history: tuple[ChatMessage, ...] = ()
        if body.previous_response_id is not None:
            found = self.store.get(body.previous_response_id)
            if found is None:
                minutes = round(self.store.ttl_s / 60)
                raise invalid(
                    f"previous_response_id {body.previous_response_id!r} is unknown or has expired "
                    f"(this server keeps the last {self.store.limit} responses for {minutes} minutes, "
                    "in memory)",
                    "previous_response_id",
                    code="previous_response_not_found",
                )
            history = found
        current = input_messages(body.input)
        params = body.to_params(history, current)
        self.api.check_prompt(sum(len(m.content) for m in params.messages), "input")
        response_id = f"resp_{uuid.uuid4().hex[:24]}"
        store = self.store if body.store is not False else None
        reply = ResponsesReply(response_id, body, (*history, *current), store)
        return await self.api.text(request, TaskId(response_id), params, reply, stream=bool(body.stream))


def routes(api: Api, store: ResponseStore | None = None) -> list[ApiRoute]:
    responses = ResponsesRoutes(api, store or ResponseStore())
    return [ApiRoute("POST", "/v1/responses", responses.create, hot=True)]
