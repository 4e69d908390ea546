"""The cluster's own routes: liveness, readiness, the state view, operator cancels."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from exo_master.http.api import Api
from exo_master.http.errors import ApiError, error_body, invalid
from exo_master.http.routes import ApiRoute
from protocol.cluster_view import TaskStatus
from protocol.ids import TaskId
from protocol.messages import InstanceStatus

_json = msgspec.json.Encoder()
# Task rows /v1/cluster/state returns at most (the view is built on the event loop).
MAX_TASK_ROWS = 10_000


class ClusterRoutes:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.runtime = api.runtime

    async def health(self, request: Request) -> Response:
        """Liveness: the master answers. Whether it can serve is /ready."""
        view = self.runtime.view()
        return JSONResponse(
            {
                "status": "ok",
                "session": view.session,
                "policy": view.policy,
                "nodes_alive": sum(1 for n in view.nodes if n.alive),
                "instances_ready": sum(1 for i in view.instances if i.status == InstanceStatus.READY),
            }
        )

    async def ready(self, request: Request) -> Response:
        """Readiness: 200 while at least one instance is ready, else 503 with the reason."""
        view = self.runtime.view()
        ready = sum(1 for i in view.instances if i.status == InstanceStatus.READY)
        alive = sum(1 for n in view.nodes if n.alive)
        if self.api.stopping is not None:
            reason = self.api.stopping
        elif ready:
            return JSONResponse({"status": "ready", "instances_ready": ready, "nodes_alive": alive})
        elif not alive:
            reason = "no worker node is alive"
        else:
            counts = {str(s): sum(1 for i in view.instances if i.status == s) for s in InstanceStatus}
            reason = (
                f"no instance is ready ({alive} nodes alive; instances: {counts['loading']} loading, "
                f"{counts['failed']} failed)"
            )
        body = error_body(reason, "service_unavailable", code="not_ready")
        return JSONResponse({**body, "status": "not_ready", "instances_ready": 0, "nodes_alive": alive}, 503)

    async def cluster_state(self, request: Request) -> Response:
        raw_limit = request.query_params.get("tasks", "500")
        limit = int(raw_limit) if raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 6 else -1
        if not 0 <= limit <= MAX_TASK_ROWS:
            raise invalid(f"query parameter 'tasks' must be an integer from 0 to {MAX_TASK_ROWS}", "tasks")
        raw_status = request.query_params.get("status")
        try:
            status = TaskStatus(raw_status) if raw_status is not None else None
        except ValueError as exc:
            raise invalid(
                f"query parameter 'status' must be one of {', '.join(TaskStatus)}", "status"
            ) from exc
        view = self.runtime.view(task_limit=limit, status=status)
        return Response(_json.encode(view), media_type="application/json")

    async def cancel_task(self, request: Request) -> Response:
        task_id = TaskId(request.path_params["task_id"])
        if not self.runtime.cancel(task_id, "cancelled by operator"):
            raise ApiError(404, f"no live task {task_id}", "invalid_request_error", code="task_not_found")
        return JSONResponse({"task_id": task_id, "cancelled": True})


def routes(api: Api) -> list[ApiRoute]:
    cluster = ClusterRoutes(api)
    return [
        ApiRoute("GET", "/health", cluster.health),
        ApiRoute("GET", "/ready", cluster.ready),
        ApiRoute("GET", "/v1/cluster/state", cluster.cluster_state),
        ApiRoute("POST", "/v1/tasks/{task_id}/cancel", cluster.cancel_task),
    ]
