"""The backend half: maps the frontend's ring, answers its requests.

Only the portable interfaces are used -- ``dom.xs`` (xenstore), ``dom.evtchn``
(event channels), ``dom.gnttab`` (map grants) -- so the same code runs in a
thread, in its own process, and on real Xen.
"""

from __future__ import annotations

from typing import Any

from protocol import KIND, OP_UPPER, STATUS_ERROR, STATUS_OK, TEXT, Request, Response

from xengrant import BackRing, EventPort
from xengrant.service import xenbus

MAX_RING_PAGE_ORDER = 2
TIMEOUT = 60.0


def run_backend(dom: Any, frontend: int, devid: int = 0, log: Any = print) -> int:
    """Serve one vupper device of ``frontend`` until it closes; return the requests served."""
    me = xenbus.backend_path(dom.domid, KIND, frontend, devid)
    fe = dom.xs.read(f"{me}/frontend").decode()
    # 1. Advertise what we support, then wait for the frontend's ring.
    dom.xs.write(f"{me}/max-ring-page-order", str(MAX_RING_PAGE_ORDER))
    xenbus.switch_state(dom.xs, me, xenbus.XenbusStateInitWait)
    xenbus.wait_state(dom.xs, fe, [xenbus.XenbusStateInitialised], TIMEOUT)
    # 2. Read the ring's grants and the port; map the ring, bind the port.
    try:
        order = int(dom.xs.read(f"{fe}/ring-page-order"))
    except Exception:
        order = 0
    if not 0 <= order <= MAX_RING_PAGE_ORDER:
        raise ValueError(f"{fe}/ring-page-order {order} is over {MAX_RING_PAGE_ORDER}")
    keys = ["ring-ref"] if order == 0 else [f"ring-ref{i}" for i in range(1 << order)]
    refs = [int(dom.xs.read(f"{fe}/{k}")) for k in keys]
    mapping = dom.gnttab.map_domain_grant_refs(frontend, refs)
    port = EventPort.bind(dom.evtchn, frontend, int(dom.xs.read(f"{fe}/event-channel")))
    ring = BackRing(mapping.mem, Request, Response)
    log(f"backend d{dom.domid}: mapped {len(refs)} ring page(s) of d{frontend} "
        f"({ring.nr_ents} slots), bound port {port.port}")
    xenbus.switch_state(dom.xs, me, xenbus.XenbusStateConnected)
    # 3. Serve: take requests, answer, push; sleep on the port when idle.
    served = 0
    while True:
        for req in ring.requests():            # copies: the frontend cannot change them now
            if req.op == OP_UPPER and req.len <= TEXT:
                text = req.text[: req.len].upper()
                ring.put_response(Response(id=req.id, status=STATUS_OK, len=len(text),
                                           text=text))
            else:
                ring.put_response(Response(id=req.id, status=STATUS_ERROR))
            served += 1
        if ring.push_responses_and_check_notify():
            port.notify()
        if ring.final_check_for_requests():     # more came meanwhile: go on
            continue
        if xenbus.read_state(dom.xs, fe) in (xenbus.XenbusStateClosing,
                                             xenbus.XenbusStateClosed,
                                             xenbus.XenbusStateUnknown):
            break
        try:
            ring.wait_for_requests(port, 1.0)   # sleep until the frontend pushes
        except TimeoutError:
            pass                                # nothing in a second: look at the state again
    # 4. Close: unmap, unbind, say Closed.
    ring.release()
    mapping.unmap()
    port.close()
    xenbus.switch_state(dom.xs, me, xenbus.XenbusStateClosed)
    log(f"backend d{dom.domid}: frontend closing; served {served}, unmapped, Closed")
    return served
