"""Fast builders for the variable-size ioctl arguments (the hot path).

``xengrant.abi`` builds ``ioctl_gntalloc_alloc_gref`` and
``ioctl_gntdev_map_grant_ref`` with room for ``count`` entries by resizing a
ctypes instance (``_with_tail``), a few microseconds each; on the
share/map/unmap/unshare path that is a large part of the Python overhead.
Here each count gets a cached subclass of the abi structure whose extra
member extends the trailing ``[1]`` array in place (the C layout of ``sizeof
+ (count - 1) * sizeof(entry)``), filled and read with ``struct``.  An
instance is still an instance of the abi structure.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence

from ..abi import gntalloc as ga
from ..abi import gntdev as gd

_ALLOC_IDS = ga.ioctl_gntalloc_alloc_gref.gref_ids.offset
_MAP_REFS = gd.ioctl_gntdev_map_grant_ref.refs.offset
_CACHE_MAX = 4096

_alloc_types: dict[int, type[ga.ioctl_gntalloc_alloc_gref]] = {}
_map_types: dict[int, type[gd.ioctl_gntdev_map_grant_ref]] = {}


def _alloc_type(count: int) -> type[ga.ioctl_gntalloc_alloc_gref]:
    cls = _alloc_types.get(count)
    if cls is None:
        extra = max(count - 1, 0)
        cls = type(
            f"ioctl_gntalloc_alloc_gref_{count}",
            (ga.ioctl_gntalloc_alloc_gref,),
            {"_fields_": [("_more_gref_ids", ctypes.c_uint32 * extra)]},
        )
        if count <= _CACHE_MAX:
            _alloc_types[count] = cls
    return cls


def _map_type(count: int) -> type[gd.ioctl_gntdev_map_grant_ref]:
    cls = _map_types.get(count)
    if cls is None:
        extra = max(count - 1, 0)
        cls = type(
            f"ioctl_gntdev_map_grant_ref_{count}",
            (gd.ioctl_gntdev_map_grant_ref,),
            {"_fields_": [("_more_refs", gd.ioctl_gntdev_grant_ref * extra)]},
        )
        if count <= _CACHE_MAX:
            _map_types[count] = cls
    return cls


def alloc_request(domid: int, flags: int, count: int) -> ga.ioctl_gntalloc_alloc_gref:
    """An IOCTL_GNTALLOC_ALLOC_GREF argument with room for ``count`` ``gref_ids``."""
    return _alloc_type(count)(domid=domid, flags=flags, count=count)


def alloc_ids(op: ga.ioctl_gntalloc_alloc_gref, count: int) -> list[int]:
    """The ``count`` grant references the driver wrote into ``op.gref_ids``."""
    return list(struct.unpack_from(f"={count}I", op, _ALLOC_IDS))


def map_request(grants: Sequence[tuple[int, int]]) -> gd.ioctl_gntdev_map_grant_ref:
    """An IOCTL_GNTDEV_MAP_GRANT_REF argument for ``(domid, ref)`` pairs."""
    n = len(grants)
    op = _map_type(n)(count=n)
    flat = [x for pair in grants for x in pair]
    struct.pack_into(f"={2 * n}I", op, _MAP_REFS, *flat)
    return op
