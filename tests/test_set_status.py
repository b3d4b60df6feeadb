"""A guest racing Xen's pin of its entry, made deterministic through a seam.

Xen 4.17 marks an entry in use in ``_set_status_v1`` (a cmpxchg on the 32-bit
{flags, domid} word, retried at most five times: "Shared grant entry is
unstable") or ``_set_status_v2`` (status word first, ``smp_mb()``, then the
header read again: a change undoes the status bits, "Unstable flags" or
"Unstable grant readonly flag").  The guest can change its entry at any
moment; here it does so at the exact point a real race would hit, by wrapping
the atomic ``xengrant.emu.entry`` calls (no threads, no sleeps).  The C map
and copy runs are switched off so that every op goes through the Python rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import xengrant
from grant_helpers import PAGE, MakeDomain, Xen, active, copy, in_use, status_of
from xengrant import _cext, abi
from xengrant.emu import entry, gnttab_copy, gnttab_map
from xengrant.errors import GrantError
from xengrant.guest.memory import GNTTAB_GFN_BASE

SELF = abi.DOMID_SELF


@pytest.fixture(autouse=True)
def python_rules(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(gnttab_map, "FASTPATH", False)
    monkeypatch.setattr(gnttab_copy, "FASTPATH", False)
    yield


def scribble(dom: xengrant.Domain, ref: int, off: int, value: int) -> None:
    """The guest writes 16 bits of entry ``ref`` of its own (one-frame) table."""
    size = 8 if dom.grant_table.version == 1 else 16
    view = dom.view([GNTTAB_GFN_BASE], True)
    with memoryview(view) as mv:
        mv[ref * size + off : ref * size + off + 2] = value.to_bytes(2, "little")
    view.close()


def mapped_fails(back: xengrant.Domain, front: xengrant.Domain, ref: int, **kw: Any) -> str:
    """Map ``ref`` and expect GNTST_general_error; Xen's reason."""
    with pytest.raises(GrantError) as ei:
        back.gnttab.map_grant_ref(front.domid, ref, **kw)
    assert ei.value.status == abi.GNTST_general_error
    return str(ei.value)


# ------------------------------------------------------------------- v1
class Racer:
    """A guest that toggles GTF_PCD in its entry before each of Xen's cmpxchgs."""

    def __init__(self, dom: xengrant.Domain, ref: int, times: int) -> None:
        self.dom, self.ref, self.left, self.calls = dom, ref, times, 0

    def cmpxchg32(self, mem: Any, off: int, old: int, new: int) -> int:
        self.calls += 1
        if self.left:
            self.left -= 1
            flags = self.dom.grant_table.entry(self.ref).flags
            scribble(self.dom, self.ref, 0, flags ^ abi.GTF_PCD)
        return int(_cext.cmpxchg32(mem, off, old, new))


@pytest.mark.parametrize("writable", [True, False])
def test_v1_entry_changing_under_five_cmpxchgs_is_unstable(
    xen: Xen, make_domain: MakeDomain, monkeypatch: pytest.MonkeyPatch, writable: bool
) -> None:
    front, back = make_domain(), make_domain()
    bystander = make_domain()
    share = front.grant_table.share_pages(back.domid, 1)
    other = front.grant_table.share_pages(bystander.domid, 1)
    ref = share.refs[0]
    racer = Racer(front, ref, times=entry.CMPXCHG_TRIES)
    monkeypatch.setattr(entry, "cmpxchg32", racer.cmpxchg32)
    why = mapped_fails(back, front, ref, writable=writable)
    assert "Shared grant entry is unstable" in why
    assert racer.calls == entry.CMPXCHG_TRIES == 5
    # nothing left behind: no pin, no in-use flag, no handle; the entry is the guest's
    flags = front.grant_table.entry(ref).flags
    assert flags & (abi.GTF_reading | abi.GTF_writing) == 0
    assert active(xen, front.domid) == 0 and in_use(xen, back.domid) == 0
    # the bystander's grant maps as ever
    monkeypatch.setattr(entry, "cmpxchg32", _cext.cmpxchg32)
    with bystander.gnttab.map_grant_ref(front.domid, other.refs[0]) as m:
        assert len(m.mem) == PAGE
    share.unshare()
    other.unshare()


def test_v1_entry_settling_on_the_fifth_try_is_pinned(
    xen: Xen, make_domain: MakeDomain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four changes: the fifth cmpxchg wins (the bound is five tries, not four)."""
    front, back = make_domain(), make_domain()
    share = front.grant_table.share_pages(back.domid, 1)
    ref = share.refs[0]
    racer = Racer(front, ref, times=entry.CMPXCHG_TRIES - 1)
    monkeypatch.setattr(entry, "cmpxchg32", racer.cmpxchg32)
    with back.gnttab.map_grant_ref(front.domid, ref) as m:
        assert racer.calls == 5
        flags = front.grant_table.entry(ref).flags
        # the guest's last PCD toggle kept, Xen's in-use bits added to it
        assert flags == abi.GTF_permit_access | abi.GTF_reading | abi.GTF_writing
        m.mem[:2] = b"ok"
    assert bytes(share.mem[:2]) == b"ok"
    share.unshare()


def test_v1_entry_revoked_during_the_cmpxchg_is_refused(
    xen: Xen, make_domain: MakeDomain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry re-checks type and domid: a guest ending access wins the race."""
    front, back = make_domain(), make_domain()
    share = front.grant_table.share_pages(back.domid, 1)
    ref = share.refs[0]

    def revoke(mem: Any, off: int, old: int, new: int) -> int:
        scribble(front, ref, 0, 0)  # the guest's own cmpxchg to 0 came first
        monkeypatch.setattr(entry, "cmpxchg32", _cext.cmpxchg32)
        return int(_cext.cmpxchg32(mem, off, old, new))

    monkeypatch.setattr(entry, "cmpxchg32", revoke)
    why = mapped_fails(back, front, ref)
    assert "Bad flags (0x0)" in why
    assert front.grant_table.entry(ref).flags == 0
    assert active(xen, front.domid) == 0 and in_use(xen, back.domid) == 0
    share.unshare()


def test_v1_unstable_entry_refuses_a_copy_too(
    xen: Xen, make_domain: MakeDomain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """acquire_grant_for_copy pins through the same _set_status_v1."""
    front, back = make_domain(), make_domain()
    share = front.grant_table.share_pages(back.domid, 1)
    share.mem[:4] = b"data"
    mine = back.alloc_pages(1)
    racer = Racer(front, share.refs[0], times=5)
    monkeypatch.setattr(entry, "cmpxchg32", racer.cmpxchg32)
    seg = ((share.refs[0], front.domid, 0), (mine.gfns[0], SELF, 0), 4, abi.GNTCOPY_source_gref)

    assert copy(back, seg) == [abi.GNTST_general_error]
    assert racer.calls == 5
    assert bytes(mine.mem[:4]) == bytes(4)
    assert front.grant_table.entry(share.refs[0]).flags & abi.GTF_reading == 0
    assert active(xen, front.domid) == 0
    share.unshare()


# ------------------------------------------------------------------- v2
def after_status_write(monkeypatch: pytest.MonkeyPatch, guest: Callable[[], None]) -> list[int]:
    """Run ``guest`` once at _set_status_v2's barrier (status written, header not re-read)."""
    seen: list[int] = []

    def mb() -> None:
        seen.append(1)
        if len(seen) == 1:
            guest()
        _cext.mb()

    monkeypatch.setattr(entry, "mb", mb)
    return seen


@pytest.mark.parametrize("change", ["revoked", "other domid", "made readonly"])
def test_v2_header_changed_after_the_status_write_is_rolled_back(
    xen: Xen, make_domain: MakeDomain, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    front, back = make_domain(), make_domain()
    front.grant_table.set_version(2)
    share = front.grant_table.share_pages(back.domid, 1)
    ref = share.refs[0]
    seen_status: list[int] = []

    def guest() -> None:
        seen_status.append(status_of(xen, front.domid, ref))
        if change == "revoked":
            scribble(front, ref, 0, 0)
        elif change == "other domid":
            scribble(front, ref, 2, back.domid + 1)
        else:
            scribble(front, ref, 0, abi.GTF_permit_access | abi.GTF_readonly)

    seen = after_status_write(monkeypatch, guest)
    why = mapped_fails(back, front, ref)
    assert seen and seen_status == [abi.GTF_reading | abi.GTF_writing]
    assert "Unstable flags" in why
    # the status bits Xen had set are taken back
    assert status_of(xen, front.domid, ref) == 0
    assert active(xen, front.domid) == 0 and in_use(xen, back.domid) == 0
    scribble(front, ref, 2, back.domid)
    scribble(front, ref, 0, abi.GTF_permit_access)
    share.unshare()


def test_v2_readonly_set_under_a_second_writable_pin_is_rolled_back(
    xen: Xen, make_domain: MakeDomain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Already pinned read-only, a first writable pin: the guest sets GTF_readonly
    between the status write and the re-check -> "Unstable grant readonly flag",
    GTF_writing cleared again, GTF_reading kept for the read-only mapping."""
    front, back = make_domain(), make_domain()
    front.grant_table.set_version(2)
    share = front.grant_table.share_pages(back.domid, 1)
    ref = share.refs[0]
    with back.gnttab.map_grant_ref(front.domid, ref, writable=False) as ro:
        assert status_of(xen, front.domid, ref) == abi.GTF_reading
        seen_status: list[int] = []

        def guest() -> None:
            seen_status.append(status_of(xen, front.domid, ref))
            scribble(front, ref, 0, abi.GTF_permit_access | abi.GTF_readonly)

        after_status_write(monkeypatch, guest)
        why = mapped_fails(back, front, ref)
        assert seen_status == [abi.GTF_reading | abi.GTF_writing]
        assert "Unstable grant readonly flag" in why
        assert status_of(xen, front.domid, ref) == abi.GTF_reading
        assert active(xen, front.domid) == 1 and in_use(xen, back.domid) == 1
        assert len(ro.mem) == PAGE
    assert status_of(xen, front.domid, ref) == 0
    assert active(xen, front.domid) == 0 and in_use(xen, back.domid) == 0
    scribble(front, ref, 0, abi.GTF_permit_access)
    share.unshare()


def test_v2_header_unchanged_at_the_barrier_pins(
    xen: Xen, make_domain: MakeDomain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same seam with a guest that changes nothing: the map succeeds."""
    front, back = make_domain(), make_domain()
    front.grant_table.set_version(2)
    share = front.grant_table.share_pages(back.domid, 1)
    seen = after_status_write(monkeypatch, lambda: None)
    with back.gnttab.map_grant_ref(front.domid, share.refs[0]):
        assert seen == [1]
        assert status_of(xen, front.domid, share.refs[0]) == abi.GTF_reading | abi.GTF_writing
    share.unshare()


# ---------------------------------------------------------------- transfer
def test_transfer_commits_with_one_cmpxchg_when_nothing_races(
    xen: Xen, make_domain: MakeDomain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gnttab_prepare_for_transfer: one cmpxchg sets GTF_transfer_committed."""
    from xengrant.emu import gnttab_transfer

    giver, recv = make_domain(pv=True), make_domain()
    ref = recv.grant_table.grant_transfer(giver.domid, 0x45000)
    calls: list[tuple[int, int]] = []

    def counting(mem: Any, off: int, old: int, new: int) -> int:
        calls.append((old, new))
        return int(_cext.cmpxchg32(mem, off, old, new))

    monkeypatch.setattr(gnttab_transfer, "cmpxchg32", counting)
    (mfn,) = giver.hypercalls.populate_physmap([0])
    giver.grant_table.transfer(mfn, recv.domid, ref)
    word = abi.GTF_accept_transfer | giver.domid << 16
    assert calls == [(word, word | abi.GTF_transfer_committed)]
    assert recv.grant_table.end_transfer(ref) == 0x45000


def test_transfer_entry_changed_before_the_commit_is_refused(
    xen: Xen, make_domain: MakeDomain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver ends its offer as the giver commits: the cmpxchg fails, the
    retry sees flags 0 ("Bad flags"), and the page is lost as in Xen."""
    from xengrant.emu import gnttab_transfer

    giver, recv = make_domain(pv=True), make_domain()
    ref = recv.grant_table.grant_transfer(giver.domid, 0x45000)

    def racing(mem: Any, off: int, old: int, new: int) -> int:
        scribble(recv, ref, 0, 0)  # the receiver's end_transfer came first
        return int(_cext.cmpxchg32(mem, off, old, new))

    monkeypatch.setattr(gnttab_transfer, "cmpxchg32", racing)
    (mfn,) = giver.hypercalls.populate_physmap([0])
    with pytest.raises(GrantError) as ei:
        giver.grant_table.transfer(mfn, recv.domid, ref)
    assert ei.value.status == abi.GNTST_general_error
    assert "Bad flags (0x0)" in " ".join(giver.hypercalls.last_reasons)
    assert recv.grant_table.entry(ref).flags == 0
    assert 0x45000 not in xen.domain_state(recv.domid).p2m
