"""Random grant/map/unmap/end/copy/transfer sequences against a reference model.

A hypothesis state machine drives three guests of one ``EmbeddedXen`` (two
HVM, one PV so that pages can be transferred) through the public guest API
and the raw hypercall, and after every step compares the emulator with a
small pure-Python model of what Xen 4.17 does:

- each shared entry the model knows, read straight from the granter's grant
  frame in machine memory and through ``GrantTable.entry``: flags (type,
  ``GTF_readonly``, ``GTF_reading``/``GTF_writing`` as the live mappings
  demand, transfer committed/completed), domid and frame;
- the bytes of every page, through the owner's view and through every
  mapping of it;
- the status of every op, including the ``GNTST_*`` code of each invalid one;
- the counts: maptrack handles in use, the refs Xen has active (and their pin
  counters), each domain's pages, and the machine's free frames.

Invariants at the end: after releasing everything the free frames are back at
their initial value, and again once the domains are destroyed.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import xengrant
from xengrant import abi
from xengrant.emu.grant_table import GNTPIN_hstr_inc, GNTPIN_hstw_inc
from xengrant.errors import BatchError, Busy, GrantError

PAGE = 4096
PERMIT, ACCEPT = abi.GTF_permit_access, abi.GTF_accept_transfer
RO, READING, WRITING = abi.GTF_readonly, abi.GTF_reading, abi.GTF_writing
DONE = abi.GTF_transfer_committed | abi.GTF_transfer_completed
OKAY, GENERAL = abi.GNTST_okay, abi.GNTST_general_error
NO_DOMAIN = 999  # a domain id nobody has
NOWHERE_GFN = 0x7FFFF  # a gfn never populated (below the table and hole gfns)
BIG_HANDLE = 1 << 30  # past any maptrack limit


def note(op: str, status: int | str) -> None:
    """Tally an outcome (``pytest --hypothesis-show-statistics`` shows them)."""
    event(f"{op}: {abi.GNTST_NAMES.get(status, status) if isinstance(status, int) else status}")


#: copy sides: a grant ref, the copier's own page, an unpopulated gfn, and
#: the copier's own page named by its numeric domid rather than DOMID_SELF
COPY_SIDES = ["gref"] * 4 + ["local"] * 2 + ["bad_gfn", "numeric_self"]

MAX_ENTRIES = 12  # refs the model hands out at once, all domains together
MAX_MAPS = 8  # Mapping objects alive at once


@dataclass
class Page:
    """A page of RAM some domain owns, and what the model says it holds."""

    dom: int  # index into the machine's domains
    gfn: int  # gfn (PV: the mfn)
    data: bytearray = field(default_factory=lambda: bytearray(PAGE))


@dataclass
class Entry:
    """A ref the model handed out of a domain's table, and its expected entry."""

    dom: int
    ref: int
    kind: str  # "grant" (permit_access), "ended" (flags 0), "offer" (accept_transfer)
    peer: int  # domid in the entry
    frame: int  # frame field in the entry
    readonly: bool = False
    page: Page | None = None  # the granted page (grant/ended), the received one (offer)
    committed: bool = False  # offer only: a page was transferred


@dataclass
class Side:
    """One side of a copy op: a grant (target) or the copier's own page."""

    kind: str  # "gref", "local", "bad_gfn" (unpopulated), "numeric_self" (not DOMID_SELF)
    target: tuple[int, int] | None  # (domain index, ref) of a gref side
    page: Page | None  # the page the model expects behind it, if any
    off: int


@dataclass
class Live:
    """A live Mapping and the entries of its pages (in order)."""

    mapper: int
    mapping: xengrant.Mapping
    entries: list[Entry]
    writable: bool


class GrantMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.xen = xengrant.EmbeddedXen(memory=16 << 20)
        self.free_before_domains = self.xen.free_frames
        self.doms: list[xengrant.Domain] = [
            self.xen.create_domain(),
            self.xen.create_domain(),
            self.xen.create_domain(pv=True),
        ]
        self.tables = [d.grant_table for d in self.doms]
        self.free_grants = [t.num_free_grants() for t in self.tables]
        self._gfns = itertools.count(0x40000)
        self.base_free = self.xen.free_frames
        self.pages: list[Page] = []
        self.entries: dict[tuple[int, int], Entry] = {}
        self.maps: list[Live] = []
        # handles each domain has held (for stale-handle unmaps)
        self.old_handles: list[set[int]] = [set() for _ in self.doms]
        # one page per domain as the local side of copies
        self.scratch = [self._populate(i) for i in range(len(self.doms))]

    # ------------------------------------------------------------ helpers
    def domid(self, i: int) -> int:
        return int(self.doms[i].domid)

    def _populate(self, i: int) -> Page:
        dom = self.doms[i]
        got = dom.hypercalls.populate_physmap([0] if dom.pv else [next(self._gfns)])
        assert len(got) == 1
        page = Page(i, got[0])
        self.pages.append(page)
        return page

    def _free(self, page: Page) -> None:
        assert self.doms[page.dom].hypercalls.decrease_reservation([page.gfn]) == 1
        self.pages.remove(page)

    def _write(self, page: Page, off: int, data: bytes) -> None:
        view = self.doms[page.dom].view([page.gfn], True)
        mv = memoryview(view)
        mv[off : off + len(data)] = data
        mv.release()
        view.close()
        page.data[off : off + len(data)] = data

    def _read(self, i: int, gfn: int) -> bytes:
        view = self.doms[i].view([gfn], False)
        mv = memoryview(view)
        out = bytes(mv)
        mv.release()
        view.close()
        return out

    def _raw_entry(self, i: int, ref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) of a v1 entry, from machine memory."""
        g = self.xen.domain_state(self.domid(i)).gt
        off = g.entry_offset(ref)
        flags, domid, frame = struct.unpack_from("<HHI", self.xen.mem, off)
        return flags, domid, frame

    def _nr_entries(self, i: int) -> int:
        return int(self.xen.domain_state(self.domid(i)).gt.nr_grant_entries)

    def _pins(self, e: Entry) -> tuple[int, int]:
        """(read-only, writable) host mappings of ``e`` in the model."""
        ro = rw = 0
        for live in self.maps:
            for x in live.entries:
                if x is e:
                    if live.writable:
                        rw += 1
                    else:
                        ro += 1
        return ro, rw

    def expected_flags(self, e: Entry) -> int:
        if e.kind == "ended":
            return 0
        if e.kind == "offer":
            return ACCEPT | (DONE if e.committed else 0)
        ro, rw = self._pins(e)
        flags = PERMIT | (RO if e.readonly else 0)
        if ro or rw:
            flags |= READING
        if rw:
            flags |= WRITING
        return flags

    def predict_map(self, mapper: int, dom: int, ref: int, writable: bool) -> int:
        """map_grant_ref's status for one op (Xen 4.17 order of checks)."""
        if dom >= len(self.doms):
            return abi.GNTST_bad_domain
        if ref >= self._nr_entries(dom):
            return abi.GNTST_bad_gntref
        e = self.entries.get((dom, ref))
        if e is None or e.kind != "grant" or e.peer != self.domid(mapper):
            return GENERAL  # wrong type (incl. ended/offers) or not granted to the mapper
        if writable and e.readonly:
            return GENERAL  # "Attempt to write-pin a r/o grant entry"
        return OKAY

    def _live_handles(self, mapper: int) -> set[int]:
        return {h for lv in self.maps if lv.mapper == mapper for h in lv.mapping.handles or ()}

    def _target_domid(self, dom: int) -> int:
        return NO_DOMAIN if dom >= len(self.doms) else self.domid(dom)

    # --------------------------------------------------------- strategies
    def _grant_target(self, data: st.DataObject, user: int) -> tuple[int, int]:
        """A (domain index, ref) for ``user`` to map or copy.

        Mostly refs granted to ``user``, then any ref the model knows, then junk:
        a free ref, one past the table, one of a domain that does not exist.
        """
        mine = [k for k, e in sorted(self.entries.items()) if e.kind == "grant"]
        mine = [k for k in mine if self.entries[k].peer == self.domid(user)]
        kind = data.draw(
            st.sampled_from(["mine"] * 5 + ["entry", "entry", "random", "far", "nodom"])
        )
        if kind == "mine" and mine:
            return data.draw(st.sampled_from(mine))
        if kind in ("mine", "entry") and self.entries:
            return data.draw(st.sampled_from(sorted(self.entries)))
        if kind == "far":
            dom = data.draw(st.integers(0, len(self.doms) - 1))
            return dom, self._nr_entries(dom) + data.draw(st.integers(0, 5000))
        if kind == "nodom":
            return len(self.doms), 8
        dom = data.draw(st.integers(0, len(self.doms) - 1))
        return dom, data.draw(st.integers(0, 40))

    def _entries_of(self, kind: str) -> list[tuple[int, int]]:
        return sorted(k for k, e in self.entries.items() if e.kind == kind)

    # -------------------------------------------------------------- rules
    @initialize(
        data=st.data(),
        readonly=st.lists(st.booleans(), min_size=3, max_size=3),
        receiver=st.integers(0, 1),
    )
    def start(self, data: st.DataObject, readonly: list[bool], receiver: int) -> None:
        """Each domain grants a page to another, which maps it; an HVM guest offers
        to take a page from the PV one."""
        for granter in range(3):
            self.grant(data, granter, readonly[granter], b"start")
        for (granter, ref), e in sorted(self.entries.items()):
            mapper = next(i for i in range(3) if self.domid(i) == e.peer)
            m = self.tables[mapper].map_grants([(self.domid(granter), ref)], not e.readonly)
            self.old_handles[mapper].update(m.handles or ())
            self.maps.append(Live(mapper, m, [e], not e.readonly))
        self.offer_transfer(receiver, 2)

    @precondition(lambda self: len(self.entries) < MAX_ENTRIES)
    @rule(
        data=st.data(),
        granter=st.integers(0, 2),
        readonly=st.booleans(),
        fill=st.binary(min_size=1, max_size=64),
    )
    def grant(self, data: st.DataObject, granter: int, readonly: bool, fill: bytes) -> None:
        peer = data.draw(st.sampled_from([i for i in range(3) if i != granter]))
        table = self.tables[granter]
        ref = table.get_nonblock()
        assert ref is not None and ref >= abi.GNTTAB_NR_RESERVED_ENTRIES
        assert (granter, ref) not in self.entries
        page = self._populate(granter)
        self._write(page, data.draw(st.integers(0, PAGE - len(fill))), fill)
        table.grant_access(ref, self.domid(peer), page.gfn, writable=not readonly)
        self.entries[granter, ref] = Entry(
            granter, ref, "grant", self.domid(peer), page.gfn, readonly, page
        )

    @precondition(lambda self: any(e.kind == "ended" for e in self.entries.values()))
    @rule(data=st.data(), readonly=st.booleans())
    def regrant(self, data: st.DataObject, readonly: bool) -> None:
        """Grant an ended ref again, maybe to the other peer (stale handles stay stale)."""
        key = data.draw(st.sampled_from(self._entries_of("ended")))
        e = self.entries[key]
        assert e.page is not None
        peer = data.draw(st.sampled_from([i for i in range(3) if i != e.dom]))
        self.tables[e.dom].grant_access(e.ref, self.domid(peer), e.page.gfn, not readonly)
        e.kind, e.peer, e.readonly, e.frame = "grant", self.domid(peer), readonly, e.page.gfn

    @precondition(lambda self: len(self.maps) < MAX_MAPS)
    @rule(data=st.data(), mapper=st.integers(0, 2), writable=st.booleans(), n=st.integers(1, 2))
    def map(self, data: st.DataObject, mapper: int, writable: bool, n: int) -> None:
        targets = [self._grant_target(data, mapper) for _ in range(n)]
        want = [self.predict_map(mapper, d, r, writable) for d, r in targets]
        for w in want:
            note(f"map{n}", w)
        ms = self.xen.domain_state(self.domid(mapper)).maptrack
        in_use = ms.in_use
        grants = [(self._target_domid(d), r) for d, r in targets]
        try:
            mapping = self.tables[mapper].map_grants(grants, writable)
        except BatchError as e:
            assert n > 1 and e.statuses == want
            assert ms.in_use == in_use
            return
        except GrantError as e:
            assert n == 1 and e.status == want[0]
            assert ms.in_use == in_use
            return
        assert want == [OKAY] * n
        assert mapping.handles is not None and len(mapping.handles) == n
        assert len(set(mapping.handles)) == n
        assert not self._live_handles(mapper) & set(mapping.handles)
        self.old_handles[mapper].update(mapping.handles)
        entries = [self.entries[t] for t in targets]
        self.maps.append(Live(mapper, mapping, entries, writable))
        assert ms.in_use == in_use + n

    @precondition(lambda self: bool(self.maps))
    @rule(data=st.data())
    def unmap(self, data: st.DataObject) -> None:
        live = self.maps.pop(data.draw(st.integers(0, len(self.maps) - 1)))
        live.mapping.unmap()
        assert live.mapping.released
        assert len(live.mapping) == 0

    @rule(data=st.data(), mapper=st.integers(0, 2))
    def unmap_stale_handle(self, data: st.DataObject, mapper: int) -> None:
        """A handle that names no live mapping: GNTST_bad_handle, nothing changes."""
        live = self._live_handles(mapper)
        stale = sorted(self.old_handles[mapper] - live)
        pick = data.draw(st.sampled_from(["old", "unused", "big"]))
        if pick == "old" and stale:
            handle = data.draw(st.sampled_from(stale))
        elif pick == "big":
            handle = BIG_HANDLE
        else:
            handle = data.draw(st.integers(0, 600).filter(lambda h: h not in live))
        ops = (abi.gnttab_unmap_grant_ref * 1)()
        ops[0].host_addr = (0x1000000 + 12345) << 12
        ops[0].handle = handle
        assert self.doms[mapper].grant_table_op(abi.GNTTABOP_unmap_grant_ref, ops) == 0
        assert ops[0].status == abi.GNTST_bad_handle
        note(f"unmap {pick} handle", ops[0].status)

    @precondition(lambda self: bool(self.maps))
    @rule(data=st.data())
    def unmap_wrong_address(self, data: st.DataObject) -> None:
        """A live handle with a host_addr where it is not mapped: general_error, kept."""
        live = data.draw(st.sampled_from(self.maps))
        assert live.mapping.handles is not None
        ops = (abi.gnttab_unmap_grant_ref * 1)()
        ops[0].host_addr = (live.mapping.resource[0] + (1 << 20)) << 12
        ops[0].handle = live.mapping.handles[0]
        assert self.doms[live.mapper].grant_table_op(abi.GNTTABOP_unmap_grant_ref, ops) == 0
        assert ops[0].status == GENERAL
        note("unmap at wrong host_addr", ops[0].status)

    @precondition(lambda self: bool(self.maps))
    @rule(data=st.data(), fill=st.binary(min_size=1, max_size=64))
    def write_through_mapping(self, data: st.DataObject, fill: bytes) -> None:
        live = data.draw(st.sampled_from(self.maps))
        i = data.draw(st.integers(0, len(live.entries) - 1))
        off = data.draw(st.integers(0, PAGE - len(fill)))
        pos = i * PAGE + off
        if not live.writable:
            try:
                live.mapping.mem[pos : pos + len(fill)] = fill
            except TypeError:
                note("write through mapping", "read-only: refused")
                return
            raise AssertionError("wrote through a read-only mapping")
        live.mapping.mem[pos : pos + len(fill)] = fill
        page = live.entries[i].page
        assert page is not None
        page.data[off : off + len(fill)] = fill

    @precondition(lambda self: any(e.page is not None for e in self.entries.values()))
    @rule(data=st.data(), fill=st.binary(min_size=1, max_size=64))
    def write_by_owner(self, data: st.DataObject, fill: bytes) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, e in self.entries.items() if e.page)))
        page = self.entries[key].page
        assert page is not None
        self._write(page, data.draw(st.integers(0, PAGE - len(fill))), fill)

    @precondition(lambda self: bool(self._entries_of("grant")))
    @rule(data=st.data())
    def end_access(self, data: st.DataObject) -> None:
        e = self.entries[data.draw(st.sampled_from(self._entries_of("grant")))]
        mapped = any(self._pins(e))
        try:
            self.tables[e.dom].try_end_access(e.ref)
        except Busy as b:
            assert mapped and b.refs == [e.ref]
            note("end_access", "Busy")
            return
        assert not mapped
        note("end_access", "ended")
        e.kind = "ended"

    @precondition(lambda self: bool(self._entries_of("ended")))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        e = self.entries.pop(data.draw(st.sampled_from(self._entries_of("ended"))))
        self.tables[e.dom].put(e.ref)
        assert e.page is not None
        self._free(e.page)

    @precondition(lambda self: bool(self._entries_of("grant")))
    @rule(data=st.data(), readonly=st.booleans())
    def set_access(self, data: st.DataObject, readonly: bool) -> None:
        grants = self._entries_of("grant")
        written = [k for k in grants if self._pins(self.entries[k])[1]]
        if written and data.draw(st.booleans()):
            grants = written  # often one mapped writable: set_readonly must be refused
        e = self.entries[data.draw(st.sampled_from(grants))]
        table = self.tables[e.dom]
        if not readonly:
            table.set_writable(e.ref)
            e.readonly = False
            return
        writers = self._pins(e)[1]
        try:
            table.set_readonly(e.ref)
        except Busy:
            assert writers
            note("set_readonly", "Busy")
            return
        assert not writers
        note("set_readonly", "done")
        e.readonly = True

    @rule(
        data=st.data(),
        copier=st.integers(0, 2),
        src_kind=st.sampled_from(COPY_SIDES),
        dst_kind=st.sampled_from(COPY_SIDES),
        length=st.integers(0, 96),
        crossing=st.sampled_from([None, None, None, None, "source", "dest"]),
    )
    def copy(
        self,
        data: st.DataObject,
        copier: int,
        src_kind: str,
        dst_kind: str,
        length: int,
        crossing: str | None,
    ) -> None:
        """One GNTTABOP_copy: grant refs or the copier's own page on each side."""
        if crossing:
            length = max(length, 1)
        ops = (abi.gnttab_copy * 1)()
        op = ops[0]
        sides: list[Side] = []
        flags = 0
        for which, kind in (("source", src_kind), ("dest", dst_kind)):
            ptr = getattr(op, which)
            target: tuple[int, int] | None = None
            page: Page | None = None
            if kind == "gref":
                target = self._grant_target(data, copier)
                ptr.u.ref = target[1]
                ptr.domid = self._target_domid(target[0])
                flags |= abi.GNTCOPY_source_gref if which == "source" else abi.GNTCOPY_dest_gref
                e = self.entries.get(target)
                page = e.page if e is not None and e.kind == "grant" else None
            else:
                page = self.scratch[copier]
                ptr.u.gmfn = NOWHERE_GFN if kind == "bad_gfn" else page.gfn
                ptr.domid = self.domid(copier) if kind == "numeric_self" else abi.DOMID_SELF
            if crossing == which:  # runs past the end of its page
                off = data.draw(st.integers(PAGE - length + 1, PAGE + 64))
            else:
                off = data.draw(st.integers(0, PAGE - length))
            ptr.offset = off
            sides.append(Side(kind, target, page, off))
        op.len = length
        op.flags = flags
        src, dst = sides
        if src.page is not None and src.page is dst.page and abs(src.off - dst.off) < length:
            return  # overlapping ranges of one page: memcpy's, not modelled
        want = self.predict_copy(copier, sides, length)
        note("copy", want)
        assert self.tables[copier].copy(ops) == [want]
        assert ops[0].status == want
        if want == OKAY and length:
            assert src.page is not None and dst.page is not None
            dst.page.data[dst.off : dst.off + length] = src.page.data[src.off : src.off + length]

    def predict_copy(self, copier: int, sides: list[Side], n: int) -> int:
        """gnttab_copy_one's status: both domains, then source then dest (each
        its DOMID_SELF rule, then its claim), then bounds -- the order the real
        Xen 4.17 answers in (the generated privcmd oracle).

        Xen 4.17 validates a zero-length copy like any other.
        """
        for side in sides:
            if side.target is not None and side.target[0] >= len(self.doms):
                return abi.GNTST_bad_domain
        for side, dest in zip(sides, (False, True)):
            if side.kind == "numeric_self":
                return abi.GNTST_permission_denied  # "Only DOMID_SELF may reference via frame"
            if side.kind == "bad_gfn":
                return abi.GNTST_bad_page
            if side.target is not None:
                dom, ref = side.target
                if ref >= self._nr_entries(dom):
                    return abi.GNTST_bad_gntref
                e = self.entries.get(side.target)
                if e is None or e.kind != "grant" or e.peer != self.domid(copier):
                    return GENERAL
                if dest and e.readonly:
                    return GENERAL  # "Attempt to write-pin a r/o grant entry"
        if any(side.off + n > PAGE for side in sides):
            return abi.GNTST_bad_copy_arg
        return OKAY

    @precondition(lambda self: len(self.entries) < MAX_ENTRIES)
    @rule(receiver=st.integers(0, 2), giver=st.sampled_from([2, 2, 2, 0, 1]))
    def offer_transfer(self, receiver: int, giver: int) -> None:
        if receiver == giver:
            receiver = (giver + 1) % 3
        dom = self.doms[receiver]
        gfn = 0 if dom.pv else next(self._gfns)  # a translated receiver names a free gfn
        ref = self.tables[receiver].grant_transfer(self.domid(giver), gfn)
        self.entries[receiver, ref] = Entry(receiver, ref, "offer", self.domid(giver), gfn)

    @rule(
        data=st.data(),
        giver=st.sampled_from([2, 2, 2, 0, 1]),
        fill=st.binary(min_size=1, max_size=64),
    )
    def transfer(self, data: st.DataObject, giver: int, fill: bytes) -> None:
        """Give a fresh page: kept (HVM giver), delivered, or lost (bad target)."""
        offers = self._entries_of("offer")
        mine = [k for k in offers if self.entries[k].peer == self.domid(giver)]
        pick = data.draw(st.sampled_from(["mine", "mine", "mine", "offer", "other"]))
        if pick == "mine" and mine:
            target = data.draw(st.sampled_from(mine))
        elif pick != "other" and offers:
            target = data.draw(st.sampled_from(offers))
        else:
            target = self._grant_target(data, giver)
        page = self._populate(giver)
        self._write(page, data.draw(st.integers(0, PAGE - len(fill))), fill)
        recv, ref = target
        e = self.entries.get(target)
        if not self.doms[giver].pv:
            want = GENERAL  # steal_page refuses a translated domain's page: kept
        elif recv >= len(self.doms):
            want = abi.GNTST_bad_domain
        elif (
            ref >= self._nr_entries(recv)
            or e is None
            or e.kind != "offer"
            or e.committed
            or e.peer != self.domid(giver)
        ):
            want = GENERAL
        else:
            want = OKAY
        frames = self.xen.free_frames
        try:
            self.tables[giver].transfer(page.gfn, self._target_domid(recv), ref)
            got = OKAY
        except GrantError as err:
            got = err.status
        assert got == want
        note("transfer", want)
        giver_p2m = self.xen.domain_state(self.domid(giver)).p2m
        if not self.doms[giver].pv:
            assert page.gfn in giver_p2m
            assert self._read(giver, page.gfn) == bytes(page.data)
            self._free(page)
            return
        assert page.gfn not in giver_p2m
        self.pages.remove(page)
        if want != OKAY:  # stolen, then freed: the giver lost it
            assert self.xen.free_frames == frames + 1
            return
        assert e is not None
        assert self.xen.free_frames == frames
        e.committed = True
        arrived = Page(recv, page.gfn if self.doms[recv].pv else e.frame, page.data)
        e.frame = arrived.gfn
        e.page = arrived
        self.pages.append(arrived)

    @precondition(lambda self: any(e.page is not None for e in self.entries.values()))
    @rule(data=st.data())
    def transfer_busy_page(self, data: st.DataObject) -> None:
        """The PV guest gives away a page it granted: bad_page if mapped, kept."""
        pv = 2
        mine = [e for k, e in sorted(self.entries.items()) if e.dom == pv and e.kind == "grant"]
        mapped = [e for e in mine if any(self._pins(e))]
        if not mapped:
            return
        e = data.draw(st.sampled_from(mapped))
        assert e.page is not None
        offers = self._entries_of("offer")
        recv, ref = data.draw(st.sampled_from(offers)) if offers else (0, 8)
        try:
            self.tables[pv].transfer(e.page.gfn, self.domid(recv), ref)
        except GrantError as err:
            assert err.status == abi.GNTST_bad_page
            note("transfer mapped page", err.status)
        else:
            raise AssertionError("transferred a mapped page")

    @precondition(lambda self: bool(self._entries_of("offer")))
    @rule(data=st.data())
    def end_transfer(self, data: st.DataObject) -> None:
        e = self.entries.pop(data.draw(st.sampled_from(self._entries_of("offer"))))
        frame = self.tables[e.dom].end_transfer(e.ref)
        note("end_transfer", "received" if e.committed else "nothing")
        assert self._raw_entry(e.dom, e.ref)[0] == 0
        if not e.committed:
            assert frame == 0
            return
        assert e.page is not None
        assert frame == e.page.gfn
        assert self._read(e.dom, frame) == bytes(e.page.data)
        self._free(e.page)

    # --------------------------------------------------------- invariants
    @invariant()
    def entries_match(self) -> None:
        for (i, ref), e in self.entries.items():
            flags, domid, frame = self._raw_entry(i, ref)
            assert (flags, domid, frame) == (self.expected_flags(e), e.peer, e.frame), (
                f"d{self.domid(i)} ref {ref} {e.kind}: "
                f"{xengrant.decode_flags(flags)} d{domid} frame {frame:#x}, "
                f"want {xengrant.decode_flags(self.expected_flags(e))} d{e.peer} {e.frame:#x}"
            )
            seen = self.tables[i].entry(ref)
            assert (seen.flags, seen.domid, seen.frame) == (flags, domid, frame)
            assert seen.in_use == bool(flags & (READING | WRITING)) or e.kind == "offer"

    @invariant()
    def hypervisor_counts(self) -> None:
        for i in range(len(self.doms)):
            d = self.xen.domain_state(self.domid(i))
            n_maps = sum(len(lv.entries) for lv in self.maps if lv.mapper == i)
            assert d.maptrack.in_use == n_maps
            pins: dict[int, int] = {}
            for lv in self.maps:
                for e in lv.entries:
                    if e.dom == i:
                        inc = GNTPIN_hstw_inc if lv.writable else GNTPIN_hstr_inc
                        pins[e.ref] = pins.get(e.ref, 0) + inc
            assert {ref: act.pin for ref, act in d.gt.active.items()} == pins
            assert d.tot_pages == sum(1 for p in self.pages if p.dom == i)
        assert self.xen.free_frames == self.base_free - len(self.pages)

    @invariant()
    def data_matches(self) -> None:
        for page in self.pages:
            assert self._read(page.dom, page.gfn) == bytes(page.data)
        for lv in self.maps:
            mem = lv.mapping.mem
            for i, e in enumerate(lv.entries):
                assert e.page is not None
                assert bytes(mem[i * PAGE : (i + 1) * PAGE]) == bytes(e.page.data)

    # ----------------------------------------------------------- teardown
    def teardown(self) -> None:
        xen = self.xen
        try:
            for lv in self.maps:
                lv.mapping.unmap()
            self.maps.clear()
            for (i, ref), e in sorted(self.entries.items()):
                table = self.tables[i]
                if e.kind == "offer":
                    table.end_transfer(ref)
                    if e.page is not None:
                        self._free(e.page)
                    continue
                if e.kind == "grant":
                    table.try_end_access(ref)  # nothing is mapped any more: never Busy
                table.put(ref)
                assert e.page is not None
                self._free(e.page)
            self.entries.clear()
            for page in self.scratch:
                self._free(page)
            assert not self.pages
            assert xen.free_frames == self.base_free
            for i, table in enumerate(self.tables):
                assert table.num_free_grants() == self.free_grants[i]
                d = xen.domain_state(self.domid(i))
                assert d.maptrack.in_use == 0 and not d.gt.active and d.tot_pages == 0
            for dom in self.doms:
                xen.destroy_domain(dom.domid)
            assert xen.free_frames == self.free_before_domains
        finally:
            xen.close()


GrantMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestGrantMachine = GrantMachine.TestCase
