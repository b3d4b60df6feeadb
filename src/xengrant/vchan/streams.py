"""A :class:`~xengrant.vchan.Vchan` as an asyncio transport, and the
``asyncio.open_connection``/``start_server`` twins over it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from .channel import Vchan, VchanDomain


# ------------------------------------------------------------------ asyncio
class _VchanTransport(asyncio.Transport):
    """A transport over a vchan: one task moves bytes both ways, sleeping on
    the event port (or a local write) when neither way moves."""

    HIGH, LOW = 256 << 10, 64 << 10

    def __init__(
        self, vchan: Vchan, protocol: asyncio.Protocol, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__()
        self._vchan, self._protocol, self._loop = vchan, protocol, loop
        self._buf = bytearray()
        self._closing = self._paused = self._wpaused = False
        self._kick = asyncio.Event()
        protocol.connection_made(self)
        self._task = loop.create_task(self._pump())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._vchan if name == "vchan" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            raise RuntimeError("vchan transport: write after close")
        self._buf += data
        self._kick.set()
        if not self._wpaused and len(self._buf) > self.HIGH:
            self._wpaused = True
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        self._kick.set()

    def abort(self) -> None:
        self._buf.clear()
        self.close()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        self._kick.set()

    def is_reading(self) -> bool:
        return not self._paused

    def get_write_buffer_size(self) -> int:
        return len(self._buf)

    async def _pump(self) -> None:
        v = self._vchan
        v.blocking = False
        exc: Exception | None = None
        eof = False
        event: asyncio.Task[None] | None = None
        try:
            while True:
                moved = False
                if not self._paused and not eof:
                    data = v.read(1 << 16)
                    if data:
                        moved = True
                        self._protocol.data_received(data)
                    elif data == b"":
                        eof = True
                        self._protocol.eof_received()
                if self._buf and v.is_open():
                    n = v.write(self._buf)
                    if n:
                        moved = True
                        del self._buf[:n]
                        if self._wpaused and len(self._buf) <= self.LOW:
                            self._wpaused = False
                            self._protocol.resume_writing()
                if self._closing and (not self._buf or not v.is_open()):
                    break
                if eof and (not self._buf or not v.is_open()):
                    break  # the peer closed: what is left to write can never go
                if moved:
                    continue
                self._kick.clear()
                if event is None or event.done():
                    event = self._loop.create_task(v.wait_async())
                kick = self._loop.create_task(self._kick.wait())
                await asyncio.wait({event, kick}, return_when=asyncio.FIRST_COMPLETED)
                kick.cancel()
        except Exception as e:  # the peer broke the protocol, the service went
            exc = e
        finally:
            if event is not None and not event.done():
                event.cancel()
                with contextlib.suppress(BaseException):
                    await event
            self._closing = True
            v.close()
            self._protocol.connection_lost(exc)


def _streams(v: Vchan, limit: int = 1 << 16) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = _VchanTransport(v, protocol, loop)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def open_vchan_connection(
    dom: VchanDomain, peer: int, xs_path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a vchan server as a client (``asyncio.open_connection``'s twin).

    Returns:
        ``(reader, writer)``; ``writer.get_extra_info("vchan")`` is the :class:`Vchan`.

    Raises:
        VchanError, GrantError, EvtchnError: see :meth:`Vchan.client`.
    """
    return _streams(Vchan.client(dom, peer, xs_path))


async def start_vchan_server(
    client_connected_cb: Callable[
        [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
    ],
    dom: VchanDomain,
    peer: int,
    xs_path: str,
    left_min: int = 1024,
    right_min: int = 2048,
) -> Vchan:
    """Offer a vchan and call ``client_connected_cb(reader, writer)`` when the
    client has come (``asyncio.start_server``'s twin; one client, as libxenvchan).

    Returns:
        The server's :class:`Vchan` (close it to withdraw the offer).
    """
    v = Vchan.server(dom, peer, xs_path, left_min, right_min)

    async def accept() -> None:
        while not v.closed and not v.connected:
            await v.wait_async()
        if v.closed:
            return
        got = client_connected_cb(*_streams(v))
        if got is not None:
            await got

    task = asyncio.get_running_loop().create_task(accept())
    v._accept_task = task  # type: ignore[attr-defined]
    return v
