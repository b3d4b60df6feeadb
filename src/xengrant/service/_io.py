"""Socket helpers shared by the service and its clients."""

from __future__ import annotations

import os
import socket
import time


def spin_recv(sock: socket.socket, buf: memoryview, spin: float) -> int:
    """``recv_into`` polled without sleeping for up to ``spin`` seconds.

    On a virtual machine a vCPU that goes idle takes tens of microseconds to
    wake again, more than a request or a reply takes to come; a short poll
    keeps it busy instead (as Linux's busy polling and a guest's halt polling
    do).  Between tries it yields the CPU: when the peer runs on this same
    CPU, polling must not keep it from sending what is polled for.

    Args:
        sock: the socket (blocking or not).
        buf: where the bytes go.
        spin: seconds to keep trying.

    Returns:
        The bytes read (0: the peer closed), or -1 if nothing came in time.

    Raises:
        OSError: the socket failed.
    """
    end = time.perf_counter() + spin
    recv = sock.recv_into
    clock = time.perf_counter
    yield_cpu = os.sched_yield
    while True:
        try:
            return recv(buf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if clock() >= end:
                return -1
            yield_cpu()  # the peer may be waiting for this very CPU
