"""CURVE on the master's bus sockets: the ZAP authenticator over an authorized-keys directory.

pyzmq's `AsyncioAuthenticator` answers the ZAP requests on the master's own event loop (no thread,
so the counters need no lock). Its key check is `configure_curve_callback` with `AuthorizedKeys`
below rather than `configure_curve(location=DIR)`: the same `load_certificates(DIR)` underneath,
plus a hook that counts and logs each refusal with the key's fingerprint.

Node ids belong to keys: the file `NAME.key` in the directory admits its key as node id NAME only
(`owners`). Copies of one key under several names let one machine's key speak for several ids.

Reload: the directory is polled (every second: the names and mtimes of its `*.key` files) and
re-read on change, and SIGHUP re-reads it at once. A key added is admitted at its next connection
attempt; a key removed is refused from its next connection on (connections already authenticated
stay up until they drop: ZeroMQ authenticates a connection once, at its handshake).

Refusals that never reach ZAP (a plaintext peer, or a peer that holds the wrong master key, whose
handshake cannot even be decrypted) are seen by a socket monitor on both sockets and counted by
reason. No refused peer ever delivers a message, so none reaches the core.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from protocol.keys import PUBLIC_SUFFIX, KeyFileError, Keypair, fingerprint, load_keypair

log = structlog.get_logger("exo_master.bus.curve")

RELOAD_POLL_S = 1.0
# One log line per refused key per this many seconds: a refused peer retries for ever.
_LOG_EVERY_S = 30.0
_MAX_LOGGED_KEYS = 1024
# libzmq's ZMTP protocol error codes, as the monitor reports them (zmq.h).
_MECHANISM_MISMATCH = 0x11000002
_CRYPTOGRAPHIC = 0x11000001

Signature = tuple[tuple[str, int], ...]


class RefusalReason:
    UNKNOWN_KEY = "unknown_key"  # a CURVE client whose public key is not authorized
    NO_CURVE = "no_curve"  # a plaintext peer (no --secret-key / --master-key)
    BAD_HANDSHAKE = "bad_handshake"  # undecryptable hello: the peer holds the wrong master key
    # The peer hung up mid-handshake: usually a plaintext peer that saw the mismatch first (which
    # side notices first is a race), or one that went away.
    ABORTED = "aborted"
    PROTOCOL = "protocol"  # any other failed handshake


_HINTS = {
    RefusalReason.NO_CURVE: "a peer without CURVE keys: start the worker with --secret-key and --master-key",
    RefusalReason.BAD_HANDSHAKE: "a peer with the wrong master key: check its --master-key file",
    RefusalReason.ABORTED: "a peer hung up during the handshake (often one without CURVE keys)",
    RefusalReason.PROTOCOL: "a peer that does not speak this protocol",
}


@dataclass(slots=True)
class AuthCounters:
    refusals: dict[str, int] = field(default_factory=dict)
    admitted: int = 0
    reloads: int = 0

    def refuse(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1


class AuthorizedKeys:
    """The authorized public keys, re-read when the directory changes. The ZAP credentials provider."""

    def __init__(self, directory: Path, counters: AuthCounters) -> None:
        self.directory = directory
        self.counters = counters
        self.keys: frozenset[bytes] = frozenset()
        self.owners: dict[str, frozenset[str]] = {}  # z85 public key -> the node ids it may use
        self._signature: Signature | None = None
        self._last_logged: dict[str, float] = {}

    def _scan(self) -> Signature:
        entries = []
        try:
            with os.scandir(self.directory) as it:
                for entry in it:
                    if entry.name.endswith(PUBLIC_SUFFIX):
                        entries.append((entry.name, entry.stat().st_mtime_ns))
        except OSError:
            return ()
        return tuple(sorted(entries))

    def check(self) -> None:
        """Fail at start, in one line, when the directory cannot be read."""
        if not self.directory.is_dir():
            raise KeyFileError(f"authorized-keys directory {self.directory} does not exist")

    def reload_if_changed(self) -> bool:
        signature = self._scan()
        if signature == self._signature:
            return False
        self.reload(signature)
        return True

    def reload(self, signature: Signature | None = None) -> None:
        self._signature = signature if signature is not None else self._scan()
        try:
            loaded = zmq.auth.load_certificates(self.directory)
        except (OSError, ValueError) as exc:
            # A half-written or foreign file: keep the previous set rather than lock everyone out.
            log.error("bus.authorized_keys_unreadable", directory=str(self.directory), error=str(exc))
            self._signature = None  # try again at the next poll
            return
        self.keys = frozenset(loaded)
        self.owners = _owners(self.directory)
        self.counters.reloads += 1
        log.info(
            "bus.authorized_keys_loaded",
            directory=str(self.directory),
            keys=len(self.keys),
            fingerprints=sorted(fingerprint(k) for k in self.keys)[:32],
        )

    def names_of(self, z85_key: str) -> frozenset[str]:
        """The node ids a key may use: the names of its files in the directory."""
        return self.owners.get(z85_key, frozenset())

    def callback(self, domain: str, z85_key: bytes) -> bool:
        """ZAP: admit the key? Refusals are counted and logged (rate-limited per key)."""
        if z85_key in self.keys:
            self.counters.admitted += 1
            return True
        self.counters.refuse(RefusalReason.UNKNOWN_KEY)
        fp = fingerprint(z85_key)
        now = time.monotonic()
        last = self._last_logged.get(fp)
        if last is None or now - last > _LOG_EVERY_S:
            if len(self._last_logged) >= _MAX_LOGGED_KEYS:
                self._last_logged.clear()  # bounded: forgetting only means logging again
            self._last_logged[fp] = now
            log.warning(
                "bus.refused",
                reason=RefusalReason.UNKNOWN_KEY,
                fingerprint=fp,
                hint=f"to admit it, copy its public key file into {self.directory}",
            )
        return False


def _owners(directory: Path) -> dict[str, frozenset[str]]:
    names: dict[str, set[str]] = {}
    for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")):
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError):
            continue  # unreadable: load_certificates above decided whether that is fatal
        names.setdefault(public.decode(), set()).add(path.name.removesuffix(PUBLIC_SUFFIX))
    return {key: frozenset(ids) for key, ids in names.items()}


class MasterCurve:
    """The master's CURVE server side: its keypair, the authenticator, the monitors, the reloads."""

    def __init__(self, keypair: Keypair, authorized_dir: Path) -> None:
        self.keypair = keypair
        self.counters = AuthCounters()
        self.authorized = AuthorizedKeys(authorized_dir, self.counters)
        self.authorized.check()
        self._auth: AsyncioAuthenticator | None = None
        self._monitors: list[zmq.asyncio.Socket] = []

    @property
    def fingerprint(self) -> str:
        return self.keypair.fingerprint

    def secure(self, sock: zmq.Socket[Any]) -> None:
        """Make a socket a CURVE server; call before bind."""
        sock.curve_secretkey = self.keypair.secret
        sock.curve_publickey = self.keypair.public
        sock.curve_server = True

    def start(self, ctx: zmq.asyncio.Context) -> None:
        """Start the ZAP handler on the running loop (before any peer can connect)."""
        self.authorized.reload()
        self._auth = AsyncioAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback("*", self.authorized)

    def monitor(self, sock: zmq.asyncio.Socket) -> None:
        events = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        self._monitors.append(sock.get_monitor_socket(events))

    async def watch(self) -> None:
        """Poll the directory for changes and the monitors for failed handshakes, until cancelled."""
        await asyncio.gather(self._poll_directory(), *(self._watch_monitor(m) for m in self._monitors))

    async def _poll_directory(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_POLL_S)  # a poll period, not a synchronisation
            self.authorized.reload_if_changed()

    async def _watch_monitor(self, mon: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await mon.recv_multipart())
            # ZAP refusals (HANDSHAKE_FAILED_AUTH) are counted by the callback, with their key.
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                reason = {
                    _MECHANISM_MISMATCH: RefusalReason.NO_CURVE,
                    _CRYPTOGRAPHIC: RefusalReason.BAD_HANDSHAKE,
                }.get(event["value"], RefusalReason.PROTOCOL)
            else:
                reason = RefusalReason.ABORTED
            self.counters.refuse(reason)
            total = self.counters.refusals[reason]
            if total & (total - 1) == 0:  # 1, 2, 4, 8...: visible, never a flood
                log.warning("bus.refused", reason=reason, total=total, hint=_HINTS[reason])

    def reload(self) -> None:
        """SIGHUP: re-read the authorized keys now."""
        log.info("bus.reload_requested")
        self.authorized.reload()

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        for mon in self._monitors:
            mon.close(linger=0)
        self._monitors.clear()


SETUP_HINT = (
    "run `exoctl keys generate master` and `exoctl keys generate NAME` per worker, copy each worker's "
    "NAME.key into ~/.config/exo/keys/authorized/, then start `exo-master --secret-key "
    "~/.config/exo/keys/master.key_secret --authorized-keys ~/.config/exo/keys/authorized` "
    "(or pass --insecure to run without encryption)"
)


def is_loopback(host: str) -> bool:
    """True for loopback addresses and `localhost`; any other name counts as reachable from outside."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_master_curve(secret_key: Path | None, authorized_keys: Path | None) -> MasterCurve | None:
    """The CURVE set-up from the command line; KeyFileError (one line) when it is half given or bad."""
    if secret_key is None and authorized_keys is None:
        return None
    if secret_key is None or authorized_keys is None:
        raise KeyFileError("CURVE needs both --secret-key FILE and --authorized-keys DIR")
    return MasterCurve(load_keypair(secret_key), authorized_keys)
