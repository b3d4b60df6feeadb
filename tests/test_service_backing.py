"""Machine memory as a table of files (service/backing.py), in one process.

An :class:`~xengrant.EmbeddedXen` whose machine gets the service's hooks: each
allocation becomes a file of its owner, freed frames go back to the private
file, a page moved (prepare, end of a grant, transfer) gets a fresh file with
its content, and what a domain may be sent follows its grants.  Also the C
``vmap`` of frames from several files (one descriptor per frame).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import pytest

from xengrant import EmbeddedXen, _cext
from xengrant.errors import HypercallError
from xengrant.service import fixedmap
from xengrant.service.backing import GENERATION, PLACE, RECORD, UNPLACE, Backing, MemFile
from xengrant.service.memview import ClientMemory

PAGE = 4096


@pytest.fixture
def xb() -> Iterator[tuple[EmbeddedXen, Backing]]:
    xen = EmbeddedXen(16 << 20)
    b = Backing(xen._mmap, xen.fd, xen.nr_frames, limit=64)
    m = xen.hv.machine
    m.on_alloc, m.on_release, m.on_transfer = b.allocated, b.released, b.transferred
    try:
        yield xen, b
    finally:
        m.on_alloc = m.on_release = m.on_transfer = None
        b.close()
        xen.close()


def _records(sock: socket.socket) -> list[tuple[tuple[int, ...], list[int]]]:
    sock.setblocking(False)
    out = []
    while True:
        try:
            data, anc, _f, _a = sock.recvmsg(RECORD.size, socket.CMSG_SPACE(16))
        except BlockingIOError:
            return out
        fds = [int.from_bytes(c[i : i + 4], "little") for _l, _k, c in anc
               for i in range(0, len(c) - 3, 4)]
        rec = RECORD.unpack(data)
        if rec[0] == GENERATION:  # the first record: the generation page
            for fd in fds:
                os.close(fd)
            continue
        out.append((rec, fds))


def test_each_allocation_is_a_file_and_freed_frames_go_back(
    xb: tuple[EmbeddedXen, Backing],
) -> None:
    xen, b = xb
    d = xen.create_domain()
    files0 = len(b.files)
    pages = d.alloc_pages(16)  # one populate call of 16: one file
    mfns = [d.hypercalls._hv.domains[d.domid].p2m[g][0] for g in pages.gfns]
    assert len(b.files) == files0 + 1
    f = b.files[b.fid_of[mfns[0]]]
    assert (f.start, f.npages, f.owner) == (mfns[0], 16, d.domid)
    st = os.fstat(f.fd)
    assert st.st_size == 16 * PAGE and st.st_mode & 0o777 == 0o600
    with pytest.raises(OSError) as e:
        os.ftruncate(f.fd, 0)
    assert e.value.errno == errno.EPERM
    pages.mem[:5] = b"hello"  # through the service's view: lands in the file
    assert os.pread(f.fd, 5, 0) == b"hello"
    free = xen.hv.machine.free_frames
    pages.mem.release()
    pages.free()
    assert xen.hv.machine.free_frames == free + 16
    b.flush()  # the service flushes before it lets go of its lock
    assert len(b.files) == files0 and all(b.fid_of[m] == 0 for m in mfns)
    # the frames are the private file's again, zero
    assert bytes(xen.mem[mfns[0] * PAGE : mfns[0] * PAGE + 5]) == b"\0" * 5


def test_reach_sends_own_files_and_refuses_what_is_not_granted(
    xb: tuple[EmbeddedXen, Backing],
) -> None:
    xen, b = xb
    a, c = xen.create_domain(), xen.create_domain()
    side = b.open_side(c.domid)
    try:
        pages = a.alloc_pages(16)
        gfn = pages.gfns[3]
        ref = a.grant_table.grant_foreign_access(c.domid, gfn)  # no library hook in-process
        with c.gnttab.map_grant_ref(a.domid, ref) as m:
            hole = m.resource[0]
            dc = xen.hv.domains[c.domid]
            with pytest.raises(HypercallError) as e:
                b.reach(xen.hv.domains, dc, [hole], False)
            assert e.value.errno == errno.EACCES  # 15 neighbours share its file
            # the library's prepare: the page gets a file of its own, content kept
            pages.mem[3 * PAGE : 3 * PAGE + 4] = b"pg03"
            da = xen.hv.domains[a.domid]
            assert b.prepare_grant(da, [gfn], c.domid) == 1
            assert bytes(m.mem[:4]) == b"pg03"
            assert b.reach(xen.hv.domains, dc, [hole], False) == 1
            assert b.reach(xen.hv.domains, dc, [hole], False) == 0  # held already
            ((kind, fid, mfn, n, w), fds), = _records(side)
            assert (kind, n, w) == (PLACE, 1, 0)
            assert os.fstat(fds[0]).st_size == PAGE and os.pread(fds[0], 4, 0) == b"pg03"
            with pytest.raises(HypercallError) as e:
                b.reach(xen.hv.domains, dc, [0x12345], False)
            assert e.value.errno == errno.EFAULT
        a.grant_table.end_access(ref, release_ref=True)
        # the grant ended, the page stays a's: it leaves the file c holds
        assert b.end_grant(xen.hv.domains[a.domid], [gfn]) == 1
        ((kind, fid2, mfn2, n2, _w), _), = _records(side)
        assert (kind, fid2, mfn2, n2) == (UNPLACE, fid, mfn, 1)
        pages.mem[3 * PAGE : 3 * PAGE + 4] = b"new!"
        assert os.pread(fds[0], 4, 0) == b"pg03"  # c's kept file never sees it
        os.close(fds[0])
        pages.mem.release()
        pages.free()
    finally:
        side.close()
        b.close_side(c.domid)


def test_client_memory_places_and_unplaces(xb: tuple[EmbeddedXen, Backing]) -> None:
    """The client side: PLACE maps the file at its frames, UNPLACE takes it away."""
    xen, b = xb
    d = xen.create_domain()
    side = b.open_side(d.domid)
    cm = ClientMemory(side.detach(), xen.nr_frames)
    try:
        pages = d.alloc_pages(8)
        dd = xen.hv.domains[d.domid]
        mfns = [dd.p2m[g][0] for g in pages.gfns]
        cm.ensure(mfns, pages.gfns, True, lambda g, w: b.reach(xen.hv.domains, dd, g, w))
        view = cm.view(mfns, False)
        pages.mem[:3] = b"abc"
        assert bytes(memoryview(view)[:3]) == b"abc"  # the same frames
        view.close()
        scattered = cm.view([mfns[5], mfns[0]], True)  # a fresh mapping, read-only
        assert bytes(memoryview(scattered)[PAGE : PAGE + 3]) == b"abc"
        scattered.close()
        pages.mem.release()
        pages.free()
        b.flush()
        cm.drain()
        assert not cm.reachable(mfns, False) and not cm.files
    finally:
        cm.close()
        b.close_side(d.domid)


def test_vmap_of_several_files() -> None:
    fds = []
    for tag in (b"A", b"B"):
        fd = os.memfd_create("t")
        os.ftruncate(fd, 2 * PAGE)
        os.pwrite(fd, tag * PAGE + tag.lower() * PAGE, 0)
        fds.append(fd)
    try:
        v = _cext.vmap([fds[1], fds[0], fds[0]], [1, 0, 1], True)
        mv = memoryview(v)
        assert bytes(mv[::PAGE]) == b"bAa"
        assert mv.readonly
        mv.release()
        v.close()
        with pytest.raises(ValueError):
            _cext.vmap([fds[0]], [0, 1], False)  # one fd per frame
        with pytest.raises(ValueError):
            _cext.vmap([-1], [0], False)
        with pytest.raises(TypeError):
            _cext.vmap(["x"], [0], False)
    finally:
        for fd in fds:
            os.close(fd)


def test_fixed_placement_in_a_reservation() -> None:
    r = fixedmap.reserve(4 * PAGE)
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, PAGE)
        os.pwrite(fd, b"xyz", 0)
        base = fixedmap.address_of(r)
        fixedmap.place(base + 2 * PAGE, PAGE, fd, 0, False)
        assert r[2 * PAGE : 2 * PAGE + 3] == b"xyz"
        fixedmap.clear(base + 2 * PAGE, PAGE)
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        with pytest.raises(OSError) as e:
            fixedmap.place(base, PAGE, ro, 0, True)
        assert e.value.errno == errno.EACCES
        os.close(ro)
    finally:
        os.close(fd)
        r.close()
    assert MemFile  # exported for the stats' sake
