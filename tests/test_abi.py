"""xengrant.abi in plain Python (no C compiler): error texts, ioctl numbers, builders.

tests/test_abi_headers.py checks every value against the C headers; these
tests pin the x86-64 reference numbers and the helpers' behaviour even where
the headers are not installed.
"""

from __future__ import annotations

import ctypes

import pytest

from xengrant import abi
from xengrant.abi import evtchn, gntalloc, gntdev, grant_table, privcmd
from xengrant.abi.privcmd import _IOC, _IOC_NONE, _IOC_READ, _IOC_WRITE, _tail, _with_tail


# ---------------------------------------------------------- gnttabop_error
@pytest.mark.parametrize("status", sorted(grant_table.GNTST_NAMES, reverse=True))
def test_gnttabop_error_known(status: int) -> None:
    assert grant_table.gnttabop_error(status) == grant_table.GNTTABOP_error_msgs[-status]


def test_gnttabop_error_covers_every_gntst() -> None:
    assert sorted(grant_table.GNTST_NAMES) == list(range(-13, 1))
    assert len(grant_table.GNTTABOP_error_msgs) == 14
    assert grant_table.gnttabop_error(grant_table.GNTST_okay) == "okay"
    assert grant_table.gnttabop_error(grant_table.GNTST_no_space) == "out of space"


@pytest.mark.parametrize("status", [-14, 1, -1000, "x", None, 2.0])
def test_gnttabop_error_unknown(status: object) -> None:
    text = grant_table.gnttabop_error(status)  # type: ignore[arg-type]
    assert "unknown" in text and repr(status) in text
    assert text not in grant_table.GNTTABOP_error_msgs


# ------------------------------------------------------------------ _IOC
REFERENCE_X86_64 = {
    "IOCTL_GNTALLOC_ALLOC_GREF": 0x00184705,
    "IOCTL_GNTALLOC_DEALLOC_GREF": 0x00104706,
    "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY": 0x00104707,
    "IOCTL_GNTDEV_MAP_GRANT_REF": 0x00184700,
    "IOCTL_GNTDEV_UNMAP_GRANT_REF": 0x00104701,
    "IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR": 0x00184702,
    "IOCTL_GNTDEV_SET_MAX_GRANTS": 0x00044703,
    "IOCTL_GNTDEV_SET_UNMAP_NOTIFY": 0x00104707,
    "IOCTL_GNTDEV_GRANT_COPY": 0x00104708,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_X86_64))
def test_ioctl_reference_numbers(name: str) -> None:
    assert getattr(abi, name) == REFERENCE_X86_64[name]


def test_ioc_layout() -> None:
    assert (_IOC_NONE, _IOC_WRITE, _IOC_READ) == (0, 1, 2)
    assert _IOC(_IOC_NONE, "G", 5, 24) == _IOC(_IOC_NONE, ord("G"), 5, 24) == 0x00184705
    assert _IOC(_IOC_READ | _IOC_WRITE, "E", 0xFF, 0x3FFF) == 0xFFFF45FF
    assert evtchn.IOCTL_EVTCHN_RESET == 0x00004505
    assert _IOC(_IOC_NONE, "P", 6, 2) == privcmd.IOCTL_PRIVCMD_RESTRICT


@pytest.mark.parametrize(
    "args",
    [(4, "G", 0, 0), (0, 256, 0, 0), (0, "G", 256, 0), (0, "G", 0, 1 << 14), (0, "G", -1, 0)],
)
def test_ioc_rejects_out_of_range(args: tuple[int, str | int, int, int]) -> None:
    with pytest.raises(ValueError):
        _IOC(*args)


def test_sizes_and_reexports() -> None:
    assert ctypes.sizeof(gntdev.gntdev_grant_copy_segment) == 24
    assert ctypes.sizeof(gntalloc.ioctl_gntalloc_alloc_gref) == 24  # gref_ids[1] + padding
    assert ctypes.sizeof(privcmd.privcmd_hypercall) == 48
    assert abi.IOCTL_PRIVCMD_HYPERCALL == privcmd.IOCTL_PRIVCMD_HYPERCALL
    assert abi.UNMAP_NOTIFY_SEND_EVENT == gntalloc.UNMAP_NOTIFY_SEND_EVENT == 2
    assert grant_table.XEN_PAGE_SIZE == 1 << grant_table.XEN_PAGE_SHIFT == 4096
    assert not hasattr(abi, "_IOC")  # private helpers stay out of the star imports


def test_grant_copy_segment_union() -> None:
    seg = gntdev.gntdev_grant_copy_segment(len=16, flags=grant_table.GNTCOPY_source_gref)
    seg.source.foreign.ref, seg.source.foreign.offset, seg.source.foreign.domid = 7, 12, 3
    seg.dest.virt = 0x1000
    raw = bytes(seg)
    assert raw[0:8] == (7).to_bytes(4, "little") + (12).to_bytes(2, "little") + b"\x03\x00"
    assert raw[8:16] == (0x1000).to_bytes(8, "little")
    segs = (gntdev.gntdev_grant_copy_segment * 2)(seg, seg)
    op = gntdev.ioctl_gntdev_grant_copy(count=2, segments=segs)
    assert op.segments[1].source.foreign.domid == 3


# --------------------------------------------------- variable-size builders
def _nbytes(op: ctypes.Structure) -> int:
    """What fcntl.ioctl would pass to the driver for ``op``."""
    return memoryview(op).nbytes


@pytest.mark.parametrize("count", [0, 1, 2, 5, 300])
def test_alloc_gref_round_trip(count: int) -> None:
    op = gntalloc.alloc_gref_request(3, gntalloc.GNTALLOC_FLAG_WRITABLE, count)
    assert (op.domid, op.flags, op.count, op.index) == (3, 1, count, 0)
    assert _nbytes(op) == max(24, 16 + 4 * count)
    assert gntalloc.alloc_gref_ids(op) == [0] * count  # grown bytes are zeroed
    _tail(op, "gref_ids", count)[:] = list(range(100, 100 + count))  # as the driver writes
    assert gntalloc.alloc_gref_ids(op) == list(range(100, 100 + count))
    raw = bytes(memoryview(op).cast("B"))
    assert raw[16 : 16 + 4 * count] == b"".join(
        (100 + i).to_bytes(4, "little") for i in range(count)
    )


def test_alloc_gref_ids_checks_room() -> None:
    op = gntalloc.alloc_gref_request(0, 0, 2)
    op.count = 3  # more than the buffer holds
    with pytest.raises(ValueError, match="no room"):
        gntalloc.alloc_gref_ids(op)


def test_map_grant_ref_round_trip() -> None:
    refs = [(1, 8), (1, 9), (2, 10)]
    op = gntdev.map_grant_ref_request(refs)
    assert (op.count, op.pad, op.index) == (3, 0, 0)
    assert _nbytes(op) == 16 + 8 * 3
    assert gntdev.map_grant_refs(op) == refs
    assert op.refs[0].domid == 1 and op.refs[0].ref == 8
    raw = bytes(memoryview(op).cast("B"))
    assert raw[16:] == b"".join(
        d.to_bytes(4, "little") + r.to_bytes(4, "little") for d, r in refs
    )
    assert gntdev.map_grant_refs(gntdev.map_grant_ref_request([])) == []


def test_dmabuf_round_trips() -> None:
    exp = gntdev.dmabuf_exp_from_refs_request(5, [11, 12, 13, 14], gntdev.GNTDEV_DMA_FLAG_WC)
    assert (exp.flags, exp.count, exp.fd, exp.domid) == (1, 4, 0, 5)
    assert _nbytes(exp) == 16 + 4 * 4
    assert gntdev.dmabuf_refs(exp) == [11, 12, 13, 14]

    imp = gntdev.dmabuf_imp_to_refs_request(fd=9, domid=2, count=3)
    assert (imp.fd, imp.count, imp.domid, imp.reserved) == (9, 3, 2, 0)
    assert gntdev.dmabuf_refs(imp) == [0, 0, 0]
    _tail(imp, "refs", 3)[:] = [21, 22, 23]
    assert gntdev.dmabuf_refs(imp) == [21, 22, 23]


def test_with_tail_edge_cases() -> None:
    op = gntalloc.ioctl_gntalloc_alloc_gref()
    assert _with_tail(op, "gref_ids", 1) is op and ctypes.sizeof(op) == 24  # never shrinks
    with pytest.raises(ValueError):
        _with_tail(op, "gref_ids", -1)
    with pytest.raises(AttributeError):
        _with_tail(op, "nosuch", 1)
