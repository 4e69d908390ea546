"""/v1/instances: where models live. Place a model's replicas, list and show placements, delete
(drain, then unload), and preview where a placement would go and why. Registered by the daemon
in the route table (`routes`, listed in `api.api_routes`); the API key applies as everywhere.

    POST   /v1/instances              {"model", "replicas", "nodes", "exclude", "max_concurrency",
                                       "capacity", "shards", "sharding"}
                                       -> 201 the placement | 409 a reason per node (and problem)
    GET    /v1/instances              {"data": [placement, ...]}
    GET    /v1/instances/preview?model=M&replicas=N&node=A&exclude=B&shards=K&sharding=tensor
    GET    /v1/instances/{id}         one placement, with its recent steps
    DELETE /v1/instances/{id}         drains it (in-flight requests finish), then unloads it
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from exo_master.core.instances.desired import MAX_NODE_FILTER, MAX_REPLICAS, PlacementSpec
from exo_master.core.instances.view import placement_rows, plan_view
from exo_master.http.api import Api
from exo_master.http.decoding import decode_json
from exo_master.http.errors import ApiError, error_body, invalid
from exo_master.http.routes import ApiRoute
from exo_master.runtime import MasterRuntime
from protocol.instance_view import PlacementRow
from protocol.messages import MAX_CAPACITY, MAX_CONCURRENCY, MAX_ID_CHARS
from protocol.sharding import MAX_SHARDS, Sharding

_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
_Names = Annotated[list[_Name], msgspec.Meta(max_length=MAX_NODE_FILTER)]
_EVENTS_SHOWN = 50


class PlaceRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: _Name
    replicas: Annotated[int, msgspec.Meta(ge=1, le=MAX_REPLICAS)] = 1
    nodes: _Names = []
    exclude: _Names = []
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=MAX_CONCURRENCY)] = 4
    capacity: Annotated[float, msgspec.Meta(gt=0, le=MAX_CAPACITY)] = 1.0
    shards: Annotated[int, msgspec.Meta(ge=1, le=MAX_SHARDS)] = 1
    sharding: Sharding = Sharding.TENSOR


def _json(body: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def new_placement_id(model: str) -> str:
    """Readable and never reused: the model's last path part, slugged, plus 6 random hex digits."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.rsplit("/", 1)[-1].lower()).strip("-")[:40] or "model"
    return f"{slug}-{secrets.token_hex(3)}"


class InstancesApi:
    def __init__(self, runtime: MasterRuntime) -> None:
        self.runtime = runtime

    def _spec(self, req: PlaceRequest, placement_id: str) -> PlacementSpec:
        return PlacementSpec(
            placement_id=placement_id,
            model=req.model,
            replicas=req.replicas,
            nodes=tuple(req.nodes),
            exclude=tuple(req.exclude),
            max_concurrency=req.max_concurrency,
            capacity=req.capacity,
            shards=req.shards,
            sharding=req.sharding,
        )

    def _rows(self, events: int = 0) -> list[PlacementRow]:
        core = self.runtime.core
        return placement_rows(core.instances, core.state, self.runtime.clock(), events)

    def _row(self, placement_id: str) -> PlacementRow:
        for row in self._rows(_EVENTS_SHOWN):
            if row.id == placement_id:
                return row
        raise ApiError(
            404, f"no instance {placement_id!r}", "invalid_request_error", code="instance_not_found"
        )

    def _saved(self) -> None:
        save = self.runtime.save_desired
        if save is not None:
            save(self.runtime.core.instances.specs())

    async def place(self, request: Request) -> Response:
        req = decode_json(await request.body(), PlaceRequest)
        spec = self._spec(req, new_placement_id(req.model))
        plan = self.runtime.place_instances(spec)
        if not plan.complete:
            view = plan_view(spec, plan)
            fit = f"{len(plan.chosen)} of {req.replicas}" if plan.chosen else "none"
            what = f"{req.replicas} replica(s) of {req.model!r}"
            if req.shards > 1:
                what += f" in {req.shards} {req.sharding.value} shards"
            message = f"{what} do not fit ({fit} would): {plan.why()}"
            code = "cannot_shard" if plan.problems else "insufficient_memory"
            body = error_body(message, "placement_error", code=code)
            body["error"]["reasons"] = view.reasons
            body["placement"] = msgspec.to_builtins(view)
            return _json(body, 409)
        self._saved()
        return _json(self._row(spec.placement_id), 201)

    async def list(self, request: Request) -> Response:
        return _json({"object": "list", "data": self._rows()})

    async def show(self, request: Request) -> Response:
        return _json(self._row(request.path_params["instance_id"]))

    async def delete(self, request: Request) -> Response:
        placement_id = request.path_params["instance_id"]
        row = self._row(placement_id)
        if not row.managed:
            raise ApiError(
                409,
                f"{placement_id} was declared by its worker (--model), not placed by the master: "
                "stop that worker, or restart it without --model",
                "invalid_request_error",
                code="unmanaged_instance",
            )
        self.runtime.delete_instances(placement_id)
        self._saved()
        return _json(
            self._row(placement_id) if placement_id in self.runtime.core.instances.placements else row
        )

    async def preview(self, request: Request) -> Response:
        query = request.query_params
        model = query.get("model")
        if not model:
            raise invalid("'model' is required", param="model", code="missing_required_parameter")
        raw = {
            "model": model,
            "replicas": query.get("replicas", "1"),
            "nodes": query.getlist("node"),
            "exclude": query.getlist("exclude"),
            "max_concurrency": query.get("max_concurrency", "4"),
            "shards": query.get("shards", "1"),
            "sharding": query.get("sharding", "tensor"),
        }
        try:
            req = msgspec.convert(raw, PlaceRequest, strict=False)
        except msgspec.ValidationError as exc:
            raise invalid(f"invalid query: {exc}") from exc
        spec = self._spec(req, "preview")
        return _json(plan_view(spec, self.runtime.core.instances.preview(spec)))


def routes(api: Api) -> list[ApiRoute]:
    """The /v1/instances surface, registered through `api_routes`; placements are saved through
    `runtime.save_desired` (set by the daemon under --state-dir)."""
    handlers = InstancesApi(api.runtime)
    return [
        ApiRoute("POST", "/v1/instances", handlers.place),
        ApiRoute("GET", "/v1/instances", handlers.list),
        ApiRoute("GET", "/v1/instances/preview", handlers.preview),
        ApiRoute("GET", "/v1/instances/{instance_id:path}", handlers.show),
        ApiRoute("DELETE", "/v1/instances/{instance_id:path}", handlers.delete),
    ]
