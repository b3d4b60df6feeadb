"""Batches of map and unmap ops: ``struct gnttab_map_grant_ref`` and
``struct gnttab_unmap_grant_ref`` (xen/include/public/grant_table.h), packed
for the hypercall and read back after it.

Both the in-process grant table (:mod:`xengrant.guest.gnttab`) and the
service client (:mod:`xengrant.service.client`) build their batches here.
From :data:`VECTOR_MIN` ops on, a batch is packed by one C loop
(``_cext.pack_map_ops``/``pack_unmap_ops``) and read back with strided
memoryview casts, one slice per field, instead of a struct call per op; both
are native-endian and the ABI is little-endian, so other hosts always take
the per-op struct path.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence

from .._cext import pack_map_ops as pack_map_ops_c
from .._cext import pack_unmap_ops as pack_unmap_ops_c

#: struct gnttab_map_grant_ref (32 bytes): host_addr, flags, ref, dom, status,
#: handle, dev_bus_addr.
MAP_OP = struct.Struct("<QIIHhIQ")
#: struct gnttab_unmap_grant_ref (24 bytes): host_addr, dev_bus_addr, handle, status.
UNMAP_OP = struct.Struct("<QQIh2x")
#: The C packers and the casts use native-endian words: only a little-endian host may.
VECTOR = sys.byteorder == "little"
#: Below this many ops the per-op struct calls are as cheap as the C loop and the casts.
VECTOR_MIN = 16
#: status (h) and handle (I) of one map op, at offset 18
_STATUS_HANDLE = struct.Struct("<hI")


def pack_map_ops(
    gfns: Sequence[int], flags: int, refs: Sequence[int], domids: Sequence[int]
) -> bytearray:
    """One map op per grant: ``refs[i]`` of ``domids[i]`` at ``gfns[i]``, with ``flags``.

    Returns:
        The ops, status, handle and dev_bus_addr zero.

    Raises:
        ValueError: a domid or ref that does not fit the op (the first such
            grant is named).
    """
    n = len(refs)
    size = MAP_OP.size
    if n == 1 and gfns:  # the common single grant: one pack
        try:
            return bytearray(MAP_OP.pack(gfns[0] << 12, flags, refs[0], domids[0], 0, 0, 0))
        except struct.error:
            pass  # the loop below names the grant
    if VECTOR and n >= VECTOR_MIN and len(gfns) == n == len(domids) and 0 <= flags < 1 << 32:
        packed: bytearray | None = pack_map_ops_c(gfns, flags, refs, domids)
        if packed is not None:
            return packed  # else the struct path below names the grant that does not fit
    buf = bytearray(size * n)
    pack = MAP_OP.pack_into
    for i, (domid, ref, gfn) in enumerate(zip(domids, refs, gfns)):
        try:
            pack(buf, i * size, gfn << 12, flags, ref, domid, 0, 0, 0)
        except struct.error as e:
            raise ValueError(
                f"map_grants: grant {(domid, ref)} does not fit gnttab_map_grant_ref "
                "(domid is 16 bits, ref 32 bits)"
            ) from e
    return buf


def map_results(buf: bytearray, n: int) -> tuple[list[int], list[int]]:
    """``(statuses, handles)`` of ``n`` map ops after the hypercall."""
    if n == 1:
        st, handle = _STATUS_HANDLE.unpack_from(buf, 18)
        return [st], [handle]
    if VECTOR and n >= VECTOR_MIN:
        mv = memoryview(buf)[: n * MAP_OP.size]
        return mv.cast("h")[9::16].tolist(), mv.cast("I")[5::8].tolist()
    statuses, handles = [], []
    for i in range(n):
        st, handle = MAP_OP.unpack_from(buf, i * MAP_OP.size)[4:6]
        statuses.append(st)
        handles.append(handle)
    return statuses, handles


def pack_unmap_ops(gfns: Sequence[int], handles: Sequence[int]) -> bytearray:
    """One unmap op per handle: ``handles[i]`` mapped at ``gfns[i]`` (dev_bus_addr 0)."""
    n = len(handles)
    size = UNMAP_OP.size
    if n == 1 and gfns:  # the common single mapping: one pack
        return bytearray(UNMAP_OP.pack(gfns[0] << 12, 0, handles[0], 0))
    if VECTOR and n >= VECTOR_MIN and len(gfns) == n:
        packed: bytearray | None = pack_unmap_ops_c(gfns, handles)
        if packed is not None:
            return packed  # else the struct path below raises what it always raised
    buf = bytearray(size * n)
    for i, (gfn, handle) in enumerate(zip(gfns, handles)):
        UNMAP_OP.pack_into(buf, i * size, gfn << 12, 0, handle, 0)
    return buf


def unmap_statuses(buf: bytearray, n: int) -> list[int]:
    """The ``status`` of ``n`` unmap ops after the hypercall."""
    if VECTOR and n >= VECTOR_MIN:
        return memoryview(buf)[: n * UNMAP_OP.size].cast("h")[10::12].tolist()
    return [UNMAP_OP.unpack_from(buf, i * UNMAP_OP.size)[3] for i in range(n)]
