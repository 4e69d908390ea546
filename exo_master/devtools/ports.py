"""The ports a local cluster binds: checks, suggestions and free picks.

A cluster binds three: the HTTP API, and the bus's pair (master to workers on p, workers to master
on p + 1). Free ports are picked by binding port 0 and reading what the kernel chose; each pick
keeps its socket until every port of the cluster is chosen, because a released port can be handed
out again at once (two separate picks once gave the API and the bus the same port, and the master
could not start).
"""

from __future__ import annotations

import contextlib
import socket


class ClusterStartError(RuntimeError):
    pass


class PortInUse(ClusterStartError):
    """A port the cluster needs is taken (by another cluster, most likely). Nothing was started."""

    def __init__(self, host: str, port: int, role: str) -> None:
        super().__init__(f"port {port} ({role}) on {host} is already in use")
        self.host, self.port, self.role = host, port, role


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_is_free(host: str, port: int) -> bool:
    """True when a listener could bind host:port now.

    SO_REUSEADDR as the master's sockets (uvicorn's and ZeroMQ's) use it: a port that only has
    connections in TIME_WAIT from a cluster that just stopped counts as free, a listening one not.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def cluster_ports(api_port: int, bus_port: int) -> list[tuple[int, str]]:
    """Every port a cluster binds, with what it is for."""
    return [
        (api_port, "HTTP API"),
        (bus_port, "bus, master to workers"),
        (bus_port + 1, "bus, workers to master"),
    ]


def check_ports(host: str, api_port: int, bus_port: int) -> None:
    """Raise PortInUse for the first of a cluster's ports that is taken."""
    for port, role in cluster_ports(api_port, bus_port):
        if not port_is_free(host, port):
            raise PortInUse(host, port, role)


def suggest_ports(host: str, api_port: int, bus_port: int, step: int = 10) -> tuple[int, int]:
    """The first (API, bus) ports past the given ones, `step` apart, that are all free now."""
    for shift in range(step, 100 * step, step):
        api, bus = api_port + shift, bus_port + shift
        if bus + 1 < 65536 and all(port_is_free(host, p) for p, _ in cluster_ports(api, bus)):
            return api, bus
    return free_cluster_ports(host)


def _hold(held: contextlib.ExitStack, host: str, port: int) -> int:
    """Bind host:port (0: any) on a socket kept open until `held` closes; the port bound."""
    s = held.enter_context(socket.socket(_family(host), socket.SOCK_STREAM))
    s.bind((host, port))
    return int(s.getsockname()[1])


def _hold_pair(held: contextlib.ExitStack, host: str) -> int:
    for _ in range(100):
        port = _hold(held, host, 0)
        if port < 65535:
            with contextlib.suppress(OSError):
                _hold(held, host, port + 1)
                return port
    raise ClusterStartError("no free pair of ports found")


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.ExitStack() as held:
        return _hold(held, host, 0)


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port p such that p and p + 1 are both free right now (the bus uses two)."""
    with contextlib.ExitStack() as held:
        return _hold_pair(held, host)


def free_cluster_ports(host: str = "127.0.0.1", api_port: int = 0, bus_port: int = 0) -> tuple[int, int]:
    """(API, bus) ports, the given ones kept and the others free now, no two of the three alike."""
    with contextlib.ExitStack() as held:
        for given in (api_port, bus_port, bus_port + 1 if bus_port else 0):
            if given:  # held too, so no pick lands on it (it is the caller's to check)
                with contextlib.suppress(OSError):
                    _hold(held, host, given)
        api = api_port or _hold(held, host, 0)
        bus = bus_port or _hold_pair(held, host)
        return api, bus


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different ports, all free now (for ring ranks and their control channel)."""
    with contextlib.ExitStack() as held:
        return [_hold(held, host, 0) for _ in range(count)]
