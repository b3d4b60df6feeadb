"""xengrant.linux without Xen: the backend against a fake kernel (tests/linux_fake.py).

The fake answers the gntalloc/gntdev/evtchn ioctls and mmaps as Linux's
drivers do on Xen 4.17 (checked against the real thing by tests_xen/ in the
real-Xen harness), so these tests pin the ioctl packing, the mmap protocol,
the errno -> exception mapping and the sharing semantics.
"""

from __future__ import annotations

import errno
import gc
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from linux_fake import FakeEvtchn, FakeGntalloc, FakeGntdev, FakeKernel
from xengrant import BatchError, GrantError, GrantTableFull, abi
from xengrant.linux import (
    EventChannels,
    LinuxBatchError,
    LinuxGntshr,
    LinuxGnttab,
    LinuxGrantError,
    LinuxGrantTableFull,
    _device,
    portable_backend,
)
from xengrant.portable import CopySegment, GrantRef

P = 4096


@dataclass
class Env:
    k: FakeKernel
    shr: LinuxGntshr
    tab: LinuxGnttab
    ev: EventChannels
    alloc_dev: FakeGntalloc
    gntdev: FakeGntdev

    def assert_clean(self) -> None:
        assert self.tab.live == {}
        assert self.gntdev.maps == {}
        assert self.alloc_dev.files == {}
        assert self.k.outstanding() == {"grefs": 0, "deferred": 0, "pages": 0, "gref_size": 0}


@pytest.fixture
def env() -> Iterator[Env]:
    k = FakeKernel(limit=64)
    a, d = FakeGntalloc(k), FakeGntdev(k)
    ev = EventChannels(device=FakeEvtchn(k))
    e = Env(k, LinuxGntshr(device=a), LinuxGnttab(device=d), ev, a, d)
    yield e
    e.ev.close()
    e.tab.close()
    e.shr.close()
    k.close()


# ------------------------------------------------------------- share/map
@pytest.mark.parametrize("count", [1, 3, 16])
def test_share_map_both_directions(env: Env, count: int) -> None:
    share = env.shr.share_pages(0, count)
    assert len(share.refs) == count and len(share.mem) == count * P
    assert env.alloc_dev.calls == ["ALLOC_GREF", "DEALLOC_GREF"]  # dealloc at once
    with env.tab.map_domain_grant_refs(0, share.refs) as m:
        assert env.gntdev.calls == ["MAP_GRANT_REF"]
        for i in range(count):
            share.mem[i * P : i * P + 4] = b"s%03d" % i
            m.mem[i * P + 100 : i * P + 104] = b"m%03d" % i
        for i in range(count):
            assert bytes(m.mem[i * P : i * P + 4]) == b"s%03d" % i
            assert bytes(share.mem[i * P + 100 : i * P + 104]) == b"m%03d" % i
    assert env.gntdev.calls[-1] == "UNMAP_GRANT_REF"
    env.shr.unshare(share)
    assert share.released and share.refs == []
    env.assert_clean()


def test_map_one_by_one_and_batched(env: Env) -> None:
    share = env.shr.share_pages(0, 4)
    singles = [env.tab.map_grant_ref(0, r) for r in share.refs]
    batch = env.tab.map_grant_refs([(0, r) for r in reversed(share.refs)])
    share.mem[0:2] = b"AB"
    assert bytes(singles[0].mem[:2]) == b"AB"
    assert bytes(batch.mem[3 * P : 3 * P + 2]) == b"AB"
    for m in [*singles, batch]:
        m.unmap()
    share.unshare()
    env.assert_clean()


def test_readonly_grant_and_mapping(env: Env) -> None:
    share = env.shr.share_pages(0, 1, writable=False)
    share.mem[:3] = b"abc"
    with pytest.raises(GrantError) as ei:
        env.tab.map_grant_ref(0, share.refs[0], writable=True)
    e = ei.value
    assert isinstance(e, LinuxGrantError) and e.errno == errno.EINVAL
    assert e.status == abi.GNTST_general_error  # the read succeeds: a read cannot tell
    assert "EINVAL" in str(e) and "mmap" in e.linux
    with env.tab.map_grant_ref(0, share.refs[0], writable=False) as m:
        assert m.mem.readonly and bytes(m.mem[:3]) == b"abc"
        with pytest.raises(TypeError):
            m.mem[0] = 1
    share.unshare()
    env.assert_clean()


def test_bad_refs_are_diagnosed(env: Env) -> None:
    share = env.shr.share_pages(0, 2)
    with pytest.raises(GrantError) as ei:
        env.tab.map_grant_ref(0, 1_000_000)
    assert ei.value.status == abi.GNTST_bad_gntref and ei.value.errno == errno.EINVAL  # type: ignore[attr-defined]
    with pytest.raises(GrantError) as ei:
        env.tab.map_grant_ref(7, share.refs[0])
    assert ei.value.status == abi.GNTST_bad_domain
    with pytest.raises(BatchError) as bi:
        env.tab.map_grant_refs([(0, share.refs[0]), (0, 1_000_000), (0, share.refs[1])])
    b = bi.value
    assert isinstance(b, LinuxBatchError) and b.errno == errno.EINVAL
    assert b.statuses == [abi.GNTST_okay, abi.GNTST_bad_gntref, abi.GNTST_okay]
    assert b.failed == [(1, abi.GNTST_bad_gntref)]
    share.unshare()
    env.assert_clean()


def test_no_diagnosis(env: Env) -> None:
    tab = LinuxGnttab(device=env.gntdev, diagnose=False)
    with pytest.raises(BatchError) as bi:
        tab.map_grant_refs([(0, 999_999), (0, 1_000_000)])
    assert bi.value.statuses == [abi.GNTST_general_error] * 2
    assert env.gntdev.maps == {}


def test_empty_and_bad_arguments(env: Env) -> None:
    with pytest.raises(ValueError):
        env.shr.share_pages(0, 0)
    with pytest.raises(ValueError):
        env.tab.map_grant_refs([])
    with pytest.raises(ValueError):
        env.shr.share_pages(0, 1, notify_offset=P)
    assert env.alloc_dev.calls == [] and env.gntdev.calls == []


def test_gntalloc_limit_is_grant_table_full(env: Env) -> None:
    share = env.shr.share_pages(0, 60)
    with pytest.raises(GrantTableFull) as ei:
        env.shr.share_pages(0, 5)
    e = ei.value
    assert isinstance(e, LinuxGrantTableFull) and e.errno == errno.ENOSPC and e.wanted == 5
    assert "ENOSPC" in str(e)
    share.unshare()
    env.shr.share_pages(0, 64).unshare()  # everything was given back
    env.assert_clean()


# -------------------------------------------------------------- semantics
def test_unshare_while_mapped_defers(env: Env) -> None:
    share = env.shr.share_pages(0, 2)
    share.mem[:4] = b"keep"
    m = env.tab.map_domain_grant_refs(0, share.refs)
    env.shr.unshare(share)  # never Busy: Linux defers the end of access
    assert share.released
    assert env.k.log == [f"deferring g.e. {r:#x}" for r in m.refs]
    assert bytes(m.mem[:4]) == b"keep"  # the page lives on for the peer
    m.mem[:4] = b"peer"
    m.unmap()
    assert env.k.log[-2:] == [f"freeing g.e. {r:#x}" for r in m.refs]
    env.assert_clean()


def test_exported_views_block_release(env: Env) -> None:
    share = env.shr.share_pages(0, 1)
    m = env.tab.map_grant_ref(0, share.refs[0])
    mv, sv = m.mem[:10], share.mem[:10]
    with pytest.raises(BufferError):
        m.unmap()
    assert not m.released and m.resource in env.gntdev.maps
    with pytest.raises(BufferError):
        share.unshare()
    assert not share.released and share.refs
    mv.release()
    sv.release()
    m.unmap()
    share.unshare()
    env.assert_clean()


def test_unreleased_share_warns_and_frees(env: Env) -> None:
    share = env.shr.share_pages(0, 1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        del share
        gc.collect()
    assert any(issubclass(x.category, ResourceWarning) for x in w)
    env.assert_clean()


def test_unmap_notify_from_mapper(env: Env) -> None:
    a, b = env.ev.loopback()
    share = env.shr.share_pages(0, 2)
    share.mem[P + 7] = 0x55
    m = env.tab.map_domain_grant_refs(0, share.refs, notify_offset=P + 7, notify_port=b)
    assert share.mem[P + 7] == 0x55
    m.unmap()
    assert share.mem[P + 7] == 0
    env.ev.wait_for(a, timeout=1.0)
    share.unshare()
    env.assert_clean()


def test_unmap_notify_from_sharer(env: Env) -> None:
    a, b = env.ev.loopback()
    share = env.shr.share_pages(0, 1, notify_offset=9, notify_port=a)
    m = env.tab.map_grant_ref(0, share.refs[0])
    m.mem[9] = 1
    share.unshare()  # the sharer goes: the peer's byte is cleared and it is signalled
    assert m.mem[9] == 0
    env.ev.wait_for(b, timeout=1.0)
    m.unmap()
    env.assert_clean()


def test_evtchn_wait_for_raises_timeout_error(env: Env) -> None:
    """No event on the port: TimeoutError, the one way a blocking call times out."""
    a, _b = env.ev.loopback()
    env.ev.drain()
    with pytest.raises(TimeoutError, match=f"no event on port {a}"):
        env.ev.wait_for(a, timeout=0.0)


def test_notify_on_readonly_mapping_refused(env: Env) -> None:
    share = env.shr.share_pages(0, 1)
    m = env.tab.map_grant_ref(0, share.refs[0], writable=False)
    with pytest.raises(GrantError) as ei:
        env.tab.set_unmap_notify(m, offset=0)
    assert ei.value.errno == errno.EINVAL  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        env.tab.set_unmap_notify(m)
    m.unmap()
    share.unshare()
    env.assert_clean()


def test_offset_for_address(env: Env) -> None:
    share = env.shr.share_pages(0, 3)
    m = env.tab.map_domain_grant_refs(0, share.refs)
    addr = _device.buffer_address(m._view)
    assert env.tab.offset_for_address(addr) == (m.resource, 3)
    with pytest.raises(GrantError):
        env.tab.offset_for_address(addr + P)
    m.unmap()
    share.unshare()


# ------------------------------------------------------------------- copy
def test_grant_copy(env: Env) -> None:
    share = env.shr.share_pages(0, 1)
    ro = env.shr.share_pages(0, 1, writable=False)
    out = bytearray(8)
    segs = [
        CopySegment(b"COPYDATA", GrantRef(0, share.refs[0], 100), 8),
        CopySegment(GrantRef(0, share.refs[0], 100), out, 8),
        CopySegment(GrantRef(0, 1_000_000), bytearray(4), 4),
        CopySegment(GrantRef(7, share.refs[0]), bytearray(4), 4),
        CopySegment(b"x", GrantRef(0, ro.refs[0]), 1),
        CopySegment(b"xy", GrantRef(0, share.refs[0], P - 1), 2),
    ]
    st = env.tab.grant_copy(segs)
    assert st == [
        abi.GNTST_okay,
        abi.GNTST_okay,
        abi.GNTST_bad_gntref,
        abi.GNTST_bad_domain,
        abi.GNTST_general_error,
        abi.GNTST_bad_copy_arg,
    ]
    assert [s.status for s in segs] == st
    assert bytes(share.mem[100:108]) == b"COPYDATA" and out == b"COPYDATA"
    assert env.gntdev.calls == ["GRANT_COPY"]  # the crossing one was not sent
    with pytest.raises(ValueError):
        env.tab.grant_copy([CopySegment(b"a", bytearray(1), 1)])
    with pytest.raises(ValueError):
        env.tab.grant_copy([CopySegment(GrantRef(0, share.refs[0]), bytearray(P + 1), P + 1)])
    share.unshare()
    ro.unshare()
    env.assert_clean()


# ----------------------------------------------------------------- errors
class _Failing:
    """A device whose ioctl or mmap fails with a chosen errno."""

    path = "/dev/xen/failing"

    def __init__(self, inner: Any, ioctl_errno: int = 0, mmap_errno: int = 0) -> None:
        self.inner, self.ioctl_errno, self.mmap_errno = inner, ioctl_errno, mmap_errno

    def ioctl(self, request: int, arg: Any) -> int:
        if self.ioctl_errno:
            raise OSError(self.ioctl_errno, "injected")
        return int(self.inner.ioctl(request, arg))

    def mmap(self, length: int, writable: bool, offset: int) -> Any:
        if self.mmap_errno:
            raise OSError(self.mmap_errno, "injected")
        return self.inner.mmap(length, writable, offset)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_enomem_is_memory_error(env: Env) -> None:
    with pytest.raises(MemoryError):
        LinuxGntshr(device=_Failing(env.alloc_dev, ioctl_errno=errno.ENOMEM)).share_pages(0, 1)
    with pytest.raises(MemoryError):
        LinuxGntshr(device=_Failing(env.alloc_dev, mmap_errno=errno.ENOMEM)).share_pages(0, 1)
    share = env.shr.share_pages(0, 1)
    with pytest.raises(MemoryError):
        LinuxGnttab(device=_Failing(env.gntdev, ioctl_errno=errno.ENOMEM)).map_grant_ref(
            0, share.refs[0]
        )
    with pytest.raises(MemoryError):
        LinuxGnttab(device=_Failing(env.gntdev, mmap_errno=errno.ENOMEM)).map_grant_ref(
            0, share.refs[0]
        )
    share.unshare()
    env.assert_clean()  # the failed share's pages went back (DEALLOC after mmap failure)


def test_other_errno_is_grant_error(env: Env) -> None:
    tab = LinuxGnttab(device=_Failing(env.gntdev, mmap_errno=errno.EPERM))
    with pytest.raises(GrantError) as ei:
        tab.map_grant_refs([(0, 8), (0, 9)])
    assert isinstance(ei.value, LinuxBatchError) and ei.value.errno == errno.EPERM
    assert isinstance(ei.value.__cause__, OSError)
    assert env.gntdev.maps == {}
    with pytest.raises(GrantError) as ei:
        LinuxGnttab(device=_Failing(env.gntdev, ioctl_errno=errno.EINVAL)).map_grant_ref(0, 8)
    assert ei.value.errno == errno.EINVAL  # type: ignore[attr-defined]


def test_os_device_uses_fcntl_and_mmap(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    seen: list[Any] = []

    def fake_ioctl(fd: int, req: int, arg: Any, mutate: bool) -> int:
        seen.append((req, type(arg).__name__, mutate))
        return 0

    monkeypatch.setattr(_device.fcntl, "ioctl", fake_ioctl)
    path = tmp_path / "dev"
    path.write_bytes(bytes(2 * P))
    dev = _device.OsDevice(str(path))
    op = abi.ioctl_gntdev_unmap_grant_ref(index=0, count=1)
    assert dev.ioctl(abi.IOCTL_GNTDEV_UNMAP_GRANT_REF, op) == 0
    assert seen == [(abi.IOCTL_GNTDEV_UNMAP_GRANT_REF, "ioctl_gntdev_unmap_grant_ref", True)]
    view = dev.mmap(P, False, P)
    assert memoryview(view).readonly
    view.close()
    dev.close()
    with pytest.raises(FileNotFoundError):
        LinuxGnttab(str(tmp_path / "missing"))


# ---------------------------------------------------------------- choice
def test_portable_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XENGRANT_BACKEND", raising=False)
    with portable_backend() as b:
        assert b.kind == "emulated" and b.domid == 0
    monkeypatch.setattr("xengrant.linux.available", lambda gntdev="": False)
    with portable_backend("auto") as b:
        assert b.kind == "emulated"
    monkeypatch.setenv("XENGRANT_BACKEND", "auto")
    with portable_backend() as b:
        assert b.kind == "emulated"
    with pytest.raises(ValueError):
        portable_backend("qemu")
    monkeypatch.setattr("xengrant.linux.available", lambda gntdev="": True)
    monkeypatch.setattr("xengrant.linux.GNTALLOC_PATH", "/nonexistent/gntalloc")
    monkeypatch.setattr(
        "xengrant.linux.open_backend",
        lambda: (_ for _ in ()).throw(FileNotFoundError(errno.ENOENT, "no /dev/xen")),
    )
    with pytest.raises(OSError):
        portable_backend("auto")


def test_mappings_and_shares_outlive_close(env: Env) -> None:
    share = env.shr.share_pages(0, 1)
    m = env.tab.map_grant_ref(0, share.refs[0])
    env.tab.close()
    env.shr.close()
    m.mem[:2] = b"ok"
    assert bytes(share.mem[:2]) == b"ok"
    m.unmap()  # no ioctl on the closed file
    share.unshare()
    assert env.gntdev.calls[-1] == "MAP_GRANT_REF"


def test_own_domid_and_available(tmp_path: Any) -> None:
    from xengrant.linux import available, own_domid

    caps = tmp_path / "capabilities"
    caps.write_text("control_d\n")
    assert own_domid(str(caps)) == 0
    caps.write_text("")
    assert own_domid(str(caps)) is None
    assert own_domid(str(tmp_path / "missing")) is None
    assert available(str(caps)) and not available(str(tmp_path / "missing"))


# ---------------------------------------------------------------- logging
def test_map_failures_log_xens_reasons_at_debug_rate_limited(
    env: Env, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why a peer's grant did not map goes to xengrant.linux at DEBUG with the
    GNTST code, as Xen's debug build says it; a peer failing many maps gets
    BURST lines per interval, then one that says how many were left out."""
    from xengrant.linux import _log

    clock = [0.0]
    limit = _log.ratelimited
    monkeypatch.setattr(limit, "clock", lambda: clock[0])
    monkeypatch.setattr(limit, "burst", 3)
    monkeypatch.setattr(limit, "_keys", {})
    monkeypatch.setattr(limit, "suppressed", 0)
    with caplog.at_level(logging.DEBUG, logger="xengrant.linux"):
        for _ in range(5):
            with pytest.raises(GrantError):
                env.tab.map_grant_ref(0, 1_000_000)
    lines = [r for r in caplog.records if r.name == "xengrant.linux"]
    assert [r.levelno for r in lines] == [logging.DEBUG] * 3  # then the limit
    assert "map of d0 ref 1000000: GNTST_bad_gntref (-3)" in lines[0].getMessage()
    assert "EINVAL" in lines[0].getMessage()
    assert limit.suppressed == 2
    caplog.clear()
    clock[0] = 6.0  # the next interval says what was left out
    with caplog.at_level(logging.DEBUG, logger="xengrant.linux"), pytest.raises(GrantError):
        env.tab.map_grant_ref(0, 1_000_000)
    (line,) = [r for r in caplog.records if r.name == "xengrant.linux"]
    assert line.getMessage().endswith("(2 similar lines left out)")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xengrant.linux"), pytest.raises(GrantError):
        env.tab.map_grant_ref(0, 1_000_000)  # DEBUG is off: nothing said, nothing counted
    assert [r for r in caplog.records if r.name == "xengrant.linux"] == []
    env.assert_clean()


def test_copy_failures_at_debug_and_own_errors_at_warning(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A copy segment the peer's grant refuses is DEBUG; gntalloc out of refs
    (our side) is WARNING."""
    with caplog.at_level(logging.DEBUG, logger="xengrant.linux"):
        st = env.tab.grant_copy([CopySegment(GrantRef(0, 1_000_000), bytearray(4), 4)])
        assert st == [abi.GNTST_bad_gntref]
        share = env.shr.share_pages(0, 60)
        with pytest.raises(GrantTableFull):
            env.shr.share_pages(0, 5)
        share.unshare()
    got = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "xengrant.linux"]
    assert (logging.DEBUG, "grant_copy with d0 ref 1000000: GNTST_bad_gntref (-3)") in got
    warnings = [m for lvl, m in got if lvl == logging.WARNING]
    assert len(warnings) == 1 and "share_pages of 5 page(s): no grant refs left" in warnings[0]
    env.assert_clean()
