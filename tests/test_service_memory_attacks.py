"""A hostile domain process attacks machine memory (issue 14: Memory, and its attacks).

Each test runs a service, dom0, a bystander domain that keeps private pages
and grants some to the hostile one, and the hostile domain process.  The
hostile process goes through every descriptor it holds (``/proc/self/fd``):
maps each read-write and read-only, truncates, grows, punches; it reads
frames it was never given, neighbours of a page it mapped, a read-only grant
through a store, and pages after their grant ended and the frame was reused.
Each attempt must fail with the kernel's error (or a fault, in a forked
child), the bystander's pages must be unchanged, and the service's tables,
free frames, files and descriptors must come back when everyone is gone.

The functions above the tests run inside the domain processes
(``cmd_call``).  Where the hostile process drops to uid 65534 (when the
tests run as root), a read-only descriptor cannot be reopened read-write
through ``/proc/self/fd``; between processes of one uid it can (see the
Trust section of docs/service.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import signal
import stat
from collections.abc import Iterator
from typing import Any

import pytest

from service_helpers import Actor, Service
from xengrant.service import stats

PAGE = 4096
MOD = __name__
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
NOBODY = 65534


# ------------------------------------------------- run in domain processes
def _key(objs: dict[int, Any], obj: Any) -> int:
    key = max(objs, default=0) + 1
    objs[key] = obj
    return key


def _page(tag: bytes, i: int) -> bytes:
    return (tag + b"-%04d-" % i).ljust(PAGE, b"#")


def alloc(d: Any, objs: dict[int, Any], n: int, tag: bytes) -> tuple[int, list[int], list[int]]:
    """``n`` private pages, each filled with ``tag``: (key, gfns, mfns)."""
    pages = d.alloc_pages(n)
    for i in range(n):
        pages.mem[i * PAGE : (i + 1) * PAGE] = _page(tag, i)
    gfns = list(pages.gfns)
    return _key(objs, pages), gfns, [d.hypercalls.p2m[g][0] for g in gfns]


def read(d: Any, objs: dict[int, Any], key: int) -> bytes:
    return bytes(objs[key].mem)


def write(d: Any, objs: dict[int, Any], key: int, i: int, data: bytes) -> None:
    objs[key].mem[i * PAGE : i * PAGE + len(data)] = data


def share(d: Any, objs: dict[int, Any], peer: int, tag: bytes, writable: bool) -> Any:
    """A one-page share filled with ``tag``: (key, ref, mfn)."""
    s = d.gntshr.share_pages(peer, 1, writable)
    s.mem[:PAGE] = _page(tag, 0)
    gfn = s.resource.gfns[0]
    return _key(objs, s), s.refs[0], d.hypercalls.p2m[gfn][0]


def unshare(d: Any, objs: dict[int, Any], key: int) -> None:
    d.gntshr.unshare(objs.pop(key))


def grant(d: Any, objs: dict[int, Any], key: int, i: int, peer: int, writable: bool) -> Any:
    """Grant page ``i`` of ``key`` with the kernel-level API: (ref, mfn now)."""
    gfn = objs[key].gfns[i]
    ref = d.grant_table.grant_foreign_access(peer, gfn, readonly=not writable)
    return ref, d.hypercalls.p2m[gfn][0]


def raw_grant(d: Any, objs: dict[int, Any], key: int, i: int, peer: int) -> int:
    """Write a grant entry for page ``i`` straight into the table (no library)."""
    table = d.grant_table
    ref = table.get_nonblock()
    table._write_entry(ref, peer, objs[key].gfns[i], True)
    return int(ref)


def end(d: Any, objs: dict[int, Any], ref: int) -> None:
    d.grant_table.try_end_access(ref, release_ref=True)


def drop_privileges(d: Any, objs: dict[int, Any]) -> bool:
    """Become uid/gid 65534 (when root): another uid than the service's."""
    if os.getuid() != 0:
        return False
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    return True


def map_page(d: Any, objs: dict[int, Any], domid: int, ref: int, writable: bool) -> Any:
    """Map one grant: (key, mfn) or ("err", errno, text)."""
    try:
        m = d.gnttab.map_grant_ref(domid, ref, writable)
    except Exception as e:
        return ("err", getattr(e, "errno", None), str(e))
    gfn = m.resource[0]
    return _key(objs, m), d.hypercalls.p2m[gfn][0]


def unmap(d: Any, objs: dict[int, Any], key: int) -> None:
    objs.pop(key).unmap()
    d.sync()


def read_mapping(d: Any, objs: dict[int, Any], key: int) -> bytes:
    return bytes(objs[key].mem)


def _errno_of(fn: Any) -> str:
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


def _mmap(fd: int, size: int, prot: int) -> None:
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    m.close()


def _fallocate(fd: int, mode: int, off: int, n: int) -> None:
    if _libc.fallocate(fd, mode, off, n) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fd_report(d: Any, objs: dict[int, Any]) -> list[dict[str, Any]]:
    """Every memfd this process holds: what each attack on it gave."""
    own = f"xengrant-d{d.domid} "
    links = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor
            links[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    # what the service sent is memfds (sockets aside)
    return [_attack(fd, link, own) for fd, link in sorted(links.items())
            if link.startswith("/memfd:") and stat.S_ISREG(os.fstat(fd).st_mode)]


def _attack(fd: int, link: str, own: str) -> dict[str, Any]:
    """Map, truncate, grow, punch, reopen one descriptor.

    Punches go only at files of other domains opened read-only: a file of
    our own, or one granted to us writable, we may zero anyway.
    """
    st = os.fstat(fd)
    size = st.st_size
    acc = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    rep: dict[str, Any] = {"link": link, "size": size, "rdonly": acc == os.O_RDONLY,
                           "fd": fd, "ino": st.st_ino}
    rep["mmap_rw"] = _errno_of(lambda: _mmap(fd, size, mmap.PROT_READ | mmap.PROT_WRITE))
    rep["mmap_ro"] = _errno_of(lambda: _mmap(fd, size, mmap.PROT_READ))
    rep["shrink"] = _errno_of(lambda: os.ftruncate(fd, 0))
    rep["grow"] = _errno_of(lambda: os.ftruncate(fd, size + PAGE))
    rep["fallocate_grow"] = _errno_of(lambda: _fallocate(fd, 0, size, PAGE))
    foreign = "memfd:xengrant-d" in link and own not in link + " "
    if foreign and acc == os.O_RDONLY:
        rep["punch"] = _errno_of(
            lambda: _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, PAGE)
        )
    rep["reopen_rw"] = _errno_of(lambda: os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDWR)))
    rep["fchmod"] = _errno_of(lambda: os.fchmod(fd, 0o600))
    rep["after"] = os.fstat(fd).st_size
    return rep


def punch_foreign_rw(d: Any, objs: dict[int, Any]) -> int:
    """Punch every page of each file of another domain we hold writable: how many."""
    own = f"xengrant-d{d.domid} "
    done = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
            fd = int(name)
            if "memfd:xengrant-d" not in link or own in link + " ":
                continue
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
                continue
            _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, os.fstat(fd).st_size)
        except OSError:
            continue
        done += 1
    return done


def churn(d: Any, objs: dict[int, Any], rounds: int) -> int:
    """A bystander at work: allocate, fill, check, share, free, ``rounds`` times.

    Returns:
        How many checks failed (0).
    """
    bad = 0
    for i in range(rounds):
        pages = d.alloc_pages(3)
        data = _page(b"churn%d" % i, 0) * 3
        pages.mem[:] = data
        s = d.gntshr.share_pages(0, 2)
        s.mem[:8] = b"churning"
        bad += bytes(pages.mem) != data
        bad += bytes(s.mem[:8]) != b"churning"
        d.gntshr.unshare(s)
        pages.mem.release()
        pages.free()
    return bad


def _in_child(fn: Any) -> int:
    """Run ``fn`` in a forked child: 0 if it returned, else the signal that killed it."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            fn()
        finally:
            os._exit(0)
    _pid, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def touch_frame(d: Any, objs: dict[int, Any], mfn: int, store: bool) -> int:
    """Read (or write) frame ``mfn`` where this process's view of it would be."""
    addr = d.hypercalls.memory.base + mfn * PAGE
    if store:
        return _in_child(lambda: ctypes.memset(addr, 0x41, 8))
    return _in_child(lambda: ctypes.string_at(addr, 8))


def store_through(d: Any, objs: dict[int, Any], key: int) -> int:
    """A store through a mapping's view, with ctypes (no Python read-only check)."""
    addr = objs[key]._view.address
    return _in_child(lambda: ctypes.memset(addr, 0x41, 8))


def reach(d: Any, objs: dict[int, Any], gfns: list[int], writable: bool) -> Any:
    """Ask for files of arbitrary gfns: the errno."""
    try:
        return d.hypercalls.reach(gfns, writable)
    except Exception as e:
        return ("err", getattr(e, "errno", None))


def keep_foreign_fds(d: Any, objs: dict[int, Any]) -> int:
    """dup() every file of another domain we hold (a hostile process keeps them)."""
    own = f"xengrant-d{d.domid} "
    kept = objs.setdefault(-1, [])
    links = {}
    for name in os.listdir("/proc/self/fd"):  # first look, then dup (dup reuses numbers)
        with contextlib.suppress(OSError):
            links[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    for fd, link in links.items():
        if "memfd:xengrant-d" in link and own not in link + " ":
            kept.append(os.dup(fd))
    return len(kept)


def read_kept(d: Any, objs: dict[int, Any]) -> list[bytes]:
    """What the kept files hold now."""
    out = []
    for fd in objs.get(-1, []):
        size = os.fstat(fd).st_size
        out.append(os.pread(fd, size, 0))
    return out


def fd_count(d: Any, objs: dict[int, Any]) -> int:
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------ tests
def _memfds(pid: int) -> list[str]:
    """The memfds a process holds (the service: machine memory, rings, domains' files)."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("/memfd:"):
            out.append(link)
    return sorted(out)


@pytest.fixture
def world() -> Iterator[tuple[Service, Actor, Actor, dict[str, Any]]]:
    """A service, dom0, a bystander and a hostile domain process; on the way
    out every table, frame, file and service descriptor must be back."""
    svc = Service()
    dom0 = Actor(svc, domid=0)
    before = stats(svc.path)
    fds_before = _memfds(svc.proc.pid)
    bystander = Actor(svc)
    hostile = Actor(svc)
    try:
        yield svc, bystander, hostile, before
    finally:
        hostile.close()
        bystander.close()
        after = stats(svc.path)
        for key in ("free_frames", "domains", "evtchn", "notifies", "memory"):
            assert after[key] == before[key], key
        assert _memfds(svc.proc.pid) == fds_before
        dom0.close()
        assert svc.stop() == 0


def call(actor: Actor, name: str, *args: Any) -> Any:
    return actor("call", MOD, name, *args)


def test_every_descriptor_the_hostile_holds(world: Any) -> None:
    """Only its own files and exactly the granted pages; each attack refused."""
    _svc, b, h, _before = world
    key, _gfns, _mfns = call(b, "alloc", 16, b"B-private")
    private = call(b, "read", key)
    s_rw, ref_rw, _ = call(b, "share", h.domid, b"B-rw", True)
    s_ro, ref_ro, _ = call(b, "share", h.domid, b"B-ro", False)
    ref_k, _ = call(b, "grant", key, 2, h.domid, False)  # a page of the four, read-only
    dropped = call(h, "drop_privileges")
    m_rw, _ = call(h, "map_page", b.domid, ref_rw, True)
    m_ro, _ = call(h, "map_page", b.domid, ref_ro, False)
    m_k, _ = call(h, "map_page", b.domid, ref_k, False)
    assert call(h, "read_mapping", m_k) == private[2 * PAGE : 3 * PAGE]

    b.send_only("call", MOD, "churn", 200)  # the bystander works meanwhile
    report = call(h, "fd_report")
    assert b.result() == 0
    mine = f"xengrant-d{h.domid} "
    theirs = f"xengrant-d{b.domid} "
    foreign = [r for r in report if theirs in r["link"] + " "]
    # its own frames' files, its ring page, its generation page (records sent), and
    # the bystander's files
    assert all(
        mine in r["link"] + " " or theirs in r["link"] + " " or "xengrant-ring" in r["link"]
        or f"xengrant-gen-d{h.domid} " in r["link"] + " "
        for r in report
    ), report
    # exactly the three granted pages, one file each: no neighbour, no machine memory
    assert sorted(r["size"] for r in foreign) == [PAGE] * 3, foreign
    assert sum(r["rdonly"] for r in foreign) == 2
    for r in report:
        assert r["shrink"] != "ok" and r["grow"] != "ok" and r["fallocate_grow"] != "ok", r
        assert r["after"] == r["size"], r
        assert r["mmap_ro"] == "ok", r
        if r["rdonly"]:
            assert r["mmap_rw"] == "EACCES", r
            assert r.get("punch", "EBADF") == "EBADF", r
            if dropped:  # another uid: no way back to a writable descriptor
                assert r["reopen_rw"] == "EACCES", r
                assert r["fchmod"] == "EPERM", r
        elif theirs in r["link"] + " ":
            assert r["mmap_rw"] == "ok", r  # the page granted writable
    # the bystander's pages are as they were
    assert call(b, "read", key) == private
    # a writable grant's file can be punched: that zeroes the granted page (the
    # hostile may write it anyway), nothing else
    assert call(h, "punch_foreign_rw") == 1
    assert call(b, "read", s_rw)[:PAGE] == bytes(PAGE)
    assert call(b, "read", s_ro)[:4] == b"B-ro"
    assert call(b, "read", key) == private
    for m in (m_rw, m_ro, m_k):
        call(h, "unmap", m)
    call(b, "end", ref_k)
    call(b, "unshare", s_rw)
    call(b, "unshare", s_ro)


def test_frames_never_given_fault(world: Any) -> None:
    """Another domain's page, and the neighbours of a page mapped, are not there."""
    _svc, b, h, _before = world
    left, _, (m_left,) = call(b, "alloc", 1, b"left")
    s, ref, mfn = call(b, "share", h.domid, b"shared", True)
    right, _, (m_right,) = call(b, "alloc", 1, b"right")
    m, got = call(h, "map_page", b.domid, ref, True)
    assert got == mfn
    assert call(h, "read_mapping", m)[:10] == b"shared-000"
    assert call(h, "touch_frame", mfn, False) == 0  # the page itself
    for other in {m_left, m_right, mfn - 1, mfn + 1}:
        assert call(h, "touch_frame", other, False) == signal.SIGSEGV, other
        assert call(h, "touch_frame", other, True) == signal.SIGSEGV, other
    # files only for gfns of its own p2m
    assert call(h, "reach", [0x100000, 0x7FFFFFFF], False) == ("err", errno.EFAULT)
    assert call(b, "read", left)[:8] == b"left-000"
    assert call(b, "read", right)[:9] == b"right-000"
    call(h, "unmap", m)
    call(b, "unshare", s)


def test_read_only_grant_is_read_only_for_the_kernel(world: Any) -> None:
    """A store through a read-only grant faults, whatever the process does."""
    _svc, b, h, _before = world
    s, ref, mfn = call(b, "share", h.domid, b"ro-page", False)
    m, _ = call(h, "map_page", b.domid, ref, False)
    assert call(h, "store_through", m) == signal.SIGSEGV
    assert call(h, "touch_frame", mfn, True) == signal.SIGSEGV
    assert call(h, "touch_frame", mfn, False) == 0
    # asking for the file writable is refused by the service
    assert call(h, "map_page", b.domid, ref, True)[0] == "err"
    assert call(h, "read_mapping", m)[:7] == b"ro-page"
    call(h, "unmap", m)
    call(b, "unshare", s)


def test_a_page_granted_without_the_library_is_not_reachable(world: Any) -> None:
    """An entry written by hand for a page that shares its file: the map's view is
    refused (EACCES) and the mapping undone; its neighbours never reach the peer."""
    _svc, b, h, _before = world
    # 16 pages: one populate call of that many is one file (fewer go one by one)
    key, _gfns, _mfns = call(b, "alloc", 16, b"raw")
    ref = call(b, "raw_grant", key, 1, h.domid)
    got = call(h, "map_page", b.domid, ref, True)
    assert got[0] == "err" and got[1] == errno.EACCES, got
    call(b, "end", ref)  # nothing left mapped: ends at once (never Busy)
    assert not [r for r in call(h, "fd_report") if f"xengrant-d{b.domid} " in r["link"] + " "]


def test_nothing_new_after_end_of_access(world: Any) -> None:
    """A peer keeps the files it got: after the grant ends, what the granter writes
    next, and what the frame holds after it is freed and reused, never reach them."""
    _svc, b, h, _before = world
    key, _gfns, _mfns = call(b, "alloc", 2, b"kept")
    ref, mfn_before = call(b, "grant", key, 0, h.domid, True)
    s, sref, _smfn = call(b, "share", h.domid, b"share", True)
    m1, _ = call(h, "map_page", b.domid, ref, True)
    m2, _ = call(h, "map_page", b.domid, sref, True)
    assert call(h, "keep_foreign_fds") == 2
    call(h, "unmap", m1)
    call(h, "unmap", m2)
    call(b, "end", ref)  # the page stays the bystander's: it moves to a fresh file
    call(b, "write", key, 0, b"NEW-SECRET-AFTER-END")
    call(b, "unshare", s)  # the frame is freed (scrubbed) ...
    reused, _, _ = call(b, "alloc", 4, b"REUSED-SECRET")  # ... and likely reused
    kept = call(h, "read_kept")
    assert len(kept) == 2
    for data in kept:
        assert b"NEW-SECRET" not in data and b"REUSED-SECRET" not in data
    assert kept.count(b"\0" * PAGE) >= 1  # the freed share was scrubbed
    assert call(b, "read", key)[:20] == b"NEW-SECRET-AFTER-END"  # the granter's view moved
    del mfn_before, reused
