"""Find the master on the LAN when `exo-worker` has no `--master` (DNS-SD, `protocol.mdns`).

Discovery says where the master is, never whom to trust: under CURVE the advertised key
fingerprint must equal the one of the `--master-key` file before the worker connects, and a worker
without keys refuses a master that runs CURVE (and the other way round) with one clear line.
"""

from __future__ import annotations

from collections.abc import Sequence

from exo_worker.bus import MasterAddress, parse_master_address
from exo_worker.bus_auth import ClientCurve
from protocol.discovery import Advert, check_key, choose
from protocol.keys import fingerprint
from protocol.mdns import browse


def find_master(
    cluster: str | None, timeout: float, interfaces: Sequence[str] | None, curve: ClientCurve | None
) -> tuple[MasterAddress, Advert]:
    """The master to join and its advert; DiscoveryError (one line) when there is none to trust."""
    advert = choose(browse(timeout, interfaces, cluster=cluster), cluster)
    check_key(advert, fingerprint(curve.master_public) if curve is not None else None)
    return parse_master_address(advert.bus), advert
