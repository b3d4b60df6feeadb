"""Command-line pieces for the service, called by :mod:`xengrant.cli`.

- ``xengrant hypervisor`` (:func:`add_parser`, :func:`run`): the service.
- ``xengrant demo --processes`` (:func:`demo_processes`): a frontend and a
  backend as separate processes, the ring ref exchanged through xenstore with
  the XenBus state handshake, notifications by event channel.
- ``xengrant inspect --socket PATH`` (:func:`inspect_socket`): Xen's debug
  keys on a running service.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
from typing import Any

from ..cli import out, positive_int
from ..embedded import DEFAULT_MEMORY
from ..emu.grant_table import DEFAULT_MAX_GRANT_FRAMES
from ..emu.maptrack import DEFAULT_MAX_MAPTRACK_FRAMES
from ..errors import HypercallError
from ..evtport import EventPort
from ..ring import BackRing, FrontRing
from . import xenbus
from .client import RemoteDomain, connect, debug_key, ping, stats
from .limits import Limits
from .paths import default_socket_path
from .server import DEFAULT_SPIN, serve
from .xenstore import QUOTA_ENTRIES, QUOTA_WATCHES

_MSG = 56


class _Msg(ctypes.Structure):
    """The demo's request and response: a sequence number and up to 56 bytes of text
    (``DEFINE_RING_TYPES(vdemo, struct msg, struct msg)``: 64-byte slots)."""

    _fields_ = [("seq", ctypes.c_uint32), ("len", ctypes.c_uint32), ("text", ctypes.c_char * _MSG)]


def _msg(seq: int, text: str) -> _Msg:
    data = text.encode()[:_MSG]
    return _Msg(seq=seq, len=len(data), text=data)
_KIND = "vdemo"
_TIMEOUT = 60.0


def add_parser(subparsers: Any) -> None:
    """Add ``hypervisor`` to the ``xengrant`` command's subparsers."""
    p = subparsers.add_parser(
        "hypervisor",
        help="run the emulated hypervisor as a service (domains as processes)",
        description="Serve the emulated hypervisor, a xenstore and event channels on a Unix "
        "socket. Domain processes join with xengrant.service.connect(path).",
    )
    p.add_argument(
        "--socket",
        default=None,
        help="socket path (default: $XENGRANT_SOCKET, else $XDG_RUNTIME_DIR/xengrant.sock, "
        "else xengrant.sock in a 0700 directory /tmp/xengrant-<uid>/); the dom0 token is "
        "written beside it (PATH.token, mode 0600)",
    )
    p.add_argument(
        "--xenstored-socket", default=None, metavar="PATH",
        help="also serve xenstore's own protocol (xen/io/xs_wire.h) there, as xenstored's "
        "socket does, for dom0's tools: XENSTORED_PATH=PATH xenstore-ls (only this uid)",
    )
    p.add_argument(
        "--allow-uid", type=int, action="append", default=[], metavar="UID",
        help="admit processes of this uid too (repeat for more; default: only this "
        "process's uid and root). The socket is then made 0666: put it in a directory "
        "they can reach",
    )
    p.add_argument(
        "--allow-group", action="append", default=[], metavar="GROUP",
        help="admit processes whose primary group, or whose user's membership, is GROUP",
    )
    p.add_argument(
        "--memory", type=positive_int, default=DEFAULT_MEMORY >> 20, help="machine memory in MiB"
    )
    lim = p.add_argument_group(
        "limits", "each domain's default and cap (a domain may ask for less, never more), "
        "and what the service takes in all (see xengrant/service/limits.py)",
    )
    lim.add_argument("--max-grant-frames", type=positive_int, default=DEFAULT_MAX_GRANT_FRAMES,
                     help="grant-table frames per domain (default %(default)s, as Xen)")
    lim.add_argument("--max-maptrack-frames", type=positive_int,
                     default=DEFAULT_MAX_MAPTRACK_FRAMES,
                     help="maptrack frames per domain (default %(default)s, as Xen)")
    lim.add_argument("--max-pages", type=positive_int, default=None,
                     help="memory frames per domain (default: a quarter of the machine)")
    lim.add_argument("--xs-entries", type=positive_int, default=QUOTA_ENTRIES,
                     help="xenstore nodes an unprivileged domain may own (default %(default)s, "
                     "as xenstored's quota-nb-entry-per-domain)")
    lim.add_argument("--xs-watches", type=positive_int, default=QUOTA_WATCHES,
                     help="xenstore watches per unprivileged domain (default %(default)s)")
    lim.add_argument("--xs-nodes-total", type=positive_int, default=Limits.xs_nodes_total,
                     help="xenstore nodes in all (default %(default)s)")
    lim.add_argument("--xs-watches-total", type=positive_int, default=Limits.xs_watches_total,
                     help="xenstore watches in all (default %(default)s)")
    lim.add_argument("--max-connections", type=positive_int, default=None,
                     help="connections in all (default: what RLIMIT_NOFILE allows, at most 1024)")
    lim.add_argument("--max-connections-per-uid", type=positive_int, default=None,
                     help="connections of one uid (default: three quarters of the total)")
    lim.add_argument("--max-unread", type=positive_int, default=Limits.out_high >> 10,
                     metavar="KIB",
                     help="KiB of replies a client may leave unread before its requests are "
                     "no longer read (default %(default)s)")
    p.add_argument(
        "--ready-fd", type=int, default=None,
        help="write the socket path and a newline to this fd once listening, then close it",
    )
    p.add_argument("--quiet", action="store_true", help="do not log client errors to stderr")
    p.add_argument(
        "--debug", action="store_true",
        help="also log Xen's debug reasons for every failed grant op (the xengrant.emu logger)",
    )
    p.add_argument(
        "--poll-us", type=float, default=DEFAULT_SPIN * 1e6,
        help="microseconds a connection polls for its next request before sleeping "
        "(default %(default)g; 0: sleep at once)",
    )


def run(args: argparse.Namespace) -> int:
    """Run a subcommand added by :func:`add_parser`; returns the exit code."""
    if args.command != "hypervisor":
        print(f"xengrant: unknown command {args.command}", file=sys.stderr)
        return 2
    try:
        path = args.socket or default_socket_path(create=True)
    except OSError as e:
        print(f"xengrant hypervisor: {e}", file=sys.stderr)
        return 1

    def ready(p: str) -> None:
        print(f"xengrant hypervisor: listening on {p} ({args.memory} MiB)", file=sys.stderr,
              flush=True)
        if args.ready_fd is not None:
            os.write(args.ready_fd, p.encode() + b"\n")
            os.close(args.ready_fd)

    _log_to_stderr(logging.DEBUG if args.debug else logging.INFO)
    kw: dict[str, Any] = {"log": _quiet} if args.quiet else {}
    try:
        serve(
            path,
            args.memory << 20,
            ready=ready,
            limits=Limits(
                max_pages=args.max_pages,
                max_grant_frames=args.max_grant_frames,
                max_maptrack_frames=args.max_maptrack_frames,
                xs_entries=args.xs_entries,
                xs_watches=args.xs_watches,
                xs_nodes_total=args.xs_nodes_total,
                xs_watches_total=args.xs_watches_total,
                conns_total=args.max_connections,
                conns_per_uid=args.max_connections_per_uid,
                out_high=max(args.max_unread, 64) << 10,
            ),
            spin=max(args.poll_us, 0.0) * 1e-6,
            allow_uids=args.allow_uid,
            allow_groups=[int(g) if g.isdigit() else g for g in args.allow_group],
            xenstored_path=args.xenstored_socket,
            **kw,
        )
    except (OSError, KeyError, ValueError) as e:  # an unknown group, a limit below 1
        print(f"xengrant hypervisor: {e}", file=sys.stderr)
        return 1
    return 0


def _quiet(text: str) -> None:
    pass


def _log_to_stderr(level: int) -> None:
    """Send the ``xengrant`` loggers' lines to stderr, one per line, prefixed with the command."""
    logger = logging.getLogger("xengrant")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("xengrant hypervisor: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


#: the ring's indices as io/ring.h lists them: requests, then responses
_RING_ORDER = ("req_prod", "req_cons", "req_event", "rsp_prod_pvt", "rsp_prod", "rsp_event")


def _inspect_text(path: str) -> str:
    """The 'G', 'e' and 'x' keys' text, then each domain's request ring."""
    lines = [debug_key("G", path), "", "event channels:", debug_key("e", path), "",
             "xenstore:", debug_key("x", path), "",
             "request rings (one-op maps and unmaps; service/ring.py):"]
    doms = stats(path)["domains"]
    for domid in sorted(doms, key=int):
        ring = doms[domid].get("ring")
        text = "none: the socket only" if ring is None else " ".join(
            f"{k}={v}" for k, v in zip(_RING_ORDER, (
                ring["req_prod"], ring["req_cons"], ring["req_event"],
                ring["rsp_prod_pvt"], ring["rsp_prod"], ring["rsp_event"]))
        )
        lines.append(f"  d{domid}: {text}")
    return "\n".join(lines)


def inspect_socket(path: str) -> int:
    """Print the 'G' (grant tables), 'e' (event channels) and 'x' (xenstore) keys,
    then each domain's request ring.

    Returns:
        0, or 1 (one line on stderr) if the service does not answer.
    """
    try:
        text = _inspect_text(path)
    except OSError as e:
        print(f"xengrant inspect: {path}: {e}", file=sys.stderr)
        return 1
    out(text)
    return 0


#: clear the screen and home the cursor (a terminal's refresh, as xentop does)
_CLEAR = "\x1b[H\x1b[2J"


def follow_socket(path: str, interval: float = 1.0, count: int | None = None) -> int:
    """``xengrant inspect --socket PATH --follow``: :func:`inspect_socket` every
    ``interval`` seconds, like xentop, until interrupted (or ``count`` refreshes).

    On a terminal each refresh clears the screen; piped, refreshes follow each
    other under a ``--- refresh N`` line.

    Returns:
        0 when interrupted or ``count`` is reached; 1 (one line on stderr) once
        the service stops answering.
    """
    tty = sys.stdout.isatty()
    n = 0
    while count is None or n < count:
        n += 1
        try:
            text = _inspect_text(path)
        except OSError as e:
            print(f"xengrant inspect: {path}: {e}", file=sys.stderr)
            return 1
        stamp = time.strftime("%H:%M:%S")
        header = f"xengrant inspect {path} at {stamp} (every {interval:g} s; Ctrl-C ends)"
        out((_CLEAR if tty else f"--- refresh {n}\n") + header + "\n" + text)
        if count is None or n < count:
            time.sleep(interval)
    return 0


# ------------------------------------------------------------------ demo
def _say(who: str, step: str, text: str) -> None:
    out(f"[{who:>12}] [{step:>7}] {text}")


def _service_main(path: str, memory: int, conn: Any) -> None:
    serve(path, memory, ready=lambda p: conn.send(p), log=lambda s: None)


class _Meet:
    """How a demo domain finds its peer and its device dirs.

    With a toolstack (dom0 of the service), the parent created the domain and
    wrote both dirs (``libxl__device_generic_add``): attach with the secret,
    read the peer's dir from ours.  Without one (the service's dom0 is claimed
    already: Xen makes dom0 once), each process makes its own domain
    (``connect``), the two learn each other's domid through the parent, and
    each writes its half of the device under its own ``data`` dir, readable by
    the peer (a domU may not write under ``device``, which is dom0's).
    """

    def __init__(self, domid: int | None, secret: bytes | None, peer: int | None,
                 pipe: Any = None) -> None:
        self.domid, self.secret, self.peer, self.pipe = domid, secret, peer, pipe

    def join(self, path: str, frontend: bool) -> tuple[RemoteDomain, int, str, str]:
        """Connect; returns ``(domain, peer, our dir, the peer's dir)``."""
        if self.pipe is None:
            assert self.domid is not None and self.peer is not None
            d = connect(path, self.domid, secret=self.secret)
            if frontend:
                dev = xenbus.frontend_path(d.domid, _KIND, 0)
                return d, self.peer, dev, d.xs.read(f"{dev}/backend").decode()
            dev = xenbus.backend_path(d.domid, _KIND, self.peer, 0)
            return d, self.peer, dev, d.xs.read(f"{dev}/frontend").decode()
        d = connect(path)
        self.pipe.send(d.domid)
        peer = int(self.pipe.recv())
        fe_id, be_id = (d.domid, peer) if frontend else (peer, d.domid)
        fe = f"/local/domain/{fe_id}/data/{_KIND}/0"
        be = f"/local/domain/{be_id}/data/{_KIND}-backend/{fe_id}/0"
        mine, theirs = (fe, be) if frontend else (be, fe)
        d.xs.mkdir(mine)
        d.xs.set_perms(mine, [f"n{d.domid}", f"r{peer}"])
        if frontend:
            d.xs.write(f"{fe}/backend", be)
            d.xs.write(f"{fe}/backend-id", str(be_id))
        else:
            d.xs.write(f"{be}/frontend", fe)
            d.xs.write(f"{be}/frontend-id", str(fe_id))
            d.xs.write(f"{be}/online", "1")
        xenbus.switch_state(d.xs, mine, xenbus.XenbusStateInitialising)
        _say(f"{'frontend' if frontend else 'backend'} d{d.domid}", "xenbus",
             f"no toolstack: made d{d.domid} and wrote {mine}, readable by d{peer}")
        return d, peer, mine, theirs


def _frontend_main(path: str, meet: _Meet, rounds: int) -> None:
    d, backend, dev, be = meet.join(path, True)
    who = f"frontend d{d.domid}"
    share = d.gntshr.share_pages(backend, 1)
    port = d.evtchn.bind_unbound_port(backend)
    _say(who, "share", f"ring page granted to d{backend}: ref {share.refs[0]}; "
                       f"event channel port {port} offered to d{backend}")
    d.xs.write(f"{dev}/ring-ref", str(share.refs[0]))
    d.xs.write(f"{dev}/event-channel", str(port))
    xenbus.switch_state(d.xs, dev, xenbus.XenbusStateInitialised)
    _say(who, "xenbus", f"wrote ring-ref and event-channel to {dev}; state Initialised")
    xenbus.wait_state(d.xs, be, [xenbus.XenbusStateConnected], _TIMEOUT)
    _say(who, "xenbus", "backend is Connected")
    ring = FrontRing(share.mem, _Msg, _Msg)  # io/ring.h: SHARED_RING_INIT + FRONT_RING_INIT
    evp = EventPort(d.evtchn, port, owned=False)
    for i in range(1, rounds + 1):
        msg = f"ping {i} from d{d.domid}"
        ring.put_request(_msg(i, msg))
        if ring.push_requests_and_check_notify():
            evp.notify()
        ring.wait_for_responses(evp, _TIMEOUT)  # TimeoutError: no response from the backend
        got = ring.get_response()
        assert got is not None
        rsp = got.text[: got.len].decode()
        _say(who, "ring", f"sent {msg!r}, notified; got {rsp!r}")
    ring.release()
    xenbus.switch_state(d.xs, dev, xenbus.XenbusStateClosing)
    d.evtchn.notify(port)
    xenbus.wait_state(d.xs, be, [xenbus.XenbusStateClosed, xenbus.XenbusStateUnknown], _TIMEOUT)
    share.try_unshare()  # the backend unmapped: access ends at once
    d.evtchn.unbind(port)
    xenbus.switch_state(d.xs, dev, xenbus.XenbusStateClosed)
    _say(who, "close", "backend Closed; ring unshared, port closed, state Closed")
    d.close()


def _backend_main(path: str, meet: _Meet) -> None:
    d, frontend, dev, fe = meet.join(path, False)
    who = f"backend d{d.domid}"
    xenbus.switch_state(d.xs, dev, xenbus.XenbusStateInitWait)
    _say(who, "xenbus", f"state InitWait; waiting for {fe} to be Initialised")
    xenbus.wait_state(d.xs, fe, [xenbus.XenbusStateInitialised], _TIMEOUT)
    ref = int(d.xs.read(f"{fe}/ring-ref"))
    rport = int(d.xs.read(f"{fe}/event-channel"))
    mapping = d.gnttab.map_grant_ref(frontend, ref)
    port = d.evtchn.bind_interdomain(frontend, rport)
    d.evtchn.wait(port, _TIMEOUT)  # Xen marks a freshly bound port pending
    _say(who, "map", f"read ring-ref {ref} and event-channel {rport} from xenstore; "
                     f"mapped the ring, bound local port {port}")
    xenbus.switch_state(d.xs, dev, xenbus.XenbusStateConnected)
    ring = BackRing(mapping.mem, _Msg, _Msg)
    evp = EventPort(d.evtchn, port, owned=False)
    while True:
        for req in ring.requests():  # copied out of the ring, then checked
            text = req.text[: min(req.len, _MSG)]
            ring.put_response(_msg(req.seq, f"pong {req.seq} from d{d.domid} "
                                            f"(read {len(text)} bytes off the ring)"))
        if ring.push_responses_and_check_notify():
            evp.notify()
        if ring.final_check_for_requests():
            continue
        if xenbus.read_state(d.xs, fe) == xenbus.XenbusStateClosing:
            break
        evp.wait(_TIMEOUT)  # TimeoutError: the frontend went quiet
    ring.release()
    mapping.unmap()
    d.evtchn.unbind(port)
    xenbus.switch_state(d.xs, dev, xenbus.XenbusStateClosed)
    _say(who, "close", "frontend Closing: unmapped the ring, closed the port, state Closed")
    xenbus.wait_state(d.xs, fe, [xenbus.XenbusStateClosed, xenbus.XenbusStateUnknown], _TIMEOUT)
    d.close()


def _running_service(args: argparse.Namespace | None) -> str | None:
    """The socket of a service that answers (``--socket``, else the default path), or None."""
    path = getattr(args, "socket", None)
    if path is None:
        try:
            path = default_socket_path()
        except OSError:
            return None
    return path if ping(path, timeout=5.0) else None


def _claim_or_why(path: str) -> tuple[RemoteDomain | None, bool, str]:
    """Be the running service's toolstack if we can.

    Returns:
        ``(dom0, own_domains, why)``: dom0 when its domid 0 was to be had; else
        ``own_domains`` True when we are the service's owner (its dom0 token is
        ours to read) and dom0 is claimed already -- the demo's processes make
        their own domains on it; else False, with ``why`` saying why a private
        service is needed.
    """
    try:
        return connect(path, 0), False, ""
    except HypercallError as e:
        if e.errno != errno.EPERM:
            return None, False, f"connecting as dom0 failed: {e}"
        claimed = str(e)
    except PermissionError as e:  # the token beside the socket is the owner's (0600)
        return None, False, (f"this user (uid {os.getuid()}) cannot read its dom0 token ({e}): "
                             f"only the uid that started the service may be its toolstack")
    except (OSError, ValueError) as e:
        return None, False, f"connecting as dom0 failed: {e}"
    try:  # dom0 is claimed (Xen makes it once); the owner can still look and make domains
        stats(path)
    except (OSError, ValueError) as e:
        return None, False, (f"its dom0 is claimed already ({claimed}) and this user "
                             f"(uid {os.getuid()}) is not its owner ({e})")
    return None, True, claimed


def demo_processes(args: argparse.Namespace | None = None, rounds: int = 3) -> int:
    """``xengrant demo --processes``: a frontend and a backend as separate processes.

    This process is the toolstack (dom0): it creates the two domains, writes
    their device dirs to xenstore (``libxl__device_generic_add``) and starts
    one process for each.  They meet through xenstore (ring ref, event
    channel, XenBus states) and talk through the shared ring page and the
    event channel.  The service is the one answering at ``args.socket`` (or
    the default socket) when one answers: as its dom0 while that is to be had,
    else (dom0 is claimed once per service), if this user is the service's
    owner, each process makes its own domain and writes its half of the
    device itself.  Otherwise -- no service answers, or this user is not its
    owner -- the demo says why and starts a private one in a child process.

    Returns:
        0 if both sides finished, their domains are gone and (on a private
        service) every frame came back, else 1.
    """
    ctx = mp.get_context("spawn")
    who = "toolstack d0"
    procs: list[Any] = []
    svc: Any = None
    tmp: str | None = None
    dom0: RemoteDomain | None = None
    own = False
    path = _running_service(args)
    if path is not None:
        dom0, own, why = _claim_or_why(path)
        if dom0 is not None:
            _say("service", "found", f"the running xengrant hypervisor on {path}; "
                                     f"this process is its toolstack (dom0)")
        elif own:
            who = "demo"
            _say("service", "found", f"the running xengrant hypervisor on {path}; its dom0 "
                                     f"is claimed already (Xen makes dom0 once), so the "
                                     f"frontend and backend make their own domains")
        else:
            _say("service", "found", f"{path} answers but this demo cannot use it: {why}; "
                                     f"starting a private service")
    try:
        if dom0 is None and not own:
            tmp = tempfile.mkdtemp(prefix="xengrant-demo-")
            path = os.path.join(tmp, "xengrant.sock")
            r, w = ctx.Pipe(duplex=False)
            svc = ctx.Process(target=_service_main, args=(path, 64 << 20, w), daemon=True)
            svc.start()
            w.close()
            if not r.poll(_TIMEOUT):
                print("xengrant demo: the service did not start", file=sys.stderr)
                return 1
            r.recv()
            _say("service", "start", f"xengrant hypervisor pid {svc.pid} on {path}")
            dom0 = connect(path, 0)
        assert path is not None
        free0 = stats(path)["free_frames"]
        if dom0 is not None:
            fe = dom0.create_domain()
            be = dom0.create_domain()
            fe_dir, be_dir = xenbus.add_device(dom0.xs, _KIND, 0, fe, be)
            _say(who, "create", f"domains d{fe} (frontend) and d{be} (backend); "
                                f"xenstore {fe_dir} <-> {be_dir}")
            procs = [
                ctx.Process(target=_backend_main,
                            args=(path, _Meet(be, dom0.domain_secret(be), fe))),
                ctx.Process(target=_frontend_main,
                            args=(path, _Meet(fe, dom0.domain_secret(fe), be), rounds)),
            ]
            for proc in procs:
                proc.start()
        else:  # no toolstack: each makes its domain; they learn each other's domid here
            be_end, be_child = ctx.Pipe()
            fe_end, fe_child = ctx.Pipe()
            procs = [
                ctx.Process(target=_backend_main, args=(path, _Meet(None, None, None, be_child))),
                ctx.Process(target=_frontend_main,
                            args=(path, _Meet(None, None, None, fe_child), rounds)),
            ]
            for proc in procs:
                proc.start()
            be_child.close()
            fe_child.close()
            if not (be_end.poll(_TIMEOUT) and fe_end.poll(_TIMEOUT)):
                print("xengrant demo: the frontend or backend did not start", file=sys.stderr)
                return 1
            be, fe = int(be_end.recv()), int(fe_end.recv())
            be_end.send(fe)
            fe_end.send(be)
            _say(who, "meet", f"told d{fe} (frontend) and d{be} (backend) each other's domid")
        _say(who, "spawn", f"backend pid {procs[0].pid}, frontend pid {procs[1].pid}")
        for proc in procs:
            proc.join(_TIMEOUT)
        ok = all(proc.exitcode == 0 for proc in procs)
        with_domains = stats(path)
        if dom0 is not None:
            dom0.close()
            dom0 = None
        left = sorted(int(x) for x in with_domains["domains"] if int(x) in (fe, be))
        free = with_domains["free_frames"]
        _say(who, "check", f"processes exited {[proc.exitcode for proc in procs]}; "
                           f"the demo's domains left: {left}; "
                           f"machine frames free: {free} (was {free0})")
        # on a shared service others' domains may hold frames: compare on a private one only
        return 0 if ok and not left and (svc is None or free == free0) else 1
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        if dom0 is not None:
            dom0.close()
        if svc is not None:
            svc.terminate()
            svc.join(_TIMEOUT)
        if tmp is not None:
            try:
                os.rmdir(tmp)
            except OSError:
                pass
