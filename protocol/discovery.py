"""What a master advertises on the LAN (DNS-SD over mDNS), and how a worker picks one. Pure.

A master registers one `_exo-master._tcp` service. Its TXT record carries what a worker needs to
join and to check it joins the right master:

    v=1  cluster=NAME  bus=PORT  bus_in=PORT  api=PORT  key=FINGERPRINT  session=ID  version=X.Y.Z

`key` is the fingerprint of the master's CURVE public key (`protocol.keys.fingerprint`), absent
on a plaintext bus. A worker that has a master key file compares it with the advertised one before
connecting: discovery tells it where to go, never whom to trust. Anything on the LAN can answer
mDNS, so every field is parsed with bounds and a record that does not parse is ignored.

The zeroconf side (registering, browsing) is in `protocol.mdns`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SERVICE_TYPE = "_exo-master._tcp.local."
RECORD_VERSION = "1"
DEFAULT_CLUSTER = "exo"
_CLUSTER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")
_SESSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_VERSION = re.compile(r"^[A-Za-z0-9.+_-]{1,32}$")
MAX_NAME = 255  # a DNS-SD instance name is at most 63 bytes; this bounds what a peer may send


class DiscoveryError(RuntimeError):
    """No master (or no single one) to join: one line for the user."""


def check_cluster(name: str) -> str:
    if not _CLUSTER.match(name):
        raise ValueError(
            f"a cluster name is 1 to 63 letters, digits, '.', '_' or '-' (starting with a letter or "
            f"digit), got {name!r}"
        )
    return name


@dataclass(frozen=True, slots=True)
class Advert:
    """One master as seen on the LAN."""

    name: str  # the DNS-SD instance name, e.g. "exo@studio"
    cluster: str
    addresses: tuple[str, ...]  # IPv4 first
    bus_port: int
    api_port: int
    key: str | None  # CURVE public key fingerprint; None: plaintext bus
    session: str = ""
    version: str = ""

    @property
    def address(self) -> str:
        return self.addresses[0]

    @property
    def bus(self) -> str:
        """HOST:PORT as `exo-worker --master` takes it."""
        host = self.address
        return f"[{host}]:{self.bus_port}" if ":" in host else f"{host}:{self.bus_port}"

    @property
    def api(self) -> str:
        host = self.address
        return f"http://[{host}]:{self.api_port}" if ":" in host else f"http://{host}:{self.api_port}"

    def properties(self) -> dict[str, str]:
        """The TXT record."""
        props = {
            "v": RECORD_VERSION,
            "cluster": self.cluster,
            "bus": str(self.bus_port),
            "bus_in": str(self.bus_port + 1),
            "api": str(self.api_port),
            "session": self.session,
            "version": self.version,
        }
        if self.key is not None:
            props["key"] = self.key
        return props


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _port(value: str | None) -> int | None:
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 5:
        return None
    port = int(value)
    return port if 1 <= port <= 65534 else None


def parse_advert(
    name: str, addresses: Iterable[str], properties: Mapping[bytes, bytes | None] | Mapping[str, str | None]
) -> Advert | None:
    """The advert in a resolved service, or None when it is not a usable exo master record."""
    props = {_text(k): _text(v) for k, v in properties.items()}
    if props.get("v") != RECORD_VERSION or len(name) > MAX_NAME:
        return None
    cluster = props.get("cluster") or ""
    bus_port, api_port = _port(props.get("bus")), _port(props.get("api"))
    key = props.get("key")
    session = props.get("session") or ""
    version = props.get("version") or ""
    if not _CLUSTER.match(cluster) or bus_port is None or api_port is None:
        return None
    if key is not None and not _FINGERPRINT.match(key):
        return None
    if (session and not _SESSION.match(session)) or (version and not _VERSION.match(version)):
        return None
    ips = []
    for text in addresses:
        try:
            ips.append(ipaddress.ip_address(text))
        except ValueError:
            continue
    if not ips:
        return None
    ips.sort(key=lambda ip: (ip.version, ip.is_loopback))  # IPv4 first, a LAN address before loopback
    return Advert(
        name=name.removesuffix("." + SERVICE_TYPE),
        cluster=cluster,
        addresses=tuple(str(ip) for ip in ips[:8]),
        bus_port=bus_port,
        api_port=api_port,
        key=key,
        session=session,
        version=version,
    )


def choose(adverts: Iterable[Advert], cluster: str | None) -> Advert:
    """The master to join: the only one seen, or the one of `cluster`; else a DiscoveryError."""
    seen = sorted(adverts, key=lambda a: (a.cluster, a.name))
    if cluster is not None:
        seen = [a for a in seen if a.cluster == cluster]
    if not seen:
        where = f" for cluster {cluster!r}" if cluster is not None else ""
        raise DiscoveryError(
            f"no exo master answered on the LAN{where} (is it started with --host 0.0.0.0, or "
            "--advertise? is multicast allowed here?); pass --master HOST:PORT to skip discovery"
        )
    clusters = sorted({a.cluster for a in seen})
    if len(clusters) > 1:
        raise DiscoveryError(f"several clusters answer ({', '.join(clusters)}): pick one with --cluster NAME")
    if len({a.session or a.name for a in seen}) > 1:
        names = ", ".join(a.name for a in seen)
        raise DiscoveryError(
            f"several masters advertise cluster {clusters[0]!r} ({names}): stop one, or pass --master"
        )
    return seen[0]


def check_key(advert: Advert, expected: str | None) -> None:
    """Refuse a master whose advertised key is not the one this worker trusts (or is missing)."""
    if expected is None:
        if advert.key is not None:
            raise DiscoveryError(
                f"master {advert.name} runs CURVE (key {advert.key}): pass this worker's "
                "--secret-key and the master's --master-key"
            )
        return
    if advert.key is None:
        raise DiscoveryError(
            f"master {advert.name} advertises a plaintext bus, but this worker expects master key "
            f"{expected}: refusing to join it"
        )
    if advert.key != expected:
        raise DiscoveryError(
            f"master {advert.name} advertises key {advert.key}, not {expected} from --master-key: "
            "refusing to join it (another master on the LAN, or an impostor)"
        )
