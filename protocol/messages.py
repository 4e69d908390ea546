"""Every message that crosses the bus, as frozen msgspec Structs with explicit string tags.

Unknown fields are ignored on decode (msgspec's default), so a newer peer may add fields without
breaking an older one. Defaults on new fields keep old frames decodable.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.sharding import RingPorts, ShardAssignment, TransformerShape

# ---- bounds checked at decode (a frame outside them is a ProtocolError, dropped and counted) ----
MAX_ID_CHARS = 256  # node, instance, task and model ids
MAX_TEXT_CHARS = 65_536  # one output chunk
MAX_REASON_CHARS = 4_096  # errors, failure reasons, addresses
MAX_INSTANCES_PER_NODE = 64
MAX_TASKS_PER_INSTANCE = 4_096  # active or unacknowledged task ids in one snapshot
MAX_CONCURRENCY = 4_096
MAX_CAPACITY = 1e6  # relative speed: finite, positive
MAX_COUNT = 2**31 - 1  # chunk indices, chunk counts, token counts
MAX_GAPS_PER_FETCH = 256  # missing output ranges named in one FetchOutput
MAX_TOOLS = 128  # tool definitions in one request
MAX_TOOL_CALLS = 64  # tool calls in one message or one answer
MAX_LOCAL_MODELS = 256  # models one node reports holding on disk
MAX_STOPS = 16  # stop strings in one request (the HTTP surfaces allow 4, as OpenAI does)
MAX_STOP_CHARS = 1_024  # one stop string (the stop-string filter's work per token grows with it)

NodeIdField = Annotated[NodeId, msgspec.Meta(max_length=MAX_ID_CHARS)]
InstanceIdField = Annotated[InstanceId, msgspec.Meta(max_length=MAX_ID_CHARS)]
TaskIdField = Annotated[TaskId, msgspec.Meta(max_length=MAX_ID_CHARS)]
ModelIdField = Annotated[ModelId, msgspec.Meta(max_length=MAX_ID_CHARS)]
Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON_CHARS)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
TaskIds = Annotated[tuple[TaskIdField, ...], msgspec.Meta(max_length=MAX_TASKS_PER_INSTANCE)]
StopString = Annotated[str, msgspec.Meta(max_length=MAX_STOP_CHARS)]


class TaskKind(enum.StrEnum):
    TEXT_GENERATION = "TextGeneration"
    IMAGE_GENERATION = "ImageGeneration"
    IMAGE_EDITS = "ImageEdits"


class InstanceStatus(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A function call the model made (parsed from its output by the worker), or one it made in
    an earlier turn and the client sends back with the conversation."""

    id: Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
    name: Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
    arguments: Annotated[str, msgspec.Meta(max_length=MAX_TEXT_CHARS)] = "{}"  # a JSON object, as text


ToolCalls = Annotated[tuple[ToolCall, ...], msgspec.Meta(max_length=MAX_TOOL_CALLS)]


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A function the model may call: what the chat template shows it."""

    name: Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)  # a JSON schema


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    content: str
    # An assistant turn's tool calls, and a tool result's call id (role "tool"); the defaults keep
    # plain chats (and older peers) as they were.
    tool_calls: ToolCalls = ()
    tool_call_id: str | None = None


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: Count = 0
    completion_tokens: Count = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# ---- request parameters, one Struct per task kind, tagged by kind --------------------------


class TextGenerationParams(msgspec.Struct, frozen=True, kw_only=True, tag="TextGeneration", tag_field="kind"):
    KIND: ClassVar[TaskKind] = TaskKind.TEXT_GENERATION
    model: ModelId
    messages: tuple[ChatMessage, ...]
    max_tokens: int = 256
    # None: the model's default (its generation_config.json, else a conservative one; see
    # exo_worker.sampling_defaults). The 1.0 defaults are what these fields always had, so code
    # that builds params without them, and old peers, mean what they meant before.
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    stop: Annotated[tuple[StopString, ...], msgspec.Meta(max_length=MAX_STOPS)] = ()
    seed: int | None = None
    # None: no top-k cut (Anthropic and Ollama send it).
    top_k: Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)] | None = None
    # Legacy text completion (/v1/completions): the raw prompt, continued as is without the chat
    # template; `messages` is then empty. None (the default, so older frames decode) means chat.
    prompt: str | None = None
    # Functions the chat template shows the model; empty: a plain chat. "required" makes the model
    # call one of them (a named choice is sent as that one tool, required).
    tools: Annotated[tuple[ToolSpec, ...], msgspec.Meta(max_length=MAX_TOOLS)] = ()
    tool_choice: Literal["auto", "required"] = "auto"
    # False when the client gave no max_tokens and `max_tokens` is the API's default: the engine
    # then caps it by what the model's context leaves after the prompt, instead of refusing the
    # request (OpenAI's behaviour). True (the default, so older frames mean what they meant): a
    # prompt plus max_tokens over the context is a `context_length_exceeded` error.
    max_tokens_given: bool = True


class ImageGenerationParams(
    msgspec.Struct, frozen=True, kw_only=True, tag="ImageGeneration", tag_field="kind"
):
    KIND: ClassVar[TaskKind] = TaskKind.IMAGE_GENERATION
    model: ModelId
    prompt: str
    size: str = "512x512"
    n: int = 1
    seed: int | None = None


class ImageEditsParams(msgspec.Struct, frozen=True, kw_only=True, tag="ImageEdits", tag_field="kind"):
    KIND: ClassVar[TaskKind] = TaskKind.IMAGE_EDITS
    model: ModelId
    prompt: str
    image_b64: str
    size: str = "512x512"
    n: int = 1
    seed: int | None = None


TaskParams = TextGenerationParams | ImageGenerationParams | ImageEditsParams


# ---- worker -> master ------------------------------------------------------------------------


# Counters and sizes in heartbeats are bounded so a bad frame cannot smuggle in absurd numbers.
_Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class PromptCacheStats(msgspec.Struct, frozen=True, kw_only=True):
    """An instance's prompt (KV) cache: its size now and what it has saved since the worker started."""

    size_bytes: _Count = 0  # held by cached entries now
    budget_bytes: _Count = 0  # the most it may hold (--prompt-cache-bytes)
    entries: _Count = 0
    hits: _Count = 0  # requests that reused at least one cached token
    misses: _Count = 0  # requests that reused none
    reused_tokens: _Count = 0  # prompt tokens not processed again, summed over all requests
    prompt_tokens: _Count = (
        0  # all prompt tokens of those requests: reused_tokens / prompt_tokens is the saving
    )


_Rate = Annotated[float, msgspec.Meta(ge=0, le=1e9)]


class InstanceWork(msgspec.Struct, frozen=True, kw_only=True):
    """What an instance's engine is really doing now, and how fast it works (placement by work).

    Counted by the engine, so it includes work no task owns any more (a cancelled prompt whose
    processing is still being stopped). Rates are smoothed measurements; 0 means not measured yet.
    """

    prefill_tokens: _Count = 0  # prompt tokens admitted and still to process
    decoding: _Count = 0  # sequences generating tokens
    waiting: _Count = 0  # requests handed to the engine that wait for a batch slot
    prefill_rate: _Rate = 0.0  # prompt tokens per second
    decode_rate: _Rate = 0.0  # decode steps per second (one token for every decoding sequence)
    chars_per_token: _Rate = 0.0  # prompt characters per prompt token, for the master's estimates
    prefill_chunk: _Count = 0  # prompt tokens per step (0: the engine does not chunk)


class InstanceReport(msgspec.Struct, frozen=True, kw_only=True):
    """One model instance as its worker sees it; part of every heartbeat (a full snapshot)."""

    instance_id: InstanceIdField
    model: ModelIdField
    kinds: Annotated[tuple[TaskKind, ...], msgspec.Meta(max_length=8)] = (TaskKind.TEXT_GENERATION,)
    status: InstanceStatus = InstanceStatus.READY
    # At least one slot: an instance with none would be "ready" yet never take a request.
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=MAX_CONCURRENCY)] = 1
    # Relative speed; placement divides load by it, so it must be positive and finite.
    capacity: Annotated[float, msgspec.Meta(gt=0, le=MAX_CAPACITY)] = 1.0
    active_tasks: TaskIds = ()
    # Tasks that ended here but whose end the master has not acknowledged (TaskAck) yet: the
    # master fetches a final it never received, or acknowledges one it has.
    finished_tasks: TaskIds = ()
    error: Reason | None = None
    # None: the engine keeps no prompt cache (the sim engine, or an older worker).
    prompt_cache: PromptCacheStats | None = None
    # Memory the loaded instance holds (weights + caches), in bytes; 0 while unknown.
    memory_bytes: _Count = 0
    # While status is "loading": the fraction loaded so far (0..1).
    progress: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    # The master's placement this instance belongs to (from LoadInstance); "" for an instance the
    # worker declared itself (--model): the master shows it as unmanaged and never unloads it.
    placement: Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)] = ""

    # The model's context length in tokens (prompt + completion); 0: unknown or unlimited.
    context_length: _Count = 0
    # None: an engine (or an older worker) that does not report its work.
    work: InstanceWork | None = None
    # A rank of a sharded instance (from LoadInstance); None: a whole instance. A rank > 0 takes no
    # requests: the scheduling core ignores it, the instance controller ties it to its rank 0.
    shard: ShardAssignment | None = None

    @property
    def takes_tasks(self) -> bool:
        return self.shard is None or self.shard.rank == 0


class LocalModel(msgspec.Struct, frozen=True, kw_only=True):
    """A model a node holds on disk and can load without downloading anything."""

    model: ModelIdField
    path: Reason = ""
    size_bytes: _Count = 0  # the weight files on disk
    # What one instance needs in memory: the weights as loaded plus their runtime overhead, and
    # the KV cache per token of context (from config.json: 2 x layers x kv_heads x head_dim x
    # bytes per element). The master adds KV headroom for the slots it asks for.
    weights_bytes: _Count = 0
    kv_bytes_per_token: _Count = 0
    # Its shape from config.json, for shard planning; None: unknown (not a transformer mlx-lm reads).
    shape: TransformerShape | None = None


class WorkerHeartbeat(msgspec.Struct, frozen=True, kw_only=True, tag="WorkerHeartbeat", tag_field="type"):
    node_id: NodeIdField
    instances: Annotated[tuple[InstanceReport, ...], msgspec.Meta(max_length=MAX_INSTANCES_PER_NODE)] = ()
    address: Reason = ""
    # Echo of the last master session the worker heard from; "" when none yet.
    master_session: Reason = ""
    # What the node is: its memory (bytes; 0 = unknown, from an older worker), its backend
    # ("mlx-metal", "mlx-cpu", "sim"), its host name and the models it can load.
    memory_total: _Count = 0
    memory_available: _Count = 0
    backend: Annotated[str, msgspec.Meta(max_length=64)] = ""
    host: Reason = ""
    models: Annotated[tuple[LocalModel, ...], msgspec.Meta(max_length=MAX_LOCAL_MODELS)] = ()
    # Where MLX distributed may listen on this node; None: it cannot run a rank of a sharded instance.
    ring: RingPorts | None = None


class TaskAccepted(msgspec.Struct, frozen=True, kw_only=True, tag="TaskAccepted", tag_field="type"):
    node_id: NodeIdField
    task_id: TaskIdField
    instance_id: InstanceIdField


class TaskChunk(msgspec.Struct, frozen=True, kw_only=True, tag="TaskChunk", tag_field="type"):
    node_id: NodeIdField
    task_id: TaskIdField
    instance_id: InstanceIdField
    index: Count  # 0, 1, 2, ... per task: the master delivers them in this order, without gaps
    text: Annotated[str, msgspec.Meta(max_length=MAX_TEXT_CHARS)]


class TaskFinished(msgspec.Struct, frozen=True, kw_only=True, tag="TaskFinished", tag_field="type"):
    node_id: NodeIdField
    task_id: TaskIdField
    instance_id: InstanceIdField
    finish_reason: FinishReason
    usage: Usage = Usage()
    # How many TaskChunk messages the task produced (indices 0..chunks-1): the master completes
    # the task only once it has delivered every one of them. None from workers that predate it.
    chunks: Count | None = None
    # The tool calls parsed from the output (their text is not among the chunks).
    tool_calls: ToolCalls = ()
    # The request's stop string that ended the answer (its text is not among the chunks); None when
    # the answer ended otherwise (the model's end token, max_tokens), and from older workers. The
    # master reports it only if it is one of the request's own stop strings.
    stop_sequence: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_STOP_CHARS)] | None = None

    def __post_init__(self) -> None:
        if self.stop_sequence is not None and self.finish_reason is not FinishReason.STOP:
            raise ValueError(f"a stop_sequence with finish_reason {self.finish_reason.value!r}")


class TaskFailed(msgspec.Struct, frozen=True, kw_only=True, tag="TaskFailed", tag_field="type"):
    node_id: NodeIdField
    task_id: TaskIdField
    instance_id: InstanceIdField
    reason: Reason
    # True when the worker never started the task (shutting down, instance not ready or unknown):
    # the master re-places it instead of failing the request.
    refused: bool = False
    # Why, for clients, when it is the request's fault: "context_length_exceeded" (HTTP 400, not
    # re-placed: every instance of the model would refuse it). INSTANCE_LOST: the instance itself
    # broke (a sharded instance lost a rank): the master re-places the task when no output reached
    # the client, else ends it with a 503. None: the worker's failure (500).
    code: Annotated[str, msgspec.Meta(max_length=64)] | None = None


INSTANCE_LOST = "instance_lost"


WorkerMessage = WorkerHeartbeat | TaskAccepted | TaskChunk | TaskFinished | TaskFailed


# ---- master -> worker ------------------------------------------------------------------------


class AssignTask(msgspec.Struct, frozen=True, kw_only=True, tag="AssignTask", tag_field="type"):
    task_id: TaskId
    node_id: NodeId
    instance_id: InstanceId
    params: TaskParams

    @property
    def kind(self) -> TaskKind:
        return self.params.KIND


class CancelTask(msgspec.Struct, frozen=True, kw_only=True, tag="CancelTask", tag_field="type"):
    task_id: TaskId
    node_id: NodeId
    instance_id: InstanceId


class MasterHeartbeat(msgspec.Struct, frozen=True, kw_only=True, tag="MasterHeartbeat", tag_field="type"):
    # A fresh id per master process: workers notice a restarted master by a new session.
    session: str
    interval: float = 1.0


class FetchOutput(msgspec.Struct, frozen=True, kw_only=True, tag="FetchOutput", tag_field="type"):
    """Send again this task's chunks from `from_index` on (and its final message if `final`): the
    master saw a gap, or the worker's snapshot says the task ended but its final never arrived."""

    task_id: TaskId
    node_id: NodeId
    instance_id: InstanceId
    from_index: int
    final: bool = True
    # The [start, end) ranges missing (end MAX_COUNT: to the end of the stream), lowest first. When
    # given, only these are sent again; an older worker ignores them and sends all from from_index.
    gaps: Annotated[tuple[tuple[Count, Count], ...], msgspec.Meta(max_length=MAX_GAPS_PER_FETCH)] = ()


class TaskAck(msgspec.Struct, frozen=True, kw_only=True, tag="TaskAck", tag_field="type"):
    """The master has the task's whole output and its end: the worker may forget them."""

    task_id: TaskId
    node_id: NodeId
    instance_id: InstanceId


class NodeRefused(msgspec.Struct, frozen=True, kw_only=True, tag="NodeRefused", tag_field="type"):
    """The master will not serve this node: the named incarnation ("" for any) must stop and say
    why (another live process has the id, the key may not use it, the node table is full)."""

    node_id: NodeId
    incarnation: str
    reason: str


class LoadInstance(msgspec.Struct, frozen=True, kw_only=True, tag="LoadInstance", tag_field="type"):
    """Load `model` as instance `instance_id` on this node. Idempotent: the master re-sends it until
    the node's heartbeat reports the instance; a worker that has it already does nothing."""

    node_id: NodeIdField
    instance_id: InstanceIdField
    model: ModelIdField
    placement: Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=MAX_CONCURRENCY)] = 4
    capacity: Annotated[float, msgspec.Meta(gt=0, le=MAX_CAPACITY)] = 1.0
    # One rank of a sharded instance; None: the whole model on this node.
    shard: ShardAssignment | None = None


class UnloadInstance(msgspec.Struct, frozen=True, kw_only=True, tag="UnloadInstance", tag_field="type"):
    """Unload this instance and free its memory. The master has drained it first (no new tasks, the
    ones in flight finished or their grace ran out). Idempotent: unknown instances are ignored."""

    node_id: NodeIdField
    instance_id: InstanceIdField


MasterMessage = (
    AssignTask
    | CancelTask
    | MasterHeartbeat
    | FetchOutput
    | TaskAck
    | NodeRefused
    | LoadInstance
    | UnloadInstance
)
Message = WorkerMessage | MasterMessage
