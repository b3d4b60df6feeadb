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
        rc: the expected hypercall return (``-errno``); None for a generated
            case, which has no expectation of its own: the real hypervisor's
            answer is the expectation (tests_xen/, and the recording of it,
            tests/oracle_xen417.json, in tests/test_oracle.py).
        compare: result keys both sides must agree on besides rc/status.
    """

    name: str
    cmd: str
    args: dict[str, Any]
    status: str | None
    rc: int | None = 0
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


def _call(issue: Issue, cmd: int, ops: Any, count: int = 1) -> int:
    try:
        return issue(cmd, ops, count)
    except OSError as e:  # a negative hypercall return (HypercallError is an OSError)
        return -(e.errno or errno.EIO)


#: each case command's op struct and GNTTABOP
OPS: dict[str, tuple[Any, int]] = {
    "map": (abi.gnttab_map_grant_ref, abi.GNTTABOP_map_grant_ref),
    "unmap": (abi.gnttab_unmap_grant_ref, abi.GNTTABOP_unmap_grant_ref),
    "unmap_and_replace": (abi.gnttab_unmap_and_replace, abi.GNTTABOP_unmap_and_replace),
    "copy": (abi.gnttab_copy, abi.GNTTABOP_copy),
    "transfer": (abi.gnttab_transfer, abi.GNTTABOP_transfer),
    "setup_table": (abi.gnttab_setup_table, abi.GNTTABOP_setup_table),
    "get_status_frames": (abi.gnttab_get_status_frames, abi.GNTTABOP_get_status_frames),
    "query_size": (abi.gnttab_query_size, abi.GNTTABOP_query_size),
    "get_version": (abi.gnttab_get_version, abi.GNTTABOP_get_version),
    "set_version": (abi.gnttab_set_version, abi.GNTTABOP_set_version),
    "swap": (abi.gnttab_swap_grant_ref, abi.GNTTABOP_swap_grant_ref),
    "cache_flush": (abi.gnttab_cache_flush, abi.GNTTABOP_cache_flush),
    "raw": (ctypes.c_uint8 * 64, -1),
}
#: the ops with no status field: the result has their ``version`` instead
NO_STATUS = ("get_version", "set_version", "cache_flush", "raw")


def _dom(dom: str | int, self_domid: int) -> int:
    """A domain id, ``"self"`` being the caller's own numeric id."""
    return self_domid if dom == "self" else int(dom)


def _ref(refs: dict[str, int], ref: str | int) -> int:
    """A ref by role (``rw``, ``gone`` ...) or a number."""
    return refs[ref] if isinstance(ref, str) else ref


def _fill(case: Case, op: Any, refs: dict[str, int], self_domid: int) -> None:
    """Write the case's arguments into its op struct."""
    a = case.args
    if case.cmd == "map":
        op.host_addr = a.get("host_addr", HOST_ADDR)
        op.flags = a.get("flags", abi.GNTMAP_host_map)
        op.ref = _ref(refs, a["ref"])
        op.dom = a.get("dom", self_domid)
    elif case.cmd in ("unmap", "unmap_and_replace"):
        op.host_addr = a.get("host_addr", HOST_ADDR)
        if case.cmd == "unmap":
            op.dev_bus_addr = a.get("dev_bus_addr", 0)
        else:
            op.new_addr = a.get("new_addr", 0)
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
        if "dst_gmfn" in a:
            op.dest.u.gmfn = a["dst_gmfn"]
            op.dest.offset = a.get("dst_off", 0)
        else:
            role, off = a.get("dst", ("rw2", 0))
            op.dest.u.ref, op.dest.offset = refs[role], off
            op.flags |= abi.GNTCOPY_dest_gref
        dst_dom = a.get("dst_dom", self_domid)
        op.dest.domid = self_domid if dst_dom == "self" else dst_dom
        op.len = a.get("len", 8)
    elif case.cmd == "transfer":
        op.mfn, op.domid, op.ref = a["mfn"], a.get("domid", self_domid), _ref(refs, a["ref"])
    elif case.cmd in ("setup_table", "get_status_frames"):
        op.dom = _dom(a.get("dom", abi.DOMID_SELF), self_domid)
        op.nr_frames = a.get("nr_frames", 1)
        op.frame_list = a.get("frame_list", 0)
    elif case.cmd in ("query_size", "get_version"):
        op.dom = _dom(a["dom"], self_domid)
    elif case.cmd == "set_version":
        op.version = a["version"]
    elif case.cmd == "swap":
        op.ref_a, op.ref_b = _ref(refs, a["a"]), _ref(refs, a["b"])
    elif case.cmd == "cache_flush":
        op.a.dev_bus_addr, op.offset, op.length, op.op = (
            a["dev_bus_addr"],
            a["offset"],
            a["length"],
            a["op"],
        )


def run_case(case: Case, issue: Issue, refs: dict[str, int], self_domid: int) -> dict[str, Any]:
    """Issue one case; the result has ``rc``, ``status`` and the ``compare`` fields.

    A device map that succeeds (generated cases) is unmapped again at once,
    and the unmap's status is in the result too (``unmap_status``).
    """
    a = case.args
    if case.cmd not in OPS:  # pragma: no cover
        raise ValueError(case.cmd)
    struct, cmd = OPS[case.cmd]
    if case.cmd == "raw":
        cmd = a["cmd"]
    ops = (struct * 1)()
    op = ops[0]
    _fill(case, op, refs, self_domid)
    if case.cmd not in NO_STATUS:
        op.status = 1  # a status the hypercall leaves unwritten shows as 1
    out: dict[str, Any] = {"rc": _call(issue, cmd | a.get("cmd_bits", 0), ops, a.get("count", 1))}
    if case.cmd in ("get_version", "set_version"):
        out["version"] = int(op.version)
    elif case.cmd not in NO_STATUS:
        out["status"] = _status(op.status)
    if case.cmd == "map":
        out["handle"] = int(op.handle)
        if out["rc"] == 0 and op.status == abi.GNTST_okay:
            out["unmap_status"] = _undo_map(issue, op)
    elif case.cmd == "query_size":
        out["nr_frames"], out["max_nr_frames"] = int(op.nr_frames), int(op.max_nr_frames)
    return out


def _undo_map(issue: Issue, op: Any) -> str:
    """Unmap what a successful (device) map case mapped; the unmap's status."""
    un = (abi.gnttab_unmap_grant_ref * 1)()
    un[0].handle, un[0].dev_bus_addr = op.handle, op.dev_bus_addr
    un[0].host_addr = op.host_addr if op.flags & abi.GNTMAP_host_map else 0
    un[0].status = 1
    rc = _call(issue, abi.GNTTABOP_unmap_grant_ref, un)
    return f"rc {rc}" if rc else _status(un[0].status)


def check(case: Case, result: dict[str, Any]) -> list[str]:
    """What differs from the case's expectation (empty: as Xen 4.17 answers)."""
    problems = []
    if case.rc is not None and result["rc"] != case.rc:
        problems.append(f"rc {result['rc']} (expected {case.rc})")
    if case.status is not None and result.get("status") != case.status:
        problems.append(f"status {result.get('status')} (expected {case.status})")
    return problems


def agree(case: Case, emu: dict[str, Any], real: dict[str, Any]) -> list[str]:
    """Where the emulator's answer to ``case`` differs from the real one:
    the hypercall's return, the status, the unmap of a successful map, and
    the case's ``compare`` fields."""
    keys = ("rc", "status", "unmap_status", *case.compare)
    return [
        f"{k}: emulator {emu.get(k)!r}, Xen {real.get(k)!r}"
        for k in keys
        if emu.get(k) != real.get(k)
    ]


def run_cases(
    issue: Issue, refs: dict[str, int], self_domid: int, cases: list[Case] | None = None
) -> dict[str, dict[str, Any]]:
    """Every case (or ``cases``), by name."""
    return {
        c.name: run_case(c, issue, refs, self_domid) for c in (CASES if cases is None else cases)
    }


def privcmd_issue(fd: int) -> Issue:
    """``issue(cmd, ops, count)`` through ``IOCTL_PRIVCMD_HYPERCALL`` on an open privcmd fd."""
    import fcntl

    def issue(cmd: int, ops: Any, count: int) -> int:
        hc = abi.privcmd_hypercall(op=abi.HYPERVISOR_grant_table_op)
        hc.arg[0], hc.arg[1], hc.arg[2] = cmd, ctypes.addressof(ops), count
        return int(fcntl.ioctl(fd, abi.IOCTL_PRIVCMD_HYPERCALL, hc, True))

    return issue


# ----------------------------------------------------------- generated cases
#: the flag bits the generated map cases combine
_MAP_BITS = (
    (abi.GNTMAP_device_map, "dev"),
    (abi.GNTMAP_host_map, "host"),
    (abi.GNTMAP_readonly, "ro"),
    (abi.GNTMAP_application_map, "app"),
    (abi.GNTMAP_contains_pte, "pte"),
)
#: a contains_pte host_addr naming a machine frame far beyond any RAM (8-aligned
#: and misaligned): refused before any page table is touched
PTE_ADDR = (1 << 40) + 8
#: a bad device address for unmaps
BAD_BUS = 1 << 40


def _flag_name(flags: int) -> str:
    return "|".join(n for bit, n in _MAP_BITS if flags & bit) or "0"


def _map_is_safe(flags: int, ref: str, dom: object) -> bool:
    """A map case that cannot create a host mapping in dom0's page tables.

    A host map without contains_pte of a grant valid for dom0 would map into
    the calling process's address space: never generated.  Device-only maps
    of valid grants are (undone at once); contains_pte maps name a frame far
    beyond RAM, refused by create_grant_pv_mapping.
    """
    host = flags & abi.GNTMAP_host_map and not flags & abi.GNTMAP_contains_pte
    valid = dom == "self" and (ref == "rw" or (ref == "ro" and flags & abi.GNTMAP_readonly))
    return not (host and valid)


def generated_cases() -> list[Case]:
    """Combinations of every GNTTABOP's inputs, without expectations.

    Generated, not hand-picked: every combination of the map flags (device,
    host, readonly, application, contains_pte) with refs of every kind and a
    known or unknown granter; copies of every source kind against every
    destination kind, with lengths and offsets inside and across the page (so
    the order Xen checks them in decides the status); setup_table,
    get_status_frames, query_size, get_version and set_version with their
    domain, size, version and count inputs; swap, unmap, unmap_and_replace,
    transfer and cache_flush with bad and harmless arguments; command words
    with continuation bits and unknown commands.  Only inputs that cannot
    touch dom0's page tables or memory outside its own shares are generated
    (see :func:`_map_is_safe`; gmfn destinations are always bad frames).
    """
    cases: list[Case] = []
    add = cases.append
    doms = (("self", "self"), ("unknown", UNKNOWN))
    for flags in range(32):
        fl = sum(bit for i, (bit, _n) in enumerate(_MAP_BITS) if flags >> i & 1)
        for ref in ("rw", "ro", "gone", "theirs", "out_of_range"):
            for dname, dom in doms:
                if not _map_is_safe(fl, ref, dname):
                    continue
                args: dict[str, Any] = {"flags": fl, "ref": ref}
                if dname != "self":
                    args["dom"] = dom
                if fl & abi.GNTMAP_contains_pte:
                    args["host_addr"] = PTE_ADDR
                add(Case(f"gen map {_flag_name(fl)} {ref} dom={dname}", "map", args, None, None))
    add(
        Case(
            "gen map host|pte misaligned",
            "map",
            {
                "flags": abi.GNTMAP_host_map | abi.GNTMAP_contains_pte,
                "ref": "rw",
                "host_addr": PTE_ADDR + 3,
            },
            None,
            None,
        )
    )
    sources: list[tuple[str, dict[str, Any]]] = [
        (f"gref:{r}", {"src": (r, 0)}) for r in ("rw", "ro", "gone", "theirs", "out_of_range")
    ]
    sources += [
        ("gref:rw@unknown", {"src": ("rw", 0), "src_dom": UNKNOWN}),
        ("gmfn:bad@SELF", {"src_gmfn": BAD_FRAME, "src_dom": abi.DOMID_SELF}),
        ("gmfn:bad@self-id", {"src_gmfn": BAD_FRAME, "src_dom": "self"}),
        ("gmfn:1@unknown", {"src_gmfn": 1, "src_dom": UNKNOWN}),
    ]
    dests: list[tuple[str, dict[str, Any]]] = [
        (f"gref:{r}", {"dst": (r, 0)}) for r in ("rw2", "ro", "gone", "out_of_range")
    ]
    dests += [
        ("gref:rw2@unknown", {"dst": ("rw2", 0), "dst_dom": UNKNOWN}),
        ("gmfn:bad@SELF", {"dst_gmfn": BAD_FRAME, "dst_dom": abi.DOMID_SELF}),
        ("gmfn:bad@self-id", {"dst_gmfn": BAD_FRAME, "dst_dom": "self"}),
    ]
    spans = (
        ("8@0", 0, 0, 8),
        ("0@0", 0, 0, 0),
        ("src-crosses", 4090, 0, 8),
        ("dst-crosses", 0, 4090, 8),
        ("whole", 0, 0, 4096),
        ("len>page", 0, 0, 4097),
    )
    for sname, sargs in sources:
        for dname, dargs in dests:
            for span, soff, doff, length in spans:
                args = {**sargs, **dargs, "len": length}
                if "src" in args:
                    args["src"] = (args["src"][0], soff)
                if "dst" in args:
                    args["dst"] = (args["dst"][0], doff)
                elif doff:
                    args["dst_off"] = doff
                add(Case(f"gen copy {sname} -> {dname} {span}", "copy", args, None, None))
    for nr in (0, 1, 65, 1 << 20):
        for dname, dom in (("SELF", abi.DOMID_SELF), ("self-id", "self"), ("unknown", UNKNOWN)):
            for count in (1, 0, 2):
                args = {"nr_frames": nr, "dom": dom, "count": count}
                add(
                    Case(
                        f"gen setup_table nr={nr} dom={dname} count={count}",
                        "setup_table",
                        args,
                        None,
                        None,
                    )
                )
                if nr < 65:
                    add(
                        Case(
                            f"gen get_status_frames nr={nr} dom={dname} count={count}",
                            "get_status_frames",
                            dict(args),
                            None,
                            None,
                        )
                    )
    for dname, dom in (("SELF", abi.DOMID_SELF), ("self-id", "self"), ("unknown", UNKNOWN)):
        for count in (1, 0, 2):
            add(
                Case(
                    f"gen query_size dom={dname} count={count}",
                    "query_size",
                    {"dom": dom, "count": count},
                    None,
                    None,
                )
            )
            add(
                Case(
                    f"gen get_version dom={dname} count={count}",
                    "get_version",
                    {"dom": dom, "count": count},
                    None,
                    None,
                    ("version",),
                )
            )
    for version in (0, 1, 3, 0x101, 0xFFFFFFFF):
        for count in (1, 0, 3):
            add(
                Case(
                    f"gen set_version {version:#x} count={count}",
                    "set_version",
                    {"version": version, "count": count},
                    None,
                    None,
                    ("version",),
                )
            )
    for ra, rb in (
        ("out_of_range", 8),
        (8, "out_of_range"),
        ("out_of_range", "out_of_range"),
        (8, 8),
        ("rw", "rw"),
    ):
        add(Case(f"gen swap {ra} {rb}", "swap", {"a": ra, "b": rb}, None, None))
    for handle in (0x7FFFFFF, 0xFFFFFFFF):
        for host in (0, HOST_ADDR):
            for bus in (0, BAD_BUS):
                add(
                    Case(
                        f"gen unmap handle={handle:#x} host={host:#x} bus={bus:#x}",
                        "unmap",
                        {"handle": handle, "host_addr": host, "dev_bus_addr": bus},
                        None,
                        None,
                    )
                )
            add(
                Case(
                    f"gen unmap_and_replace handle={handle:#x} host={host:#x}",
                    "unmap_and_replace",
                    {"handle": handle, "host_addr": host, "new_addr": HOST_ADDR},
                    None,
                    None,
                )
            )
    for dname, dom in (("self-id", "self"), ("unknown", UNKNOWN)):
        for ref in (8, "out_of_range"):
            add(
                Case(
                    f"gen transfer bad-frame to {dname} ref={ref}",
                    "transfer",
                    {"mfn": BAD_FRAME, "domid": 0 if dom == "self" else dom, "ref": ref},
                    None,
                    None,
                )
            )
    ops_ = (
        ("0", 0),
        ("clean", abi.GNTTAB_CACHE_CLEAN),
        ("inval", abi.GNTTAB_CACHE_INVAL),
        ("both", abi.GNTTAB_CACHE_CLEAN | abi.GNTTAB_CACHE_INVAL),
        ("bit2", 4),
        ("source_gref", abi.GNTTAB_CACHE_SOURCE_GREF | abi.GNTTAB_CACHE_CLEAN),
    )
    for oname, what in ops_:
        for sname, off, length in (
            ("8@0", 0, 8),
            ("0@0", 0, 0),
            ("off=4096", 4096, 0),
            ("len=4097", 0, 4097),
            ("crosses", 4000, 200),
        ):
            for bits in (0, 1 << 12):
                add(
                    Case(
                        f"gen cache_flush {oname} {sname} cont={bits >> 12}",
                        "cache_flush",
                        {
                            "dev_bus_addr": BAD_FRAME << 12,
                            "offset": off,
                            "length": length,
                            "op": what,
                            "cmd_bits": bits,
                        },
                        None,
                        None,
                    )
                )
    for name, cmd, count in (
        ("map|0x1000", abi.GNTTABOP_map_grant_ref | 0x1000, 1),
        ("query_size|1<<31", abi.GNTTABOP_query_size | (1 << 31), 1),
        ("13", 13, 1),
        ("0xfff", 0xFFF, 1),
        ("13|0x1000", 13 | 0x1000, 1),
        ("dump_table", abi.GNTTABOP_dump_table, 1),
        ("map count=-1", abi.GNTTABOP_map_grant_ref, -1),
        ("0xfff count=-1", 0xFFF, -1),
        ("map count=0", abi.GNTTABOP_map_grant_ref, 0),
        ("copy count=0", abi.GNTTABOP_copy, 0),
    ):
        add(Case(f"gen raw cmd={name}", "raw", {"cmd": cmd, "count": count}, None, None))
    return cases


#: every generated case (a few hundred)
GENERATED: list[Case] = generated_cases()
