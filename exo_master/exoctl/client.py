"""exoctl's connection to the master's HTTP API, and how its failures become exit codes.

Two failures, two exit codes: `Unreachable` (down, wrong address, timeout: 2) and `ApiFailure`
(the master answered with an error, or with something that is not its API: 1). `connected()`
turns either into one readable line on stderr, never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
import typer

from protocol.cluster_view import ClusterView


class Unreachable(Exception):
    """The master did not answer (down, wrong address, timeout): exit code 2."""


class ApiFailure(Exception):
    """The master answered with an error, or with something that is not its API: exit code 1."""


class MasterClient:
    def __init__(self, api: str, timeout: float, api_key: str | None = None) -> None:
        self.base_url = (api if "://" in api else f"http://{api}").rstrip("/")
        self.timeout = timeout
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        except httpx.InvalidURL as exc:
            raise Unreachable(f"invalid --api URL {api!r}: {exc}") from None

    def close(self) -> None:
        self._http.close()

    def state(self, tasks: int = 0, status: str | None = None) -> ClusterView:
        params: dict[str, str | int] = {"tasks": tasks}
        if status is not None:
            params["status"] = status
        response = self._request("GET", "/v1/cluster/state", params=params)
        try:
            return msgspec.json.decode(response.content, type=ClusterView)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            raise ApiFailure(f"{self.base_url} did not answer with a cluster state: {exc}") from None

    def cancel(self, task_id: str) -> dict[str, Any]:
        response = self._request("POST", f"/v1/tasks/{quote(task_id, safe='')}/cancel")
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ApiFailure(f"{self.base_url} answered the cancel with something that is not JSON")
        return body

    def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        """Any API call whose answer is a JSON document (the /v1/instances routes)."""
        response = self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ApiFailure(
                f"{self.base_url} answered {method} {path} with something that is not JSON"
            ) from None

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise Unreachable(
                f"the master at {self.base_url} did not answer within {self.timeout:g} s"
            ) from None
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            reason = str(exc) or type(exc).__name__
            raise Unreachable(f"cannot reach the master at {self.base_url}: {reason}") from None
        except httpx.HTTPError as exc:  # an answer came, but not a usable one (decoding, redirects)
            raise ApiFailure(f"bad answer from {self.base_url}: {exc or type(exc).__name__}") from None
        if response.is_success:
            return response
        raise ApiFailure(error_message(response))


def error_message(response: httpx.Response) -> str:
    """The API's OpenAI-style error message, or a short description of what came back."""
    message = None
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
    except (ValueError, AttributeError):
        pass
    if message:
        return f"{message} (HTTP {response.status_code})"
    text = " ".join(response.text.split())[:200] or response.reason_phrase
    return f"HTTP {response.status_code} from the master: {text}"


@contextmanager
def connected(api: str, timeout: float, api_key: str | None = None) -> Iterator[MasterClient]:
    """A client whose failures become one stderr line and exit code 2 (unreachable) or 1 (error)."""
    client: MasterClient | None = None
    try:
        client = MasterClient(api, timeout, api_key)
        yield client
    except Unreachable as exc:
        typer.echo(f"exoctl: {exc}", err=True)
        raise typer.Exit(2) from None
    except ApiFailure as exc:
        typer.echo(f"exoctl: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        if client is not None:
            client.close()
