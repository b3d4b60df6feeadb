"""``xengrant``: the command line.

- ``xengrant demo`` -- two domains on the embedded hypervisor: share, map,
  write on one side and read on the other, copy, a Busy end of access while
  mapped, unshare; every step printed with what Xen would answer.
- ``xengrant inspect`` -- grant tables as Xen's 'g' debug key prints them,
  for a small built-in scenario (the default) or a running service
  (``--socket PATH``; ``--follow`` refreshes it every ``--interval`` seconds,
  like xentop).
- ``xengrant hypervisor`` -- the service (:mod:`xengrant.service.cli`).

Exit codes: 0 done, 1 failed (the demo's check, a service that does not
answer), 2 bad arguments; a closed stdout (``xengrant demo | head -1``) ends
the output quietly, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from . import abi
from .debugkeys import dump_all
from .embedded import EmbeddedXen
from .errors import Busy, GrantError


def out(text: str = "") -> None:
    """Print a line to stdout; once the reader has gone (EPIPE), print nothing more.

    ``xengrant demo | head -1``: the demo goes on (and cleans up) with its
    output sent to /dev/null instead of ending in a BrokenPipeError traceback.
    """
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _silence_stdout()


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null: what Python flushes at exit then goes nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _say(step: str, text: str) -> None:
    out(f"[{step:>7}] {text}")


def demo(out_all: bool = False) -> int:
    """Run the two-domain demo; returns a process exit code."""
    with EmbeddedXen(memory=64 << 20) as xen:
        front = xen.create_domain()
        back = xen.create_domain()
        free0 = xen.free_frames
        _say("create", f"frontend d{front.domid}, backend d{back.domid} "
                       f"({xen.free_frames} machine frames free)")

        share = front.grant_table.share_pages(back.domid, count=2, writable=True)
        _say("share", f"d{front.domid} granted 2 pages to d{back.domid}: refs {share.refs}")
        e = front.grant_table.entry(share.refs[0])
        _say("entry", f"ref {e.ref}: flags={e.flags:#06x} ({abi_flags(e.flags)}) "
                      f"domid={e.domid} frame={e.frame:#x}")

        mapping = back.gnttab.map_domain_grant_refs(front.domid, share.refs)
        _say("map", f"d{back.domid} mapped them contiguously: {len(mapping.mem)} bytes, "
                    f"handles {mapping.handles}")
        e = front.grant_table.entry(share.refs[0])
        _say("entry", f"ref {e.ref} now in use: {abi_flags(e.flags)}")

        share.mem[:23] = b"hello from the frontend"
        _say("write", f"d{front.domid} wrote {bytes(share.mem[:23])!r} into its page")
        _say("read", f"d{back.domid} reads {bytes(mapping.mem[:23])!r} (same frame, no copy)")
        mapping.mem[4096:4119] = b"reply from the backend!"
        _say("write", f"d{back.domid} wrote into page 2; d{front.domid} reads "
                      f"{bytes(share.mem[4096:4119])!r}")

        local = back.alloc_pages(1)
        op = (abi.gnttab_copy * 1)()
        op[0].source.u.ref, op[0].source.domid, op[0].source.offset = share.refs[0], front.domid, 0
        op[0].dest.u.gmfn, op[0].dest.domid, op[0].dest.offset = (
            local.gfns[0], abi.DOMID_SELF, 100)
        op[0].len, op[0].flags = 23, abi.GNTCOPY_source_gref
        status = back.grant_table.copy(op)[0]
        _say("copy", f"GNTTABOP_copy ref {share.refs[0]} -> own page: status {status} "
                     f"({abi.gnttabop_error(status)}), got {bytes(local.mem[100:123])!r}")
        op[0].dest.offset = 4090
        status = back.grant_table.copy(op)[0]
        _say("copy", f"same copy at offset 4090: status {status} "
                     f"({abi.GNTST_NAMES[status]}: {abi.gnttabop_error(status)})")

        try:
            back.gnttab.map_grant_ref(front.domid, share.refs[0] + 100)
        except GrantError as err:
            _say("map", f"mapping an ungranted ref fails: {err}")

        try:
            share.try_unshare()
        except Busy as err:
            _say("busy", f"d{front.domid} cannot end access yet: {err}")

        if out_all:
            out(dump_all(xen.hv, all_entries=True))

        mapping.unmap()
        _say("unmap", f"d{back.domid} unmapped; ref {share.refs[0]} flags now "
                      f"{abi_flags(front.grant_table.entry(share.refs[0]).flags)}")
        share.try_unshare()
        _say("unshare", f"d{front.domid} ended access, freed refs and pages: {share!r}")
        local.free()
        back.gnttab.close()
        _say("check", f"machine frames free: {xen.free_frames} (was {free0} after creation)")
        return 0 if xen.free_frames == free0 else 1


def abi_flags(flags: int) -> str:
    from .guest.gnttab import decode_flags

    return decode_flags(flags)


def inspect_scenario() -> str:
    """The 'g' dump of a small live scenario: grants, a readonly map, a v2 table."""
    xen = EmbeddedXen(memory=32 << 20)
    a, b = xen.create_domain(), xen.create_domain()
    share = a.grant_table.share_pages(b.domid, 3)
    ro = a.grant_table.share_pages(b.domid, 1, writable=False)
    m1 = b.gnttab.map_grant_refs([(a.domid, r) for r in share.refs[:2]])
    m2 = b.gnttab.map_grant_ref(a.domid, ro.refs[0], writable=False)
    text = dump_all(xen.hv, all_entries=True)
    m1.unmap()
    m2.unmap()
    share.unshare()
    ro.unshare()
    xen.close()
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xengrant`` command; returns its exit code.

    Bad arguments print one line (``xengrant: error: ...``, after the usage)
    and return 2; a closed stdout is not an error of ours.
    """
    try:
        return _main(argv)
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        return 130


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``xengrant demo: error: ... (see --help)``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _main(argv: Sequence[str] | None) -> int:
    from . import __version__

    parser = _Parser(
        prog="xengrant", description="Xen grant tables: an emulated hypervisor and guest APIs."
    )
    parser.add_argument("--version", action="version", version=f"xengrant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="two domains share, map, copy and unshare")
    p_demo.add_argument("--dump", action="store_true", help="print the 'g' dump while mapped")
    p_demo.add_argument(
        "--processes", action="store_true",
        help="frontend and backend as separate processes, on the running service if one "
        "answers at --socket (else a private one)",
    )
    p_demo.add_argument(
        "--socket", default=None,
        help="with --processes: the service to use (default: the default socket path)",
    )
    p_insp = sub.add_parser("inspect", help="grant tables as Xen's 'g' debug key shows them")
    p_insp.add_argument("--socket", help="a running `xengrant hypervisor` service to inspect")
    p_insp.add_argument(
        "--follow", action="store_true",
        help="with --socket: refresh every --interval seconds until interrupted (like xentop)",
    )
    p_insp.add_argument(
        "--interval", type=positive_float, default=1.0, help="seconds between refreshes"
    )
    p_insp.add_argument(
        "--count", type=positive_int, default=None,
        help="with --follow: stop after this many refreshes",
    )
    service: ModuleType | None
    try:
        service = importlib.import_module("xengrant.service.cli")
    except ImportError:
        service = None
    if service is not None:
        service.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.processes:
            if service is None or not hasattr(service, "demo_processes"):
                print("xengrant: the two-process demo needs xengrant.service", file=sys.stderr)
                return 2
            return int(service.demo_processes(args))
        if args.socket:
            parser.error("demo: --socket goes with --processes")
        return demo(args.dump)
    if args.command == "inspect":
        if args.socket:
            if service is None or not hasattr(service, "inspect_socket"):
                print("xengrant: inspecting a service needs xengrant.service", file=sys.stderr)
                return 2
            if args.follow:
                return int(service.follow_socket(args.socket, args.interval, args.count))
            return int(service.inspect_socket(args.socket))
        if args.follow:
            parser.error("inspect: --follow needs --socket")
        out(inspect_scenario())
        return 0
    if service is not None:
        return int(service.run(args))
    parser.error(f"unknown command {args.command}")
    return 2


def positive_int(text: str) -> int:
    """An argparse type: an int > 0 (else a one-line usage error)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite float > 0 (else a one-line usage error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
