"""The frontend half: grants the ring, sends requests, reads responses.

Only the portable interfaces are used -- ``dom.xs``, ``dom.evtchn``,
``dom.gntshr`` -- so the same code runs in a thread, in its own process, and
on real Xen.
"""

from __future__ import annotations

from typing import Any

from protocol import KIND, OP_UPPER, STATUS_OK, Request, Response

from xengrant import EventPort, FrontRing
from xengrant.service import xenbus

RING_PAGE_ORDER = 1  # ask for two pages; the backend may allow fewer
TIMEOUT = 60.0


def _fill(ring: FrontRing[Request, Response], id: int, text: bytes) -> None:
    """Write a request straight into the next slot (a view of the granted page: no
    copy).  The view lives only here: a mapping or share with live views of
    it cannot be released."""
    req = ring.next_request()
    req.id, req.op, req.len, req.text = id, OP_UPPER, len(text), text


def run_frontend(dom: Any, backend: int, texts: list[bytes], devid: int = 0,
                 log: Any = print) -> list[bytes]:
    """Connect vupper device ``devid`` to ``backend``, send ``texts``, return the answers."""
    me = xenbus.frontend_path(dom.domid, KIND, devid)
    be = dom.xs.read(f"{me}/backend").decode()
    # 1. Wait for the backend to say what it supports.
    xenbus.wait_state(dom.xs, be, [xenbus.XenbusStateInitWait], TIMEOUT)
    max_order = int(dom.xs.read(f"{be}/max-ring-page-order"))
    order = min(RING_PAGE_ORDER, max_order)
    # 2. Grant the ring, offer a port, publish both, say Initialised.
    share = dom.gntshr.share_pages(backend, 1 << order)
    ring = FrontRing(share.mem, Request, Response)   # SHARED_RING_INIT + FRONT_RING_INIT
    port = EventPort.offer(dom.evtchn, backend)
    if order == 0:
        dom.xs.write(f"{me}/ring-ref", str(share.refs[0]))
    else:
        dom.xs.write(f"{me}/ring-page-order", str(order))
        for i, ref in enumerate(share.refs):
            dom.xs.write(f"{me}/ring-ref{i}", str(ref))
    dom.xs.write(f"{me}/event-channel", str(port.port))
    xenbus.switch_state(dom.xs, me, xenbus.XenbusStateInitialised)
    xenbus.wait_state(dom.xs, be, [xenbus.XenbusStateConnected], TIMEOUT)
    log(f"frontend d{dom.domid}: granted {len(share.refs)} page(s) {share.refs}, "
        f"port {port.port}; backend Connected")
    # 3. Send: fill free slots, push, notify only when the backend asked for it.
    answers: dict[int, bytes] = {}
    sent = 0
    while len(answers) < len(texts):
        while sent < len(texts) and not ring.full:
            _fill(ring, sent, texts[sent])
            sent += 1
        if ring.push_requests_and_check_notify():
            port.notify()
        ring.wait_for_responses(port, TIMEOUT)  # raises TimeoutError if the backend is silent
        for rsp in ring.responses():
            if rsp.status != STATUS_OK:
                raise RuntimeError(f"request {rsp.id}: status {rsp.status}")
            answers[rsp.id] = rsp.text[: rsp.len]
    log(f"frontend d{dom.domid}: {len(answers)} answers")
    # 4. Close: Closing, wait for the backend to unmap, end access, Closed.
    xenbus.switch_state(dom.xs, me, xenbus.XenbusStateClosing)
    port.notify()
    xenbus.wait_state(dom.xs, be, [xenbus.XenbusStateClosed, xenbus.XenbusStateUnknown],
                      TIMEOUT)
    ring.release()
    share.unshare()
    port.close()
    xenbus.switch_state(dom.xs, me, xenbus.XenbusStateClosed)
    return [answers[i] for i in range(len(texts))]
