"""Running the master: bind the bus and the API, drive the core from one asyncio loop, stop cleanly.

`exo-master` (the CLI in `exo_master.daemon`) parses its options and calls `serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
from collections.abc import Sequence
from pathlib import Path

import structlog
import zmq

from exo_master.bus.advertise import AdvertiseSettings, announce, plan_advertiser
from exo_master.bus.curve import SETUP_HINT, MasterCurve, is_loopback
from exo_master.bus.sockets import MasterBus
from exo_master.core import CoreConfig, MasterCore
from exo_master.http.api import Api, build_app
from exo_master.http.auth import secure_app
from exo_master.http.bounds import ApiLimits
from exo_master.http.connection_cap import ConnectionCap, default_max_connections
from exo_master.http.dashboard import dashboard_routes
from exo_master.http.events import EventHub
from exo_master.http.inference_metrics import InferenceMetrics
from exo_master.http.live_stats import LiveStats
from exo_master.http.server import api_server
from exo_master.http.server import bind_http as _bind_http  # a name tests replace
from exo_master.http.transport import coalescing_http_protocol
from exo_master.runtime import MasterRuntime
from exo_master.store.state_file import instance_config, restore_desired
from protocol.discovery import DEFAULT_CLUSTER

log = structlog.get_logger("exo_master")

SHUTDOWN_REASON = "the master is shutting down"


async def serve(
    config: CoreConfig,
    host: str,
    api_port: int,
    bus_port: int,
    limits: ApiLimits | None = None,
    *,
    bus_host: str | None = None,
    curve: MasterCurve | None = None,
    insecure: bool = False,
    api_keys: Sequence[str] = (),
    cors_origins: Sequence[str] = (),
    max_connections: int | None = None,
    advertise: AdvertiseSettings | None = None,
    state_dir: Path | None = None,
    drain_grace: float = 60.0,
) -> int:
    """Run until SIGINT/SIGTERM (exit code 0), a loop crashes (1), or a port is taken or unsafe (2)."""
    bus_host = bus_host or host
    # Before anything binds: a plaintext bus reachable from other machines is refused.
    if curve is None and not is_loopback(bus_host):
        if not insecure:
            log.error("master.insecure_bus_refused", bus_host=bus_host, fix=SETUP_HINT)
            return 2
        log.warning("master.insecure", bus_host=bus_host, note="plaintext bus: anyone can join")
    bus = MasterBus(
        bus_host,
        bus_port,
        origin=f"master-{config.session}",
        curve=curve,
        insecure=insecure,
        incarnation_grace=2 * config.heartbeat_interval,
    )
    try:
        # Bind everything before serving anything: a taken port is one clear line, not a traceback.
        bus.bind()
        http_socket = _bind_http(host, api_port)
    except (OSError, zmq.ZMQError) as exc:
        log.error(
            "master.cannot_start", error=str(exc), api_port=api_port, bus_ports=[bus_port, bus_port + 1]
        )
        bus.close()
        return 2
    runtime = MasterRuntime(MasterCore(config, instance_config(config, drain_grace)), bus)
    nofile, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = ConnectionCap(max_connections or default_max_connections(nofile))
    runtime.connection_cap = cap
    save = restore_desired(runtime, state_dir)
    if save is False:
        bus.close()
        http_socket.close()
        return 2
    runtime.save_desired = save
    from exo_master.http.metrics import metrics_route

    limits = limits or ApiLimits()
    inference = InferenceMetrics()
    api = Api(runtime, limits, inference)
    stats = LiveStats(inference)
    runtime.effect_observers.append(stats.on_effect)
    events = EventHub(runtime, stats)
    routes = [metrics_route(runtime, inference), events.route(), *dashboard_routes()]
    app_ = secure_app(build_app(runtime, extra_routes=routes, api=api), api_keys, cors_origins)
    if not api_keys and not is_loopback(host):
        log.warning("master.api_open", host=host, note="no --api-key: anyone who reaches the API can use it")
    server = api_server(app_, host, api_port, coalescing_http_protocol(cap), limits.keep_alive_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if curve is not None:
        loop.add_signal_handler(signal.SIGHUP, curve.reload)
    tick_period = min(config.assign_resend, config.heartbeat_interval) / 2
    tasks = [
        asyncio.create_task(bus.serve_workers(runtime.deliver), name="bus-in"),
        asyncio.create_task(bus.serve_subscriptions(runtime.deliver), name="bus-subscriptions"),
        asyncio.create_task(runtime.run_sender(), name="bus-out"),
        asyncio.create_task(runtime.run_ticker(tick_period), name="ticker"),
        *([asyncio.create_task(curve.watch(), name="bus-auth")] if curve is not None else []),
        asyncio.create_task(events.run(), name="events"),
        asyncio.create_task(server.serve(sockets=[http_socket]), name="http"),
    ]
    advertiser, advertising = plan_advertiser(
        advertise or AdvertiseSettings(wanted=False, cluster=DEFAULT_CLUSTER),
        bus_host,
        bus_port,
        api_port,
        curve.fingerprint if curve is not None else None,
        config.session,
    )
    announcing = asyncio.create_task(announce(advertiser), name="mdns") if advertiser else None
    log.info(
        "master.started",
        api=f"http://{host}:{api_port}",
        bus_out=bus.endpoint_out,
        bus_in=bus.endpoint_in,
        policy=config.policy,
        seed=config.seed,
        session=config.session,
        curve=curve is not None,
        master_key=curve.fingerprint if curve is not None else None,
        api_keys=len(api_keys),
        max_connections=cap.limit,
        open_files_limit=nofile,
        node_ids=(
            "owned by keys: authorized/NAME.key admits node id NAME only"
            if curve is not None
            else "first come, first served: on a plaintext bus any local process may claim any node id"
        ),
        discovery=advertising,
    )
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    crashed = [t for t in done if t is not stopper]
    for task in crashed:
        # Every loop runs forever: one that ended is a bug (or the HTTP port was taken). Fail loudly.
        error = task.exception()
        log.error(
            "master.task_crashed",
            task=task.get_name(),
            error=repr(error),
            exc_info=(type(error), error, error.__traceback__) if error else None,
        )
    stopper.cancel()
    # Open requests end first, cleanly: a stream gets an error event and [DONE], a waiting
    # non-streaming request a 503; only then does uvicorn stop and close the connections.
    open_requests = api.shutdown(SHUTDOWN_REASON)
    events.close()  # event streams end too, or uvicorn would wait for them
    log.info("master.stopping", open_requests=open_requests)
    server.should_exit = True
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(tasks[-1]), timeout=3)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, stopper, return_exceptions=True)
    if announcing is not None and advertiser is not None:
        announcing.cancel()
        await asyncio.gather(announcing, return_exceptions=True)
        with contextlib.suppress(asyncio.TimeoutError, OSError):
            await asyncio.wait_for(advertiser.stop(), timeout=2)  # a goodbye, so browsers forget us
    bus.close()
    log.info("master.stopped")
    return 1 if crashed else 0
