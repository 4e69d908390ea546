"""CURVE on the worker's bus sockets, and one clear line when the master refuses the handshake.

A CURVE client needs its own keypair and the master's public key. A failed handshake is silent in
ZeroMQ (it just reconnects), so a socket monitor watches both sockets and says what went wrong:
- the master refused this worker's key (ZAP answered 400): its public key is not authorized;
- the handshake broke before that: the master key configured here is not the master's;
- the master speaks plaintext, or the other way round.
- the address does not speak the bus protocol at all (an HTTP server: the master's API port).
A failure that could be any of these is told apart by a probe: a plain TCP connection that sends a
ZMTP greeting and reads what comes back (the master's greeting names its mechanism, NULL or
CURVE; an HTTP server answers "HTTP/1.1 400"). Each is logged once, and again only after a
handshake succeeded in between (no flood while it retries).

A refusal by ZAP ends the connection for good in libzmq (a protocol error: it never reconnects on
its own), so the worker re-dials itself with capped exponential backoff: a worker whose key is
added to the master's directory later gets in without a restart. The other failures are plain
disconnects, which libzmq retries with the socket's own reconnect backoff.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from protocol.keys import KeyFileError, Keypair, fingerprint, load_keypair, load_public

log = structlog.get_logger("exo_worker.bus_auth")

_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_MECHANISM_MISMATCH = 0x11000002
_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
)


@dataclass(frozen=True, slots=True)
class ClientCurve:
    keypair: Keypair
    master_public: bytes

    def secure(self, sock: zmq.Socket[Any]) -> None:
        """Make a socket a CURVE client of the master; call before connect."""
        sock.curve_secretkey = self.keypair.secret
        sock.curve_publickey = self.keypair.public
        sock.curve_serverkey = self.master_public


def describe_failure(curve: ClientCurve | None, event: int, value: int) -> tuple[str, str] | None:
    """(event name, one-line explanation) for a failed handshake; None for anything else."""
    if event not in _FAILURES:
        return None
    if curve is None:  # a plaintext worker fails a handshake only against a CURVE master
        return (
            "bus.master_requires_curve",
            "the master requires CURVE keys: start this worker with --secret-key and --master-key "
            "(make them with `exoctl keys generate NAME`)",
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            "bus.key_not_authorized",
            f"the master refused this worker's key {curve.keypair.fingerprint}: copy this worker's "
            "NAME.key file into the master's --authorized-keys directory",
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == _MECHANISM_MISMATCH:
        return (
            "bus.master_not_curve",
            "the master does not use CURVE: start it with --secret-key and --authorized-keys, "
            "or start this worker without keys",
        )
    return (
        "bus.wrong_master_key",
        f"the master rejected the handshake: the configured master key {fingerprint(curve.master_public)} "
        "is not the master's key (check --master-key; the master logs its own fingerprint at start)",
    )


_ZMTP_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32


def probe_peer(endpoint: str, timeout: float = 2.0) -> str:
    """What answers at a tcp:// endpoint: "zmtp:NULL", "zmtp:CURVE", "http", "other" or "closed"."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    reply = b""
    try:
        conn = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except (OSError, ValueError):
        return "closed"
    with conn:
        try:
            conn.sendall(_ZMTP_GREETING[:11])  # signature and major version: a ZMTP peer answers
            reply = conn.recv(64)
            if reply.startswith(b"\xff"):
                conn.sendall(_ZMTP_GREETING[11:])
                while len(reply) < 64 and (chunk := conn.recv(64 - len(reply))):
                    reply += chunk
        except OSError:
            pass  # reset or timed out: judge by what came, if anything
    return _classify(reply)


def _classify(reply: bytes) -> str:
    if reply.startswith(b"HTTP/"):
        return "http"
    if len(reply) >= 10 and reply[0] == 0xFF and reply[9] == 0x7F:
        mechanism = reply[12:32].rstrip(b"\x00").decode(errors="replace") if len(reply) >= 32 else "?"
        return f"zmtp:{mechanism}"
    return "closed" if not reply else "other"


def explain_probe(curve: ClientCurve | None, endpoint: str, found: str) -> tuple[str, str] | None:
    """(event, line) when the probe explains a failed handshake better than its event; else None."""
    if found in ("http", "other"):
        what = "answers HTTP" if found == "http" else "does not speak the ZeroMQ bus protocol"
        return (
            "bus.not_a_bus_port",
            f"{endpoint.removeprefix('tcp://')} {what}: it is not the master's bus (the API port, perhaps); "
            "point --master at the master's bus port (exo-master --bus-port, default 52416)",
        )
    if found == "zmtp:NULL" and curve is not None:
        return describe_failure(curve, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, _MECHANISM_MISMATCH)
    return None


def load_client_curve(secret_key: Path | None, master_key: Path | None) -> ClientCurve | None:
    if secret_key is None and master_key is None:
        return None
    if secret_key is None or master_key is None:
        raise KeyFileError("CURVE needs both --secret-key FILE and --master-key FILE")
    return ClientCurve(keypair=load_keypair(secret_key), master_public=load_public(master_key))


async def watch_handshakes(
    curve: ClientCurve | None,
    monitor: zmq.asyncio.Socket,
    bound: Any,
    redial: Callable[[], None],
    reported: set[str],
    backoff: tuple[float, float] = (0.5, 10.0),
    endpoint: str | None = None,
) -> None:
    """Log failed handshakes on one socket (once per kind, in `reported`, shared by the worker's
    sockets, until one succeeds) and re-dial after a refusal; until cancelled."""
    delay = backoff[0]
    while True:
        event = parse_monitor_message(await monitor.recv_multipart())
        if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if reported:
                bound.info("bus.handshake_ok")
            reported.clear()
            delay = backoff[0]
            continue
        failure = describe_failure(curve, event["event"], event["value"])
        if failure is not None and endpoint is not None and event["event"] != zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            if not reported:  # once per run of failures: a probe is a connection of its own
                found = await asyncio.to_thread(probe_peer, endpoint)
                failure = explain_probe(curve, endpoint, found) or failure
            else:
                failure = None  # already said
        if failure is not None and failure[0] not in reported:
            reported.add(failure[0])
            bound.error(failure[0], error=failure[1])
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            await asyncio.sleep(delay)  # retry backoff before dialling again
            delay = min(delay * 2, backoff[1])
            redial()


def monitor_socket(sock: zmq.Socket[Any], ctx: zmq.asyncio.Context) -> zmq.asyncio.Socket:
    """An asyncio PAIR connected to the socket's monitor (works for the blocking PUB too)."""
    address = f"inproc://monitor.{id(sock):x}"
    sock.monitor(address, _EVENTS)
    mon = ctx.socket(zmq.PAIR)
    mon.connect(address)
    return mon


__all__ = ["ClientCurve", "KeyFileError", "load_client_curve", "monitor_socket", "watch_handshakes"]
