"""Whether and how the master advertises its bus on the LAN (DNS-SD, `protocol.mdns`).

On by default when the bus is reachable from other machines (`--bus-host`/`--host` other than
loopback), since that is when a worker elsewhere needs to find it; off for a loopback-only master,
which no other machine can join, unless `--advertise` asks for it (tests, or workers on the same
host). `--no-advertise` turns it off everywhere.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

import structlog
import zeroconf

from exo_master.bus.curve import is_loopback
from protocol.discovery import Advert
from protocol.mdns import Advertiser, interfaces_for, lan_addresses
from protocol.version import package_version

log = structlog.get_logger("exo_master")


@dataclass(frozen=True, slots=True)
class AdvertiseSettings:
    wanted: bool | None  # --advertise / --no-advertise; None: by the bus address
    cluster: str


def host_label() -> str:
    """This host's short name, as a DNS label."""
    label = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return label[:40] or "host"


def plan_advertiser(
    settings: AdvertiseSettings,
    bus_host: str,
    bus_port: int,
    api_port: int,
    key_fingerprint: str | None,
    session: str,
) -> tuple[Advertiser | None, str]:
    """The advertiser to start (or None), and why, for the master's start-up log line."""
    if settings.wanted is False:
        return None, "--no-advertise"
    if settings.wanted is None and is_loopback(bus_host):
        return None, "the bus listens on loopback only (--advertise to announce it anyway)"
    if ":" in bus_host and bus_host != "::":
        return None, "the announcement covers IPv4 buses only (workers need --master)"
    interfaces = interfaces_for("127.0.0.1" if bus_host.lower() == "localhost" else bus_host)
    addresses = lan_addresses() if interfaces is None else interfaces
    if not addresses:
        return None, "this host has no network address to announce"
    label = host_label()
    advert = Advert(
        name=f"{settings.cluster}@{label}",
        cluster=settings.cluster,
        addresses=tuple(addresses),
        bus_port=bus_port,
        api_port=api_port,
        key=key_fingerprint,
        session=session,
        version=package_version(),
    )
    session_label = re.sub(r"[^a-z0-9-]+", "-", session.lower())[:12]
    return Advertiser(advert, interfaces, f"exo-{label}-{session_label}"), "advertising"


async def announce(advertiser: Advertiser) -> None:
    """Register on mDNS; a failure is a warning (workers can still be given --master), never a crash."""
    try:
        await advertiser.start()
    except (OSError, zeroconf.Error) as exc:
        log.warning("master.advertise_failed", error=str(exc), note="workers need --master HOST:PORT")
        return
    advert = advertiser.advert
    log.info(
        "master.advertised",
        name=advertiser.name,
        cluster=advert.cluster,
        addresses=list(advert.addresses),
        bus_port=advert.bus_port,
        master_key=advert.key,
    )
