"""xengrant.linux against a real Xen 4.17 hypervisor and Linux's real drivers (in dom0).

The issue's checklist: share 1, 16 and 1024 pages, map them one by one,
batched and contiguous, write and read both ways (also in
test_scenarios_xen.py); GRANT_COPY; a read-only mapping refuses writes;
unmap notify (clear byte and event) fires; nothing is left mapped or
allocated at the end.
"""

from __future__ import annotations

import errno

import pytest

from xengrant import BatchError, GrantError, GrantTableFull, abi
from xengrant.linux import Backend, EventChannels, LinuxGrantError, LinuxGrantTableFull
from xengrant.linux._device import buffer_address
from xengrant.portable import CopySegment, GrantRef

P = 4096


@pytest.mark.parametrize("count", [1, 16, 1024])
def test_share_and_map_every_way(xen: Backend, count: int) -> None:
    share = xen.gntshr.share_pages(0, count)
    for i in range(count):
        share.mem[i * P : i * P + 12] = b"page %07d" % i
    # contiguous, all in one
    with xen.gnttab.map_domain_grant_refs(0, share.refs) as m:
        for i in range(count):
            assert bytes(m.mem[i * P : i * P + 12]) == b"page %07d" % i
            m.mem[i * P + 100 : i * P + 104] = b"back"
    # batched, as (domid, ref) pairs, in reverse
    with xen.gnttab.map_grant_refs([(0, r) for r in reversed(share.refs)]) as m:
        assert bytes(m.mem[(count - 1) * P : (count - 1) * P + 12]) == b"page %07d" % 0
    # one by one (every page for small shares, a sample of the 1024)
    for i in range(count) if count <= 16 else range(0, count, 97):
        with xen.gnttab.map_grant_ref(0, share.refs[i]) as m1:
            assert bytes(m1.mem[:12]) == b"page %07d" % i
            m1.mem[200:204] = b"one!"
    for i in range(count):
        assert bytes(share.mem[i * P + 100 : i * P + 104]) == b"back"
    xen.gntshr.unshare(share)


def test_readonly_mapping_refuses_writes(xen: Backend) -> None:
    share = xen.gntshr.share_pages(0, 1)
    share.mem[:4] = b"data"
    with xen.gnttab.map_grant_ref(0, share.refs[0], writable=False) as m:
        assert m.mem.readonly and bytes(m.mem[:4]) == b"data"
        with pytest.raises(TypeError):
            m.mem[0:1] = b"x"
    ro = xen.gntshr.share_pages(0, 1, writable=False)
    with pytest.raises(GrantError) as ei:
        xen.gnttab.map_grant_ref(0, ro.refs[0], writable=True)
    assert isinstance(ei.value, LinuxGrantError) and ei.value.errno == errno.EINVAL
    assert ei.value.status == abi.GNTST_general_error
    xen.gntshr.unshare(ro)
    xen.gntshr.unshare(share)


def test_errors_carry_errno_and_xen_status(xen: Backend) -> None:
    share = xen.gntshr.share_pages(0, 2)
    with pytest.raises(GrantError) as ei:
        xen.gnttab.map_grant_ref(0, 1_000_000)
    e = ei.value
    assert isinstance(e, LinuxGrantError) and e.errno == errno.EINVAL
    assert e.status == abi.GNTST_bad_gntref and "EINVAL" in str(e)
    with pytest.raises(GrantError) as ei:
        xen.gnttab.map_grant_ref(100, share.refs[0])
    assert ei.value.status == abi.GNTST_bad_domain
    with pytest.raises(BatchError) as bi:
        xen.gnttab.map_grant_refs([(0, share.refs[0]), (0, 1_000_000), (0, share.refs[1])])
    assert bi.value.statuses == [abi.GNTST_okay, abi.GNTST_bad_gntref, abi.GNTST_okay]
    xen.gntshr.unshare(share)


def test_grant_copy(xen: Backend) -> None:
    share = xen.gntshr.share_pages(0, 2)
    out = bytearray(8)
    segs = [
        CopySegment(b"COPYDATA", GrantRef(0, share.refs[0], 100), 8),
        CopySegment(GrantRef(0, share.refs[0], 100), out, 8),
        CopySegment(GrantRef(0, share.refs[0], 100), GrantRef(0, share.refs[1], 4088), 8),
        CopySegment(GrantRef(0, 1_000_000), bytearray(4), 4),
        CopySegment(GrantRef(100, share.refs[0]), bytearray(4), 4),
        CopySegment(b"xy", GrantRef(0, share.refs[0], P - 1), 2),
    ]
    st = xen.gnttab.grant_copy(segs)
    assert st == [
        abi.GNTST_okay,
        abi.GNTST_okay,
        abi.GNTST_okay,
        abi.GNTST_bad_gntref,
        abi.GNTST_bad_domain,
        abi.GNTST_bad_copy_arg,
    ]
    assert out == b"COPYDATA" and bytes(share.mem[P + 4088 : 2 * P]) == b"COPYDATA"
    xen.gntshr.unshare(share)


def test_unmap_notify_from_the_mapper(xen: Backend, evtchn: EventChannels) -> None:
    a, b = evtchn.loopback(0)
    share = xen.gntshr.share_pages(0, 2)
    share.mem[P + 10] = 0x55
    m = xen.gnttab.map_domain_grant_refs(0, share.refs, notify_offset=P + 10, notify_port=b)
    assert share.mem[P + 10] == 0x55
    evtchn.drain()
    m.unmap()
    assert share.mem[P + 10] == 0  # gntdev cleared the byte in the granted page
    evtchn.wait_for(a, timeout=10.0)  # and signalled the other end of b
    xen.gntshr.unshare(share)


def test_unmap_notify_from_the_sharer(xen: Backend, evtchn: EventChannels) -> None:
    a, b = evtchn.loopback(0)
    share = xen.gntshr.share_pages(0, 1, notify_offset=20, notify_port=a)
    m = xen.gnttab.map_grant_ref(0, share.refs[0])
    m.mem[20] = 7
    xen.gntshr.unshare(share)  # the sharer goes away while the peer maps
    assert m.mem[20] == 0  # gntalloc cleared the byte
    evtchn.wait_for(b, timeout=10.0)
    m.unmap()


def test_unshare_while_mapped_is_deferred(xen: Backend) -> None:
    share = xen.gntshr.share_pages(0, 1)
    share.mem[:5] = b"alive"
    m = xen.gnttab.map_grant_ref(0, share.refs[0])
    xen.gntshr.unshare(share)  # munmap after DEALLOC_GREF: Linux defers the end of access
    assert share.released
    assert bytes(m.mem[:5]) == b"alive"
    m.mem[:5] = b"still"
    assert bytes(m.mem[:5]) == b"still"
    m.unmap()


def test_exported_views_block_release(xen: Backend) -> None:
    share = xen.gntshr.share_pages(0, 1)
    m = xen.gnttab.map_grant_ref(0, share.refs[0])
    view = m.mem[:8]
    with pytest.raises(BufferError):
        m.unmap()
    view.release()
    m.unmap()
    sview = share.mem[:8]
    with pytest.raises(BufferError):
        xen.gntshr.unshare(share)
    sview.release()
    xen.gntshr.unshare(share)


def test_offset_for_address(xen: Backend) -> None:
    share = xen.gntshr.share_pages(0, 3)
    m = xen.gnttab.map_domain_grant_refs(0, share.refs)
    assert xen.gnttab.offset_for_address(buffer_address(m._view)) == (m.resource, 3)
    m.unmap()
    xen.gntshr.unshare(share)


def test_gntalloc_limit_is_grant_table_full(xen: Backend, limit: int) -> None:
    with pytest.raises(GrantTableFull) as ei:
        xen.gntshr.share_pages(0, limit + 1)
    assert isinstance(ei.value, LinuxGrantTableFull) and ei.value.errno == errno.ENOSPC
    assert ei.value.limit == limit
