"""A domain's hypercalls in the service: :class:`RemoteHypercalls`.

One message per hypercall (a batch of grant-table ops is one round trip);
every reply carries the changes to the domain's p2m, which
:class:`RemoteHypercalls` mirrors, and the frames this process may reach are
mapped from the files the service sends (:mod:`xengrant.service.memview`).
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from .. import _cext
from ..abi import grant_table as gt
from ..emu.domain import P2M_GRANT_MAP_RO, P2M_GRANT_MAP_RW
from ..errors import HypercallError
from . import frontring
from . import protocol as p
from .channel import Channel
from .errors import ServiceError
from .memview import ClientMemory

PAGE_SIZE = 4096
_OP_SIZES = {cmd: ctypes.sizeof(st) for cmd, st in gt.GNTTABOP_STRUCTS.items()}
_ONE_OP = frozenset(
    {
        gt.GNTTABOP_setup_table,
        gt.GNTTABOP_query_size,
        gt.GNTTABOP_get_status_frames,
        gt.GNTTABOP_set_version,
        gt.GNTTABOP_get_version,
    }
)
#: Ops whose batches may be split across messages (Xen preempts them too).
_SPLITTABLE = frozenset(
    {
        gt.GNTTABOP_map_grant_ref,
        gt.GNTTABOP_unmap_grant_ref,
        gt.GNTTABOP_unmap_and_replace,
        gt.GNTTABOP_copy,
        gt.GNTTABOP_transfer,
        gt.GNTTABOP_swap_grant_ref,
    }
)
_BATCH_BYTES = p.MAX_PAYLOAD - p.GNTTAB_REQ.size
_GFNS_PER_MSG = (p.MAX_PAYLOAD - 8) // 8
_FOREIGN = (P2M_GRANT_MAP_RW, P2M_GRANT_MAP_RO)
#: A GNTTAB_OP reply's head: status, the hypercall's rc, the length of the ops.
_GNTTAB_HEAD = struct.Struct("<iiI")
_first = itemgetter(0)
_second = itemgetter(1)


def p2m_apply(p2m: dict[int, tuple[int, int]], body: Any, pos: int) -> int:
    """Apply the p2m entries a reply carries to a client's mirror: ``_cext.p2m_apply``
    in Python (the reference it transcribes; ``tests/test_service_protocol.py``
    holds the two to each other).

    At ``body[pos:]``: u32 n (:data:`~xengrant.service.protocol.P2M_FULL` set:
    they are the whole p2m, the mirror is cleared first), then three
    little-endian i64 columns of n: gfns, mfns (-1: the gfn holds nothing now)
    and p2m types.  ``p2m[gfn] = (mfn, type)``, or ``p2m.pop(gfn, None)`` for a
    negative mfn, in order.

    Returns:
        The position after the columns.

    Raises:
        ValueError: the count or the columns are truncated (nothing applied).
        TypeError: ``p2m`` is not a dict.
    """
    if not isinstance(p2m, dict):
        raise TypeError("p2m_apply: p2m must be a dict")
    size = len(body)
    if pos < 0 or size - pos < 4:
        raise ValueError("p2m delta: truncated count")
    n: int = p.U32.unpack_from(body, pos)[0]
    full = n & p.P2M_FULL
    n &= ~p.P2M_FULL
    pos += 4
    if (size - pos) // 24 < n:
        raise ValueError("p2m delta: truncated entries")
    if full:
        p2m.clear()
    cols = struct.unpack_from(f"<{3 * n}q", body, pos)
    for gfn, mfn, p2mt in zip(cols[:n], cols[n : 2 * n], cols[2 * n :]):
        if mfn < 0:
            p2m.pop(gfn, None)
        else:
            p2m[gfn] = (mfn, p2mt)
    return pos + 24 * n


class RemoteHypercalls:
    """:class:`~xengrant.hypercall.Hypercalls` of a domain in the service.

    Args:
        channel: a connection bound to the domain.
        domid: the domain.
        fd: the domain's memory socket (service/memview.py).
        nr_frames: machine frames in it.
    """

    def __init__(self, channel: Channel, domid: int, fd: int, nr_frames: int) -> None:
        self.channel = channel
        self.domid = domid
        self.nr_frames = nr_frames
        #: the frames this process may reach, placed where machine memory would be
        self.memory = ClientMemory(fd, nr_frames)
        self._mmap = self.memory.mm
        #: the domain's p2m as the service last told us: gfn -> (mfn, type)
        self.p2m: dict[int, tuple[int, int]] = {}
        #: Xen's debug reasons for the ops that failed in the last call.
        self.last_reasons: list[str] = []
        self._closed = False

    def _apply_delta(self, body: bytes | memoryview, pos: int) -> int:
        """Apply the p2m entries at ``body[pos:]`` to the mirror; the position after them.

        One C loop (``_cext.p2m_apply``, a transcription of :func:`p2m_apply`,
        which runs instead when :data:`~xengrant.service.frontring.C_PATHS` is
        off) over the columns of :func:`~xengrant.service.protocol.pack_p2m`:
        set each entry, or pop the gfns that hold nothing now.

        Raises:
            ServiceError: EBADMSG, the delta is truncated (nothing applied).
        """
        try:
            apply = _cext.p2m_apply if frontring.C_PATHS else p2m_apply
            end: int = apply(self.p2m, body, pos)
        except ValueError as e:
            raise ServiceError(errno.EBADMSG, str(e)) from None
        return end

    def _nbytes(self, cmd: int, uop: memoryview, count: int) -> tuple[int, int | None]:
        """``(bytes of uop the call reads, op size or None for an unknown cmd)``."""
        size = _OP_SIZES.get(cmd)
        if size is None or count < 0 or count > 0x7FFFFFFF:
            return 0, size
        if cmd in _ONE_OP:
            return min(len(uop), size), size
        return min(len(uop), size * count), size

    def grant_table_op(self, cmd: int, uop: memoryview, count: int) -> int:
        """``HYPERVISOR_grant_table_op`` in the service; OUT fields come back into ``uop``."""
        nbytes, size = self._nbytes(cmd, uop, count)
        if cmd in _SPLITTABLE and size is not None and nbytes > _BATCH_BYTES:
            per = _BATCH_BYTES // size
            done = 0
            while done < count:
                n = min(per, count - done)
                rc = self._gnttab(cmd, uop[done * size : (done + n) * size], n)
                if rc < 0:
                    return rc
                done += n
            return 0
        return self._gnttab(cmd, uop[:nbytes], count)

    def _gnttab(self, cmd: int, uop: memoryview, count: int) -> int:
        """One ``MSG_GNTTAB_OP``; a signal during its wait is raised once the reply
        is taken (OUT fields, p2m mirror), as a hypercall returns before the
        signal is delivered."""
        with self.channel.held_signals():
            body = self.channel.request(p.MSG_GNTTAB_OP, p.GNTTAB_REQ.pack(cmd, count), uop)
            return self._finish(body, uop)

    def _finish(self, body: bytes, uop: memoryview) -> int:
        """Take a GNTTAB_OP reply: OUT fields into ``uop``, p2m entries, reasons.

        Returns:
            The hypercall's return.

        Raises:
            HypercallError: the service refused the request (-errno).
            ServiceError: EBADMSG, a reply too short to be one.
        """
        if len(body) < _GNTTAB_HEAD.size:
            status = p.I32.unpack_from(body)[0] if len(body) >= 4 else -errno.EBADMSG
            if status >= 0:
                raise ServiceError(errno.EBADMSG, "short GNTTAB_OP reply")
            raise HypercallError("grant_table_op", -status, body[4:].decode("utf-8", "replace"))
        status, rc, n = _GNTTAB_HEAD.unpack_from(body)
        if status < 0:
            raise HypercallError("grant_table_op", -status, body[4:].decode("utf-8", "replace"))
        if n:
            uop[:n] = memoryview(body)[12 : 12 + n]
        pos = self._apply_delta(body, 12 + n)
        self.last_reasons = p.unpack_reasons(body, pos) if len(body) - pos > 2 else []
        return int(rc)

    def post_grant_table_op(
        self,
        cmd: int,
        uop: memoryview,
        count: int,
        done: Callable[[int], BaseException | None],
    ) -> None:
        """``HYPERVISOR_grant_table_op`` without waiting for it (``F_POSTED``).

        The service runs it before any later request of this domain.  When its
        reply is read (at the latest with the next reply), the OUT fields go
        into ``uop``, the p2m mirror is updated, and ``done(rc)`` runs; the
        failure it returns (or raises) surfaces from the next call
        (:attr:`Channel.deferred`).

        Raises:
            ServiceError: the connection is gone.
            Exception: an earlier posted call's failure; nothing is sent.
        """
        nbytes, size = self._nbytes(cmd, uop, count)
        if cmd in _SPLITTABLE and size is not None and nbytes > _BATCH_BYTES:
            raise ValueError(f"post_grant_table_op: {nbytes} bytes of ops is over one message")
        ops = uop[:nbytes]

        def on_reply(body: bytes) -> BaseException | None:
            return done(self._finish(body, ops))

        self.channel.post(p.MSG_GNTTAB_OP, p.GNTTAB_REQ.pack(cmd, count), on_reply, ops)

    def populate_physmap(self, gfns: Sequence[int]) -> list[int]:
        """``XENMEM_populate_physmap`` in the service."""
        done: list[int] = []
        for i in range(0, len(gfns), _GFNS_PER_MSG) or [0]:
            chunk = list(gfns[i : i + _GFNS_PER_MSG])
            body = self.channel.call_ok(p.MSG_POPULATE, p.pack_i64s(chunk), "populate_physmap")
            (n,) = p.U32.unpack_from(body)
            got = list(struct.unpack_from(f"<{n}q", body, 4))
            self._apply_delta(body, 4 + 8 * n)
            done += got
            if n < len(chunk):
                break
        return done

    def decrease_reservation(self, gfns: Sequence[int]) -> int:
        """``XENMEM_decrease_reservation`` in the service."""
        total = 0
        for i in range(0, len(gfns), _GFNS_PER_MSG) or [0]:
            chunk = list(gfns[i : i + _GFNS_PER_MSG])
            body = self.channel.call_ok(
                p.MSG_DECREASE, p.pack_i64s(chunk), "decrease_reservation"
            )
            (n,) = p.U32.unpack_from(body)
            self._apply_delta(body, 4)
            total += n
            if n < len(chunk):
                break
        return total

    def add_to_physmap(self, space: int, idx: int, gpfn: int) -> int:
        """``XENMEM_add_to_physmap`` in the service."""
        body = self.channel.call_ok(
            p.MSG_ADD_TO_PHYSMAP,
            p.ADD_TO_PHYSMAP_REQ.pack(space, idx & 0xFFFFFFFFFFFFFFFF, gpfn),
            "add_to_physmap",
        )
        (rc,) = p.I32.unpack_from(body)
        self._apply_delta(body, 4)
        return int(rc)

    def translate(self, gfns: Sequence[int], writable: bool) -> list[tuple[int, int]]:
        """Ask the service for ``(mfn, type)`` of each gfn (refreshing the mirror).

        Raises:
            HypercallError: EFAULT, as the domain's MMU would fault.
        """
        body = self.channel.call_ok(
            p.MSG_TRANSLATE, p.U32.pack(int(writable)) + p.pack_i64s(list(gfns)), "access"
        )
        size = p.TRANSLATE_ENTRY.size
        out = [p.TRANSLATE_ENTRY.unpack_from(body, i * size) for i in range(len(gfns))]
        self._apply_delta(body, len(gfns) * size)
        return [(int(m), int(t)) for m, t in out]

    def map_gfns(self, gfns: Sequence[int], writable: bool) -> Any:
        """A FrameView of the domain's frames, mapped in this process.

        The frames' files are placed in this process's range of machine
        memory (asked for once, :meth:`reach`): contiguous frames are a view
        of that range; a read-only view of foreign frames, or frames that are
        not contiguous, is a new ``mmap`` of exactly those frames
        (``PROT_READ`` unless ``writable``).

        Raises:
            HypercallError: EFAULT for a gfn with nothing mapped, or a
                writable view of a read-only grant mapping; EACCES for a
                foreign frame whose file holds pages not granted to us.
        """
        n = len(gfns)
        if n == 0:
            raise ValueError("no frames to view")
        mem = self.memory
        if writable:
            # the common case at C speed: every gfn in the mirror, none a
            # read-only grant mapping (an int: the first that is not)
            got = _cext.translate(self.p2m, list(gfns), P2M_GRANT_MAP_RO)
            if not isinstance(got, int):
                mem.ensure(got, gfns, True, self.reach)
                return mem.view(got, False)
        ents: list[Any] = list(map(self.p2m.get, gfns))
        types = set(map(_second, ents)) if None not in ents else {-1}
        if -1 in types or (writable and P2M_GRANT_MAP_RO in types):
            ents = self.translate(gfns, writable)  # refreshes the mirror; EFAULT as the MMU
            types = set(map(_second, ents))
        mfns: list[int] = list(map(_first, ents))
        mem.ensure(mfns, gfns, writable, self.reach)
        if not writable and not types.isdisjoint(_FOREIGN):
            # a read-only grant: a mapping of its own, PROT_READ (a store
            # faults even through ctypes)
            return mem.fresh_view(mfns, True)
        return mem.view(mfns, not writable)

    def reach(self, gfns: Sequence[int], writable: bool) -> int:
        """``MSG_REACH``: ask for the files backing ``gfns`` (they come on the memory socket).

        Returns:
            How many files the service sent.

        Raises:
            HypercallError: EACCES, EFAULT (see ``Backing.reach``).
        """
        sent = 0
        for i in range(0, len(gfns), _GFNS_PER_MSG):
            chunk = list(gfns[i : i + _GFNS_PER_MSG])
            body = self.channel.call_ok(
                p.MSG_REACH, p.U32.pack(int(writable)) + p.pack_i64s(chunk), "map"
            )
            sent += p.U32.unpack_from(body)[0]
        return sent

    def prepare_grant(self, gfns: Sequence[int], grantee: int) -> None:
        """Before granting RAM pages: each gets a file of its own (``MSG_GRANT_PREPARE``),
        so that the grantee can map it without reaching its neighbours.

        Raises:
            HypercallError: EINVAL (not our RAM), ENOMEM.
        """
        self.channel.call_ok(
            p.MSG_GRANT_PREPARE, p.U32.pack(grantee & 0xFFFFFFFF) + p.pack_i64s(list(gfns)),
            "grant_access",
        )
        self.memory.drain()

    def end_grant(self, gfns: Sequence[int]) -> None:
        """After ending access to RAM pages we keep: those a peer could still reach
        move to fresh files (``MSG_GRANT_END``).

        Raises:
            HypercallError: EINVAL (not our RAM).
        """
        self.channel.call_ok(p.MSG_GRANT_END, p.pack_i64s(list(gfns)), "end_access")
        self.memory.drain()

    def close(self) -> None:
        """Let go of machine memory (views still alive keep their mappings)."""
        if self._closed:
            return
        self._closed = True
        self.memory.close()
