"""Unmap notifications as gntdev and gntalloc offer them
(``IOCTL_GNTDEV_SET_UNMAP_NOTIFY``, ``IOCTL_GNTALLOC_SET_UNMAP_NOTIFY``): clear
a byte of the page and/or send an event when the mapping or share goes,
also when the process dies.
"""

from __future__ import annotations

import contextlib
import errno
import struct
from dataclasses import dataclass

from ...abi import grant_table as gt
from ...abi.gntalloc import UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT
from ...emu.domain import P2M_RAM_RW, DomainState
from ...emu.machine import PAGE_SIZE
from ...errors import HypercallError
from .. import protocol as p
from ..evtchn import ECS_INTERDOMAIN, ECS_UNBOUND, EvtchnError
from .base import ServerBase
from .connection import Connection

_UNMAP_HANDLE = struct.Struct("<I")
_UNMAP_HANDLE_OFF = 16
_UNMAP_STATUS = struct.Struct("<h")
_UNMAP_STATUS_OFF = 20
_UNMAP_SIZE = 24


@dataclass
class Notify:
    """An unmap notification (gntdev/gntalloc ``SET_UNMAP_NOTIFY``)."""

    kind: int
    key: int
    offset: int
    action: int
    port: int
    mfn: int = -1


class UnmapNotify(ServerBase):
    """UNMAP_NOTIFY_SET/FIRE and firing them on unmap and teardown."""

    def _notify_set(self, conn: Connection, payload: bytes) -> bytes:
        """``IOCTL_GNTDEV/GNTALLOC_SET_UNMAP_NOTIFY`` (drivers/xen/gntdev.c, gntalloc.c)."""
        domid = self._dom(conn)
        kind, key, offset, action, port = p.unpack_exact(
            p.NOTIFY_SET_REQ, payload, "UNMAP_NOTIFY_SET"
        )
        if action & ~(UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT):
            raise HypercallError("set_unmap_notify", errno.EINVAL, f"action {action:#x}")
        if offset >= PAGE_SIZE:
            raise HypercallError("set_unmap_notify", errno.EINVAL, f"offset {offset}")
        if action & UNMAP_NOTIFY_SEND_EVENT:
            ports = self.ev.domains.get(domid)
            c = ports.ports.get(port) if ports is not None else None
            if c is None or c.state not in (ECS_UNBOUND, ECS_INTERDOMAIN):
                raise HypercallError("set_unmap_notify", errno.EINVAL, f"port {port} unbound")
        d = self.hv.domains[domid]
        note = Notify(kind, key, offset, action, port)
        if kind == p.NOTIFY_GNTDEV:
            m = d.maptrack.lookup(key)
            if m is None or not m.flags:
                raise HypercallError("set_unmap_notify", errno.ENOENT, f"no mapping {key}")
            if action & UNMAP_NOTIFY_CLEAR_BYTE and m.flags & gt.GNTMAP_readonly:
                raise HypercallError("set_unmap_notify", errno.EINVAL, "read-only mapping")
        elif kind == p.NOTIFY_GNTALLOC:
            note.mfn = self._granted_mfn(d, key)
        else:
            raise HypercallError("set_unmap_notify", errno.EINVAL, f"kind {kind}")
        self.notifies.setdefault(domid, {})[(kind, key)] = note
        return self._ok()

    def _granted_mfn(self, d: DomainState, ref: int) -> int:
        g = d.gt
        if not 0 <= ref < g.nr_grant_entries:
            raise HypercallError("set_unmap_notify", errno.ENOENT, f"ref {ref}")
        mem = self.hv.mem
        off = g.entry_offset(ref)
        flags = int.from_bytes(mem[off : off + 2], "little")
        if flags & gt.GTF_type_mask != gt.GTF_permit_access:
            raise HypercallError("set_unmap_notify", errno.ENOENT, f"ref {ref} not granted")
        if g.version == 1:
            frame = int.from_bytes(mem[off + 4 : off + 8], "little")
        else:
            frame = int.from_bytes(mem[off + 8 : off + 16], "little")
        ent = d.p2m.get(frame)
        if ent is None or ent[1] != P2M_RAM_RW:
            raise HypercallError("set_unmap_notify", errno.ENOENT, f"ref {ref}: no page")
        return ent[0]

    def _notify_fire(self, conn: Connection, payload: bytes) -> bytes:
        """gntalloc's ``__del_gref``: the sharer lets a page go."""
        domid = self._dom(conn)
        kind, key = p.unpack_exact(p.NOTIFY_FIRE_REQ, payload, "UNMAP_NOTIFY_FIRE")
        notes = self.notifies.get(domid, {})
        note = notes.get((kind, key)) if kind == p.NOTIFY_GNTALLOC else None
        if note is None:
            raise HypercallError("unmap_notify", errno.ENOENT, f"no notify for {kind}/{key}")
        del notes[(kind, key)]
        if not notes:
            self.notifies.pop(domid, None)
        self._clear_byte(domid, note)
        self._notify_send(domid, note)
        return self._ok()

    def _clear_byte(self, domid: int, note: Notify) -> None:
        if not note.action & UNMAP_NOTIFY_CLEAR_BYTE:
            return
        mfn = note.mfn
        if note.kind == p.NOTIFY_GNTDEV:
            d = self.hv.domains.get(domid)
            m = d.maptrack.lookup(note.key) if d is not None else None
            if m is None or not m.flags or m.flags & gt.GNTMAP_readonly:
                return
            mfn = m.mfn
        elif self.hv.machine.owner[mfn] != domid:
            return
        self.hv.mem[mfn * PAGE_SIZE + note.offset] = 0

    def _notify_send(self, domid: int, note: Notify) -> None:
        if note.action & UNMAP_NOTIFY_SEND_EVENT:
            with contextlib.suppress(EvtchnError):
                self._deliveries += self.ev.send(domid, note.port)

    def _notify_before_unmap(
        self, domid: int, notes: dict[tuple[int, int], Notify], uop: memoryview, count: int
    ) -> list[tuple[int, Notify]]:
        """gntdev's ``unmap_grant_pages``: clear the byte while still mapped."""
        fired = []
        n = min(max(count, 0), len(uop) // _UNMAP_SIZE)
        for i in range(n):
            (handle,) = _UNMAP_HANDLE.unpack_from(uop, i * _UNMAP_SIZE + _UNMAP_HANDLE_OFF)
            note = notes.get((p.NOTIFY_GNTDEV, handle))
            if note is not None:
                self._clear_byte(domid, note)
                fired.append((i, note))
        return fired

    def _notify_after_unmap(
        self,
        domid: int,
        notes: dict[tuple[int, int], Notify],
        uop: memoryview,
        fired: list[tuple[int, Notify]],
    ) -> None:
        """... then send the event once the page is unmapped."""
        for i, note in fired:
            (st,) = _UNMAP_STATUS.unpack_from(uop, i * _UNMAP_SIZE + _UNMAP_STATUS_OFF)
            if st != gt.GNTST_okay:
                continue
            notes.pop((note.kind, note.key), None)
            self._notify_send(domid, note)
        if not notes:
            self.notifies.pop(domid, None)

    def _fire_all_notifies(self, d: DomainState) -> list[int]:
        """A dying domain's files close: clear every byte now, return the ports to notify."""
        notes = self.notifies.pop(d.domid, {})
        ports = []
        for note in notes.values():
            self._clear_byte(d.domid, note)
            if note.action & UNMAP_NOTIFY_SEND_EVENT:
                ports.append(note.port)
        return ports
