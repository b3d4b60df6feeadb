"""The hypercall oracle: the same grant-table hypercalls on the real hypervisor and the emulator.

Dom0 can issue ``HYPERVISOR_grant_table_op`` itself through
``/dev/xen/privcmd`` (``IOCTL_PRIVCMD_HYPERCALL``).  :data:`CASES` are bad
inputs -- bad ref, ref beyond the table, a read-only grant mapped writable,
a bad handle, copies crossing a page, ``query_size``, ``set_version`` ... --
each with the ``GNTST_*`` status (or hypercall errno) Xen 4.17 answers.
:func:`run_cases` plays them through any ``issue(cmd, ops, count)``: the
privcmd one in dom0 (tests_xen/test_privcmd_oracle.py, where the real
hypervisor is the judge) and the emulator's ``Domain.grant_table_op``
(tests/test_oracle.py), so the emulator's fidelity is checked against the real
thing, not against our reading of the source.

Only inputs that fail before Xen touches a page table are used (a real map
from dom0 userspace would rewrite one of its own PTEs), plus harmless
successes (copies between dom0's own shared pages, queries, ``set_version``
to the version in use).  ``set_version(2)`` is never tried: it would switch
dom0's own kernel to a layout it does not use.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xengrant import abi

#: a domain that exists neither in the emulator nor on the test host
UNKNOWN = 100
#: a ref far beyond any grant table (64 frames of v1 entries = 32768)
OUT_OF_RANGE = 1_000_000
#: a frame number no domain owns (a copy's source: only read, and refused)
BAD_FRAME = 1 << 40
#: a PV virtual address never reached (every map case fails before it)
HOST_ADDR = 0x10000000


@dataclass
class Case:
    """One hypercall and what Xen 4.17 answers.

    Attributes:
        name: what is tried.
        cmd: ``map``, ``unmap``, ``copy``, ``query_size``, ``get_version``, ``set_version``.
        args: the op's fields; refs by role (``rw``, ``rw2``, ``ro``, ``gone``,
            ``theirs``, ``out_of_range``).
        status: the expected ``GNTST_*`` name (without the prefix), or None.
        rc: the expected hypercall return (``-errno``).
        compare: result keys both sides must agree on besides rc/status.
    """

    name: str
    cmd: str
    args: dict[str, Any]
    status: str | None
    rc: int = 0
    compare: tuple[str, ...] = ()


CASES: list[Case] = [
    Case("map: ref beyond the table", "map", {"ref": "out_of_range"}, "bad_gntref"),
    Case("map: unknown granting domain", "map", {"ref": "rw", "dom": UNKNOWN}, "bad_domain"),
    Case("map: neither host nor device map", "map", {"ref": "rw", "flags": 0}, "bad_gntref"),
    Case("map: entry no longer granted", "map", {"ref": "gone"}, "general_error"),
    Case("map: read-only grant mapped writable", "map", {"ref": "ro"}, "general_error"),
    Case("map: entry granted to another domain", "map", {"ref": "theirs"}, "general_error"),
    Case(
        "map: DOMID_SELF as the granter", "map", {"ref": "rw", "dom": abi.DOMID_SELF}, "bad_domain"
    ),
    Case("unmap: handle beyond the maptrack", "unmap", {"handle": 0x7FFFFFF}, "bad_handle"),
    Case("copy: ok, grant to grant", "copy", {"src": ("rw", 0), "dst": ("rw2", 8)}, "okay"),
    Case("copy: source ref beyond the table", "copy", {"src": ("out_of_range", 0)}, "bad_gntref"),
    Case("copy: source not granted", "copy", {"src": ("gone", 0)}, "general_error"),
    Case(
        "copy: source of an unknown domain",
        "copy",
        {"src": ("rw", 0), "src_dom": UNKNOWN},
        "bad_domain",
    ),
    Case(
        "copy: a frame of an unknown domain",
        "copy",
        {"src_gmfn": 1, "src_dom": UNKNOWN},
        "bad_domain",
    ),
    Case(
        "copy: a bad frame of our own, by DOMID_SELF",
        "copy",
        {"src_gmfn": BAD_FRAME, "src_dom": abi.DOMID_SELF},
        "bad_page",
    ),
    Case(
        "copy: a bad frame of our own, by our numeric id",
        "copy",
        {"src_gmfn": BAD_FRAME, "src_dom": "self"},
        "permission_denied",
    ),
    Case("copy: read-only grant as destination", "copy", {"dst": ("ro", 0)}, "general_error"),
    Case(
        "copy: crossing the end of the source page",
        "copy",
        {"src": ("rw", 4000), "len": 200},
        "bad_copy_arg",
    ),
    Case(
        "copy: crossing the end of the destination page",
        "copy",
        {"dst": ("rw2", 4090), "len": 8},
        "bad_copy_arg",
    ),
    Case("copy: zero length", "copy", {"len": 0}, "okay"),
    Case("copy: ending exactly at the page end", "copy", {"dst": ("rw2", 4088), "len": 8}, "okay"),
    Case(
        "copy: a grant named by DOMID_SELF",
        "copy",
        {"src": ("rw", 0), "src_dom": abi.DOMID_SELF},
        "okay",
    ),
    Case(
        "setup_table: beyond max_grant_frames",
        "setup_table",
        {"nr_frames": 1 << 20},
        "general_error",
    ),
    Case("setup_table: unknown domain", "setup_table", {"dom": UNKNOWN}, "bad_domain"),
    Case("get_status_frames: a v1 table", "get_status_frames", {}, "general_error"),
    Case("query_size: self", "query_size", {"dom": abi.DOMID_SELF}, "okay", 0, ("max_nr_frames",)),
    Case("query_size: unknown domain", "query_size", {"dom": UNKNOWN}, "bad_domain"),
    Case("get_version: self", "get_version", {"dom": abi.DOMID_SELF}, None, 0, ("version",)),
    Case("get_version: unknown domain", "get_version", {"dom": UNKNOWN}, None, -errno.ESRCH),
    Case(
        "set_version: 1, the version in use", "set_version", {"version": 1}, None, 0, ("version",)
    ),
    Case("set_version: 3", "set_version", {"version": 3}, None, -errno.EINVAL, ("version",)),
]

Issue = Callable[[int, Any, int], int]


def make_refs(gntshr: Any, self_domid: int) -> tuple[dict[str, int], list[Any]]:
    """Grant the pages the cases name, through a portable Gntshr.

    Returns:
        ``(refs by role, shares to unshare afterwards)``.
    """
    rw = gntshr.share_pages(self_domid, 1)
    rw2 = gntshr.share_pages(self_domid, 1)
    ro = gntshr.share_pages(self_domid, 1, writable=False)
    theirs = gntshr.share_pages(UNKNOWN, 1)
    gone = gntshr.share_pages(self_domid, 1)
    gone_ref = gone.refs[0]
    gntshr.unshare(gone)
    rw.mem[:8] = b"ORACLE!!"
    refs = {
        "rw": rw.refs[0],
        "rw2": rw2.refs[0],
        "ro": ro.refs[0],
        "theirs": theirs.refs[0],
        "gone": gone_ref,
        "out_of_range": OUT_OF_RANGE,
    }
    return refs, [rw, rw2, ro, theirs]


def _status(code: int) -> str:
    return abi.GNTST_NAMES.get(code, str(code)).removeprefix("GNTST_")


def _call(issue: Issue, cmd: int, ops: Any) -> int:
    try:
        return issue(cmd, ops, 1)
    except OSError as e:  # a negative hypercall return (HypercallError is an OSError)
        return -(e.errno or errno.EIO)


#: each case command's op struct and GNTTABOP
OPS: dict[str, tuple[Any, int]] = {
    "map": (abi.gnttab_map_grant_ref, abi.GNTTABOP_map_grant_ref),
    "unmap": (abi.gnttab_unmap_grant_ref, abi.GNTTABOP_unmap_grant_ref),
    "copy": (abi.gnttab_copy, abi.GNTTABOP_copy),
    "setup_table": (abi.gnttab_setup_table, abi.GNTTABOP_setup_table),
    "get_status_frames": (abi.gnttab_get_status_frames, abi.GNTTABOP_get_status_frames),
    "query_size": (abi.gnttab_query_size, abi.GNTTABOP_query_size),
    "get_version": (abi.gnttab_get_version, abi.GNTTABOP_get_version),
    "set_version": (abi.gnttab_set_version, abi.GNTTABOP_set_version),
}
#: the ops with no status field: the result has their ``version`` instead
NO_STATUS = ("get_version", "set_version")


def run_case(case: Case, issue: Issue, refs: dict[str, int], self_domid: int) -> dict[str, Any]:
    """Issue one case; the result has ``rc``, ``status`` and the ``compare`` fields."""
    a = case.args
    if case.cmd not in OPS:  # pragma: no cover
        raise ValueError(case.cmd)
    struct, cmd = OPS[case.cmd]
    ops = (struct * 1)()
    op = ops[0]
    if case.cmd == "map":
        op.host_addr = HOST_ADDR
        op.flags = a.get("flags", abi.GNTMAP_host_map)
        op.ref = refs[a["ref"]]
        op.dom = a.get("dom", self_domid)
    elif case.cmd == "unmap":
        op.host_addr = HOST_ADDR
        op.handle = a["handle"]
    elif case.cmd == "copy":
        if "src_gmfn" in a:
            op.source.u.gmfn = a["src_gmfn"]
        else:
            role, off = a.get("src", ("rw", 0))
            op.source.u.ref, op.source.offset = refs[role], off
            op.flags |= abi.GNTCOPY_source_gref
        src_dom = a.get("src_dom", self_domid)
        op.source.domid = self_domid if src_dom == "self" else src_dom
        role, off = a.get("dst", ("rw2", 0))
        op.dest.u.ref, op.dest.offset, op.dest.domid = refs[role], off, self_domid
        op.flags |= abi.GNTCOPY_dest_gref
        op.len = a.get("len", 8)
    elif case.cmd in ("setup_table", "get_status_frames"):
        op.dom = a.get("dom", abi.DOMID_SELF)
        op.nr_frames = a.get("nr_frames", 1)
    elif case.cmd in ("query_size", "get_version"):
        op.dom = a["dom"]
    else:  # set_version
        op.version = a["version"]
    if case.cmd not in NO_STATUS:
        op.status = 1  # a status the hypercall leaves unwritten shows as 1
    out: dict[str, Any] = {"rc": _call(issue, cmd, ops)}
    if case.cmd in NO_STATUS:
        out["version"] = int(op.version)
    else:
        out["status"] = _status(op.status)
    if case.cmd == "map":
        out["handle"] = int(op.handle)
    elif case.cmd == "query_size":
        out["nr_frames"], out["max_nr_frames"] = int(op.nr_frames), int(op.max_nr_frames)
    return out


def check(case: Case, result: dict[str, Any]) -> list[str]:
    """What differs from the case's expectation (empty: as Xen 4.17 answers)."""
    problems = []
    if result["rc"] != case.rc:
        problems.append(f"rc {result['rc']} (expected {case.rc})")
    if case.status is not None and result.get("status") != case.status:
        problems.append(f"status {result.get('status')} (expected {case.status})")
    return problems


def run_cases(issue: Issue, refs: dict[str, int], self_domid: int) -> dict[str, dict[str, Any]]:
    """Every case, by name."""
    return {c.name: run_case(c, issue, refs, self_domid) for c in CASES}


def privcmd_issue(fd: int) -> Issue:
    """``issue(cmd, ops, count)`` through ``IOCTL_PRIVCMD_HYPERCALL`` on an open privcmd fd."""
    import fcntl

    def issue(cmd: int, ops: Any, count: int) -> int:
        hc = abi.privcmd_hypercall(op=abi.HYPERVISOR_grant_table_op)
        hc.arg[0], hc.arg[1], hc.arg[2] = cmd, ctypes.addressof(ops), count
        return int(fcntl.ioctl(fd, abi.IOCTL_PRIVCMD_HYPERCALL, hc, True))

    return issue
