"""The emulated hypervisor: domains, their memory, and the hypercall entry points.

Sans-IO, like h11: plain code over a byte buffer (machine memory) and ints.
It opens no file, starts no thread and takes no lock; the embedded wrapper
(:mod:`xengrant.embedded`) backs the buffer with a memfd and serialises calls
the way Xen's per-table locks do.  Guests touch their grant entries directly
in the shared frames with atomics, never through this object.

Entry points, each returning what the hypercall returns:

- :meth:`Hypervisor.grant_table_op` -- ``HYPERVISOR_grant_table_op(cmd, uop, count)``
  (``do_grant_table_op`` in xen/common/grant_table.c); ops are the C structs,
  packed, in a writable buffer, and OUT fields are written back in place.
- :meth:`Hypervisor.populate_physmap`, :meth:`Hypervisor.decrease_reservation`,
  :meth:`Hypervisor.add_to_physmap` -- the ``XENMEM_*`` memory ops the grant
  table needs (xen/common/memory.c).
- :meth:`Hypervisor.create_domain`, :meth:`Hypervisor.destroy_domain` -- the
  toolstack's ``XEN_DOMCTL_createdomain`` / ``destroydomain``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from itertools import repeat
from operator import itemgetter

from .._cext import translate as _cext_translate
from ..abi import grant_table as gt
from ..abi.memory import XENMAPIDX_grant_table_status, XENMAPSPACE_grant_table
from ..errors import HypercallError
from . import gnttab_cache_flush, gnttab_copy, gnttab_map, gnttab_setup, gnttab_transfer
from .domain import (
    P2M_GNTTAB_SHARED,
    P2M_GNTTAB_STATUS,
    P2M_GRANT_MAP_RO,
    P2M_RAM_RW,
    DomainState,
)
from .faults import Faults
from .grant_table import (
    DEFAULT_MAX_GRANT_FRAMES,
    INITIAL_NR_GRANT_FRAMES,
    GrantTableState,
    grant_to_status_frames,
)
from .machine import PAGE_SHIFT, PAGE_SIZE, Machine, OutOfMemory
from .maptrack import DEFAULT_MAX_MAPTRACK_FRAMES, Maptrack

#: From this many gfns on, memory ops try their bulk (C-speed) path first.
_BULK = 8  # mutation: equivalent — only chooses a path; both answer alike (test_bulk_paths)
#: The two fields of a p2m entry ``(mfn, p2m type)``, for map() at C speed.
_P2M_MFN = itemgetter(0)
_P2M_TYPE = itemgetter(1)

#: Ordinary domain ids stop below DOMID_FIRST_RESERVED (xen.h).
MAX_DOMID = gt.DOMID_FIRST_RESERVED - 1

_OPS = {
    gt.GNTTABOP_map_grant_ref: gnttab_map.map_grant_ref_batch,
    gt.GNTTABOP_unmap_grant_ref: gnttab_map.unmap_grant_ref_batch,
    gt.GNTTABOP_unmap_and_replace: gnttab_map.unmap_and_replace_batch,
    gt.GNTTABOP_copy: gnttab_copy.copy_batch,
    gt.GNTTABOP_transfer: gnttab_transfer.transfer_batch,
    gt.GNTTABOP_setup_table: gnttab_setup.setup_table,
    gt.GNTTABOP_query_size: gnttab_setup.query_size,
    gt.GNTTABOP_set_version: gnttab_setup.set_version,
    gt.GNTTABOP_get_status_frames: gnttab_setup.get_status_frames,
    gt.GNTTABOP_get_version: gnttab_setup.get_version,
    gt.GNTTABOP_swap_grant_ref: gnttab_setup.swap_grant_ref,
}
_OP_SIZES = {cmd: ctypes.sizeof(st) for cmd, st in gt.GNTTABOP_STRUCTS.items()}
#: do_grant_table_op: the low 12 bits of ``cmd`` are the command, the rest a
#: continuation argument only GNTTABOP_cache_flush may carry.
GNTTABOP_CONTINUATION_ARG_SHIFT = 12
GNTTABOP_CMD_MASK = (1 << GNTTABOP_CONTINUATION_ARG_SHIFT) - 1
#: The op names fault injection knows commands by (:mod:`.faults`).
_OP_NAMES = {cmd: st.__name__.replace("gnttab_", "") for cmd, st in gt.GNTTABOP_STRUCTS.items()}
#: gnttab_setup_table, gnttab_query_size, gnttab_get_status_frames: "if ( count
#: != 1 ) return -EINVAL;" before reading the op.
_COUNT_MUST_BE_ONE = frozenset(
    {gt.GNTTABOP_setup_table, gt.GNTTABOP_query_size, gt.GNTTABOP_get_status_frames}
)
#: do_grant_table_op passes no count to gnttab_set_version/gnttab_get_version:
#: they read exactly one op whatever ``count`` says.
_ONE_OP = _COUNT_MUST_BE_ONE | {gt.GNTTABOP_set_version, gt.GNTTABOP_get_version}


class Hypervisor:
    """Xen's grant-table and memory rules over a machine-memory buffer.

    Args:
        memory: writable buffer holding the machine's frames.
        nr_frames: frames in ``memory``.
        max_grant_frames: default per-domain limit (Xen: 64).
        max_maptrack_frames: default per-domain limit (Xen: 1024).
        max_grant_version: highest version set_version accepts (Xen: 2).
        grant_transfer: allow GNTTABOP_transfer (Xen: on for x86 PV).
    """

    def __init__(
        self,
        memory: memoryview,
        nr_frames: int,
        *,
        max_grant_frames: int = DEFAULT_MAX_GRANT_FRAMES,
        max_maptrack_frames: int = DEFAULT_MAX_MAPTRACK_FRAMES,
        max_grant_version: int = 2,
        grant_transfer: bool = True,
    ) -> None:
        self.machine = Machine(memory, nr_frames)
        self.mem = memory
        self.domains: dict[int, DomainState] = {}
        self.default_max_grant_frames = max_grant_frames
        self.default_max_maptrack_frames = max_maptrack_frames
        self._next_domid = 1
        #: ``gnttab=max-ver:N``: 1 makes set_version(2) answer -ENOSYS.
        self.max_grant_version = max_grant_version
        #: ``gnttab=transfer=0`` (and Arm) make GNTTABOP_transfer -EOPNOTSUPP.
        self.grant_transfer = grant_transfer
        #: Planned faults (``xen.faults.inject(...)``): see :mod:`.faults`.
        self.faults = Faults()
        #: Called as ``log(domid, op, status, reason)`` for every failed op,
        #: like Xen's gdprintk debug lines; None to stay silent.
        self.log: Callable[[int, str, int, str], None] | None = None

    # ------------------------------------------------------------ domains
    def create_domain(
        self,
        domid: int | None = None,
        *,
        pv: bool = False,
        max_grant_frames: int | None = None,
        max_maptrack_frames: int | None = None,
        max_pages: int | None = None,
    ) -> int:
        """Create a domain with an empty physmap and a one-frame grant table.

        Args:
            domid: the id wanted, or None for the next free one (from 1).
            pv: a PV guest (identity physmap, may transfer pages).
                Domain 0 is the control domain (``privileged``).
            max_grant_frames: grant-table frame limit; None or -1 for the default.
            max_maptrack_frames: maptrack page limit; None or -1 for the default.
            max_pages: memory reservation limit in frames; None for no limit.

        Returns:
            The new domain's id.

        Raises:
            HypercallError: EEXIST for a domid in use, EINVAL for a bad id or
                limit, ENOMEM if the grant table cannot be allocated.
        """
        if domid is None:
            domid = self._free_domid()
        if not 0 <= domid <= MAX_DOMID:
            raise HypercallError("createdomain", errno.EINVAL, f"domid {domid} is reserved")
        if domid in self.domains:
            raise HypercallError("createdomain", errno.EEXIST, f"domain {domid} exists")
        mgf = self.default_max_grant_frames if max_grant_frames in (None, -1) else max_grant_frames
        mmf = (
            self.default_max_maptrack_frames
            if max_maptrack_frames in (None, -1)
            else max_maptrack_frames
        )
        assert mgf is not None and mmf is not None
        if mgf < INITIAL_NR_GRANT_FRAMES or mmf < 0:
            raise HypercallError(
                "createdomain", errno.EINVAL, "max_grant_frames must be >= 1, max_maptrack >= 0"
            )
        d = DomainState(
            domid=domid,
            pv=pv,
            max_pages=self.machine.nr_frames if max_pages is None else max_pages,
            gt=GrantTableState(mgf),
            maptrack=Maptrack(mmf),
            privileged=domid == 0,
        )
        self.domains[domid] = d
        if not self.grow_table(d, INITIAL_NR_GRANT_FRAMES):
            del self.domains[domid]
            raise HypercallError("createdomain", errno.ENOMEM, "no frame for the grant table")
        return domid

    def _free_domid(self) -> int:
        for _ in range(MAX_DOMID + 1):
            candidate = self._next_domid
            self._next_domid = candidate + 1 if candidate < MAX_DOMID else 1
            if candidate not in self.domains:
                return candidate
        raise HypercallError("createdomain", errno.ENOSPC, "no free domain id")

    def lookup(self, domid: int) -> DomainState | None:
        """The domain with ``domid``, dying ones included (``rcu_lock_domain_by_id``)."""
        return self.domains.get(domid)

    def live(self, domid: int, op: str) -> DomainState:
        """A domain that exists and is not dying.

        Raises:
            HypercallError: ESRCH otherwise.
        """
        d = self.domains.get(domid)
        if d is None or d.is_dying:
            raise HypercallError(op, errno.ESRCH, f"no domain {domid}")
        return d

    def destroy_domain(self, domid: int) -> None:
        """Destroy a domain (``domain_kill`` then ``domain_destroy``).

        Its mappings of others' grants are undone (``gnttab_release_mappings``),
        its memory is released, and it lingers as a dying zombie while other
        domains still map pages it granted; the last unmap completes it.

        Raises:
            HypercallError: ESRCH if there is no such live domain.
        """
        d = self.kill_domain(domid)
        while not self.relinquish_resources(d):
            pass

    def kill_domain(self, domid: int) -> DomainState:
        """``domain_kill``'s first step: the domain is dying, nothing it asks runs.

        Its resources go with :meth:`relinquish_resources`, which may be
        called a piece at a time (others' hypercalls may run in between).

        Raises:
            HypercallError: ESRCH if there is no such live domain.
        """
        d = self.live(domid, "destroydomain")
        d.is_dying = True
        d.relinquish_at = len(d.maptrack.entries)
        return d

    def relinquish_resources(self, d: DomainState, budget: int | None = None) -> bool:
        """``domain_relinquish_resources``: release a dying domain's mappings, then memory.

        Preemptible as Xen's: at most ``budget`` maptrack handles or p2m
        entries per call (``-ERESTART`` there: call again).

        Returns:
            True once everything is released (then the zombie goes as soon
            as nobody maps its grants, :meth:`maybe_complete_destroy`).
        """
        if d.relinquish_at:
            d.relinquish_at = gnttab_map.release_mappings(self, d, d.relinquish_at, budget)
            return False
        p2m = d.p2m
        if budget is None or len(p2m) <= budget:
            entries = list(p2m.values())
            p2m.clear()
        else:
            entries = [p2m.pop(gfn) for gfn in list(itertools.islice(p2m, budget))]
        ram = [mfn for mfn, p2mt in entries if p2mt == P2M_RAM_RW]
        d.tot_pages -= len(ram)
        self.machine.disown_many(ram)
        if p2m:
            return False
        self.maybe_complete_destroy(d)
        return True

    def maybe_complete_destroy(self, d: DomainState) -> None:
        """Free a dying domain's grant table once no grant of it is pinned
        (and :meth:`relinquish_resources` is done)."""
        if not d.is_dying or d.gt.active or d.relinquish_at or d.p2m:
            return
        for mfn in d.gt.shared + d.gt.status:
            self.machine.disown(mfn)
        d.gt.shared.clear()
        d.gt.status.clear()
        self.domains.pop(d.domid, None)

    def iter_domains(self) -> Iterator[DomainState]:
        """Every domain, dying ones included, by id."""
        for domid in sorted(self.domains):
            yield self.domains[domid]

    # ------------------------------------------------------ grant table size
    def grow_table(self, d: DomainState, nr_frames: int) -> bool:
        """``gnttab_grow_table``: extend to ``nr_frames`` shared frames.

        Returns:
            False if past max_grant_frames or out of memory (nothing changes).
        """
        g = d.gt
        # mutation: equivalent — `<`: at equal sizes the code below grows by nothing
        if nr_frames <= g.nr_grant_frames:
            return True
        if nr_frames > g.max_grant_frames:
            return False
        new = nr_frames - g.nr_grant_frames
        want_status = 0
        if g.version == 2:
            want_status = grant_to_status_frames(nr_frames) - len(g.status)
        try:
            frames = self.machine.alloc(d.domid, new + want_status)
        except OutOfMemory:
            return False
        self._add_table_frames(d, frames[:new], frames[new:])
        return True

    def _add_table_frames(self, d: DomainState, shared: list[int], status: list[int]) -> None:
        """Append table frames; a PV guest sees them at gfn == mfn (identity physmap)."""
        g = d.gt
        g.shared.extend(shared)
        g.status.extend(status)
        if d.pv:
            for mfn in shared:
                d.p2m[mfn] = (mfn, P2M_GNTTAB_SHARED)
            for mfn in status:
                d.p2m[mfn] = (mfn, P2M_GNTTAB_STATUS)
            g.shared_gfn.extend(shared)
            g.status_gfn.extend(status)
        else:
            g.shared_gfn.extend([-1] * len(shared))
            g.status_gfn.extend([-1] * len(status))

    # ----------------------------------------------------------- hypercall
    def grant_table_op(self, caller: int, cmd: int, uop: memoryview, count: int) -> int:
        """``HYPERVISOR_grant_table_op(cmd, uop, count)`` issued by ``caller``.

        Args:
            caller: the calling domain's id.
            cmd: a ``GNTTABOP_*`` command.
            uop: writable buffer holding ``count`` packed op structures; OUT
                fields are written back in place.
            count: number of ops.

        Returns:
            0 (per-op results are in each op's ``status``) or a negative
            errno, decided as ``do_grant_table_op`` does: -EINVAL for a
            negative count (``(int)count < 0``), then -EINVAL for any bit
            above ``GNTTABOP_CMD_MASK`` (0xfff) in ``cmd`` unless the command
            is cache_flush (whose continuation they carry), -ENOSYS for an
            unknown or removed command (dump_table, 13 and up), -EINVAL for a
            count other than 1 where Xen wants 1 (set_version and get_version
            ignore it), -EFAULT if ``uop`` is too short or read-only,
            -EOPNOTSUPP for transfer when disabled (``grant_transfer=False``:
            ``gnttab=transfer=0``, Arm), cache_flush's own errnos
            (:mod:`.gnttab_cache_flush`), and -ESRCH if the caller does not
            exist.
        """
        d = self.domains.get(caller)
        if d is None or d.is_dying:
            return -errno.ESRCH
        # do_grant_table_op(unsigned int cmd, ..., unsigned int count):
        # "if ( (int)count < 0 ) return -EINVAL;"
        if count < 0 or count > 0x7FFFFFFF:
            return -errno.EINVAL
        cmd &= 0xFFFFFFFF
        opaque_in = cmd & ~GNTTABOP_CMD_MASK
        cmd &= GNTTABOP_CMD_MASK
        # "if ( (cmd &= GNTTABOP_CMD_MASK) != GNTTABOP_cache_flush && opaque_in )"
        if cmd != gt.GNTTABOP_cache_flush and opaque_in:
            return -errno.EINVAL
        handler = _OPS.get(cmd)
        if handler is None and cmd != gt.GNTTABOP_cache_flush:
            return -errno.ENOSYS
        if cmd in _COUNT_MUST_BE_ONE and count != 1:
            return -errno.EINVAL
        if len(uop) < _OP_SIZES[cmd] * (1 if cmd in _ONE_OP else count):
            return -errno.EFAULT
        if uop.readonly:
            return -errno.EFAULT
        if cmd == gt.GNTTABOP_cache_flush:
            return gnttab_cache_flush.cache_flush(self, d, uop, count, opaque_in)
        if cmd in _ONE_OP and self.faults and self.faults.fire("efault", _OP_NAMES[cmd], caller):
            return -errno.EFAULT  # copy_from_guest of the op failed (injected)
        assert handler is not None
        return handler(self, d, uop, count)

    # --------------------------------------------------------- memory ops
    def populate_physmap(self, caller: int, gfns: Sequence[int]) -> list[int]:
        """``XENMEM_populate_physmap``: back each gfn with a fresh zeroed frame.

        For a PV domain the gfns are ignored and the new frames' numbers are
        returned (its physmap is the identity).

        Returns:
            The gfns populated, in order; shorter than asked when memory,
            the reservation or a gfn already in use stops it (as Xen returns
            the number of extents done).
        """
        d = self.live(caller, "populate_physmap")
        # The extents done before the first that fails, as the per-extent
        # loop of populate_physmap (xen/common/memory.c) stops there: the
        # reservation (d->max_pages), a gfn already in use, or no memory.
        n = min(len(gfns), max(d.max_pages - d.tot_pages, 0), self.machine.free_frames)
        # mutation: equivalent — only chooses the path; both populate alike (test_bulk_paths)
        if n < _BULK:
            return self._populate_each(d, gfns[:n])
        if not d.pv:
            p2m = d.p2m
            want = list(gfns[:n])
            fresh = set(want)
            # one C-speed check for the common case: distinct holes, none negative
            # mutation: equivalent — this check only chooses the bulk path; the
            # per-gfn loop below answers the same for any list (`and`->`or`, `<=`).
            if (
                len(fresh) != n
                or (want and min(want) < 0)
                or not p2m.keys().isdisjoint(fresh)
            ):
                seen: set[int] = set()
                for i in range(n):
                    gfn = gfns[i]
                    if gfn < 0 or gfn in p2m or gfn in seen:
                        n = i
                        break
                    seen.add(gfn)
        if n <= 0:
            return []
        try:
            mfns = self.machine.alloc(d.domid, n)
        except OutOfMemory:  # the machine's backing refused (a service's file limit)
            return []
        keys = mfns if d.pv else list(gfns[:n])
        d.p2m.update(zip(keys, zip(mfns, repeat(P2M_RAM_RW))))
        d.tot_pages += n
        return keys

    def _populate_each(self, d: DomainState, gfns: Sequence[int]) -> list[int]:
        """:meth:`populate_physmap` of a few gfns, one extent at a time."""
        done: list[int] = []
        p2m, alloc = d.p2m, self.machine.alloc
        for gfn in gfns:
            if not d.pv and (gfn < 0 or gfn in p2m):
                break
            try:
                (mfn,) = alloc(d.domid, 1)
            except OutOfMemory:
                break
            key = mfn if d.pv else gfn
            p2m[key] = (mfn, P2M_RAM_RW)
            d.tot_pages += 1
            done.append(key)
        return done

    def decrease_reservation(self, caller: int, gfns: Sequence[int]) -> int:
        """``XENMEM_decrease_reservation``: give frames back (``guest_remove_page``).

        A frame another domain still maps stays alive for it until unmapped.
        A gfn holding a grant-table frame is only removed from the physmap.

        Returns:
            How many gfns were released (stops at the first that is not RAM
            or a grant-table frame of the caller).
        """
        d = self.live(caller, "decrease_reservation")
        p2m = d.p2m
        ents = None
        # mutation: equivalent — only chooses the path; both release alike (test_bulk_paths)
        if len(gfns) >= _BULK:
            with contextlib.suppress(KeyError, TypeError):
                ents = list(map(p2m.__getitem__, gfns))
        if (
            ents is not None
            and set(map(_P2M_TYPE, ents)) <= {P2M_RAM_RW}
            and len(set(gfns)) == len(ents)
        ):
            # the common case, RAM only, each gfn once: the loop below at C speed
            deque(map(p2m.__delitem__, gfns), maxlen=0)
            d.tot_pages -= len(ents)
            self.machine.disown_many(list(map(_P2M_MFN, ents)))
            return len(ents)
        done = 0
        ram: list[int] = []  # guest_remove_page of each RAM frame, freed below in runs
        for gfn in gfns:
            ent = p2m.get(gfn)
            if ent is None:
                break
            mfn, p2mt = ent
            if p2mt == P2M_RAM_RW:
                del p2m[gfn]
                ram.append(mfn)
            elif p2mt in (P2M_GNTTAB_SHARED, P2M_GNTTAB_STATUS):
                del p2m[gfn]
                self._forget_table_gfn(d, gfn)
            else:
                break
            done += 1
        d.tot_pages -= len(ram)
        self.machine.disown_many(ram)
        return done

    def _forget_table_gfn(self, d: DomainState, gfn: int) -> None:
        for gfns in (d.gt.shared_gfn, d.gt.status_gfn):
            for i, g in enumerate(gfns):
                if g == gfn:
                    gfns[i] = -1

    def add_to_physmap(self, caller: int, space: int, idx: int, gpfn: int) -> int:
        """``XENMEM_add_to_physmap``: place a grant-table frame at ``gpfn``.

        Only ``XENMAPSPACE_grant_table`` is emulated.  ``idx`` beyond the
        current size grows the table (``gnttab_map_frame``); with
        ``XENMAPIDX_grant_table_status`` it names a v2 status frame.  RAM
        already at ``gpfn`` is freed, as Xen removes the old page.  A status
        ``idx`` past the v2 status frames grows the table until it exists.

        Returns:
            0, or -EINVAL (bad idx, past max_grant_frames, status frame
            under v1, gpfn holding a grant mapping), -EOPNOTSUPP for other
            spaces or PV callers.
        """
        d = self.live(caller, "add_to_physmap")
        if space != XENMAPSPACE_grant_table or d.pv:
            return -errno.EOPNOTSUPP
        g = d.gt
        status = bool(idx & XENMAPIDX_grant_table_status)
        idx &= ~XENMAPIDX_grant_table_status
        if status:
            if g.version != 2:
                return -errno.EINVAL
            if idx >= len(g.status):
                # gnttab_get_status_frame_mfn: grow the table so that status
                # frame idx exists (status_to_grant_frames), within the limit.
                want = -(-(idx + 1) * gt.GRANT_STATUS_PER_PAGE // gt.GRANT_PER_PAGE_V2)
                if want <= g.max_grant_frames:
                    self.grow_table(d, want)
                if idx >= len(g.status):
                    return -errno.EINVAL
            mfn, frames_gfn, p2mt = g.status[idx], g.status_gfn, P2M_GNTTAB_STATUS
        else:
            if idx >= g.nr_grant_frames and not self.grow_table(d, idx + 1):
                return -errno.EINVAL
            mfn, frames_gfn, p2mt = g.shared[idx], g.shared_gfn, P2M_GNTTAB_SHARED
        if gpfn < 0:
            return -errno.EINVAL
        old = d.p2m.get(gpfn)
        if old is not None:
            if old[1] == P2M_RAM_RW:
                del d.p2m[gpfn]
                d.tot_pages -= 1
                self.machine.disown(old[0])
            elif old[1] in (P2M_GNTTAB_SHARED, P2M_GNTTAB_STATUS):
                del d.p2m[gpfn]
                self._forget_table_gfn(d, gpfn)
            else:
                return -errno.EINVAL
        prev = frames_gfn[idx]
        if prev >= 0:
            d.p2m.pop(prev, None)
        frames_gfn[idx] = gpfn
        d.p2m[gpfn] = (mfn, p2mt)
        return 0

    # ------------------------------------------------------ guest access
    def translate(self, caller: int, gfns: Sequence[int], write: bool) -> list[int]:
        """Resolve the caller's gfns to machine frames, as its MMU would.

        Raises:
            HypercallError: EFAULT for a gfn with nothing mapped, or a write
                to a read-only grant mapping.
        """
        d = self.live(caller, "access")
        p2m = d.p2m
        if len(gfns) == 1:  # the common single page
            ent = p2m.get(gfns[0])
            if ent is not None and not (write and ent[1] == P2M_GRANT_MAP_RO):
                return [ent[0]]
        # mutation: equivalent — only chooses the C walk; the loop below answers the same
        elif type(gfns) is list and type(p2m) is dict:
            got = _cext_translate(p2m, gfns, P2M_GRANT_MAP_RO if write else -1)
            if type(got) is list:
                return got
        for gfn in gfns:  # find the first culprit, as the MMU would fault on it
            ent = p2m.get(gfn)
            if ent is None:
                raise HypercallError("access", errno.EFAULT, f"d{caller} gfn {gfn:#x} not mapped")
            if write and ent[1] == P2M_GRANT_MAP_RO:
                raise HypercallError(
                    "access", errno.EFAULT, f"d{caller} gfn {gfn:#x} is a read-only grant mapping"
                )
        return [p2m[gfn][0] for gfn in gfns]

    def hold_guest_frames(self, caller: int, gfns: Sequence[int]) -> list[int]:
        """A PV guest maps its own RAM: one page reference per frame.

        x86 ``get_page_from_l1e``: a PV guest's page-table entry for a page it
        owns holds a reference, so ``steal_page`` (GNTTABOP_transfer) refuses
        a page the giver still has mapped.  The guest's views
        (``map_gfns``) stand for its page tables: each holds its RAM frames
        until closed (:meth:`release_guest_frames`).  A translated guest's
        mappings hold nothing (its p2m does).

        Returns:
            The frames held (to release later); [] for a translated guest.
        """
        d = self.domains.get(caller)
        if d is None or not d.pv:
            return []
        p2m, refs = d.p2m, self.machine.refcount
        held: list[int] = []
        for gfn in gfns:
            ent = p2m.get(gfn)
            if ent is not None and ent[1] == P2M_RAM_RW:
                refs[ent[0]] += 1
                held.append(ent[0])
        return held

    def release_guest_frames(self, mfns: Sequence[int]) -> None:
        """Drop the references :meth:`hold_guest_frames` took
        (``put_page_from_l1e``); a frame its owner gave back meanwhile is freed."""
        for mfn in mfns:
            self.machine.put(mfn)

    def copy_to_guest(self, d: DomainState, gpaddr: int, data: bytes) -> bool:
        """Write ``data`` at guest-physical ``gpaddr`` (a guest handle).

        Returns:
            False if any byte falls on a gfn that is not writable RAM.
        """
        pos = 0
        while pos < len(data):
            gfn, off = divmod(gpaddr + pos, PAGE_SIZE)
            ent = d.p2m.get(gfn)
            if ent is None or ent[1] not in (P2M_RAM_RW,):
                return False
            n = min(PAGE_SIZE - off, len(data) - pos)
            base = ent[0] << PAGE_SHIFT
            self.mem[base + off : base + off + n] = data[pos : pos + n]
            pos += n
        return True
