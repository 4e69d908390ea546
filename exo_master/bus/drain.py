"""Draining a ZeroMQ socket from asyncio without its per-message futures.

The master reads its bus sockets through the plain (synchronous) API whenever their descriptor
fires: the asyncio receive path (a future and its poller bookkeeping per message) was a sixth of
the master's CPU at saturation, and a manual XPUB must apply each subscription right after its
recv. One loop serves both sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import zmq

RECV_BATCH = 256  # messages handled per wake-up before yielding to the event loop


async def drain(
    sock: zmq.Socket[bytes], readable: asyncio.Event, take_one: Callable[[], Awaitable[bool]]
) -> None:
    """Take messages from `sock` (take_one: False once none is left) for as long as it serves.

    ZMQ_FD is edge-like, so this sleeps on `readable` (set by the descriptor's reader, and by anyone
    who knows of messages the descriptor will not announce) only after ZMQ_EVENTS confirms nothing
    is left; batches are bounded so a flood cannot starve the loop.
    """
    loop = asyncio.get_running_loop()
    fd = int(sock.getsockopt(zmq.FD))
    loop.add_reader(fd, readable.set)
    try:
        while True:
            for _ in range(RECV_BATCH):
                if not await take_one():
                    break
            else:
                await asyncio.sleep(0)  # a full batch: let others run, then go on draining
                continue
            if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                continue
            readable.clear()
            await readable.wait()
    finally:
        loop.remove_reader(fd)
