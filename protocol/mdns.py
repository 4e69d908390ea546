"""DNS-SD over mDNS with python-zeroconf: a master registers its advert, workers and exoctl browse.

The only network code in `protocol/`, shared by the three commands as `keys` shares key files.
The record itself (fields, parsing, which master to pick) is pure, in `protocol.discovery`.

Interfaces: by default zeroconf answers and asks on every IPv4 interface. A master whose bus is
bound to one address advertises on that interface only; one bound to loopback (only with
`--advertise`) advertises on 127.0.0.1, and a browser limited to 127.0.0.1 finds it: Linux
delivers multicast on `lo` to sockets bound there even though the interface has no MULTICAST flag
(checked on this project's Linux machines), so tests never send a packet off the host.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Sequence

import ifaddr
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncZeroconf

from protocol.discovery import SERVICE_TYPE, Advert, parse_advert

RESOLVE_MS = 1500
MAX_SEEN = 64  # services a browse keeps: anything on the LAN can answer


def interfaces_for(bind_host: str) -> list[str] | None:
    """Where a master bound to `bind_host` advertises: None means every interface."""
    if bind_host in ("0.0.0.0", "", "*", "::"):
        return None
    return [bind_host]


def lan_addresses() -> list[str]:
    """This host's IPv4 addresses other than loopback (advertised by a master bound to 0.0.0.0)."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                found.append(ip.ip)
    return sorted(set(found))


def _zeroconf_kwargs(interfaces: Sequence[str] | None) -> dict[str, object]:
    kwargs: dict[str, object] = {"ip_version": IPVersion.V4Only}
    if interfaces:
        kwargs["interfaces"] = list(interfaces)
    return kwargs


def service_info(advert: Advert, host_label: str) -> ServiceInfo:
    return ServiceInfo(
        SERVICE_TYPE,
        f"{advert.name}.{SERVICE_TYPE}",
        addresses=[socket.inet_aton(a) for a in advert.addresses if "." in a],
        port=advert.bus_port,
        properties=advert.properties(),
        server=f"{host_label}.local.",
    )


class Advertiser:
    """The master's registration, on its event loop: `await start()`, then `await stop()`."""

    def __init__(self, advert: Advert, interfaces: Sequence[str] | None, host_label: str) -> None:
        self.advert = advert
        self.interfaces = interfaces
        self.info = service_info(advert, host_label)
        self._zc: AsyncZeroconf | None = None

    @property
    def name(self) -> str:
        """The registered instance name (zeroconf renames it on a conflict)."""
        return self.info.name.removesuffix("." + SERVICE_TYPE)

    async def start(self) -> None:
        self._zc = AsyncZeroconf(**_zeroconf_kwargs(self.interfaces))  # type: ignore[arg-type]
        # Probing (about 1.5 s) is part of the registration: the caller runs this as a task.
        await self._zc.async_register_service(self.info, allow_name_change=True)

    async def stop(self) -> None:
        if self._zc is None:
            return
        zc, self._zc = self._zc, None
        try:
            await zc.async_unregister_all_services()  # a goodbye packet: browsers drop it at once
        finally:
            await zc.async_close()


def browse(
    timeout: float,
    interfaces: Sequence[str] | None = None,
    *,
    cluster: str | None = None,
    settle: float = 1.0,
) -> list[Advert]:
    """The masters that answer within `timeout` seconds.

    It returns early: `settle` seconds after the first answer (time for the others to answer too),
    or as soon as a master of `cluster` is resolved when one is named.
    """
    lock = threading.Lock()
    names: list[str] = []
    changed = threading.Event()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Added:
            with lock:
                if name not in names and len(names) < MAX_SEEN:
                    names.append(name)
            changed.set()

    zc = Zeroconf(**_zeroconf_kwargs(interfaces))  # type: ignore[arg-type]
    adverts: dict[str, Advert] = {}
    tried: set[str] = set()
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        deadline = time.monotonic() + timeout
        first_seen: float | None = None
        while True:
            now = time.monotonic()
            end = deadline if first_seen is None else min(deadline, first_seen + settle)
            if now >= end:
                break
            changed.wait(timeout=min(0.1, end - now))
            changed.clear()
            with lock:
                pending = [n for n in names if n not in tried]
            for name in pending:
                tried.add(name)
                info = zc.get_service_info(SERVICE_TYPE, name, timeout=RESOLVE_MS)
                if info is None:
                    continue
                advert = parse_advert(name, info.parsed_addresses(), info.properties)
                if advert is None:
                    continue
                adverts[name] = advert
                first_seen = first_seen if first_seen is not None else time.monotonic()
            if cluster is not None and any(a.cluster == cluster for a in adverts.values()):
                break
        browser.cancel()
    finally:
        zc.close()
    return list(adverts.values())
