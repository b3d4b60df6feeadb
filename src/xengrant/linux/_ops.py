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
from typing import Any, TypeVar, cast

from ..abi import gntalloc as ga
from ..abi import gntdev as gd

_ALLOC_IDS = ga.ioctl_gntalloc_alloc_gref.gref_ids.offset
_MAP_REFS = gd.ioctl_gntdev_map_grant_ref.refs.offset
_CACHE_MAX = 4096

_S = TypeVar("_S", bound=ctypes.Structure)
_sized_types: dict[tuple[type[ctypes.Structure], int], type[ctypes.Structure]] = {}


def _sized(base: type[_S], elem: Any, count: int) -> type[_S]:
    """``base`` with its trailing ``[1]`` array of ``elem`` grown to ``count`` entries.

    Each (base, count) subclass is made once (up to ``_CACHE_MAX`` entries).
    """
    cls = _sized_types.get((base, count))
    if cls is None:
        extra = max(count - 1, 0)
        cls = type(f"{base.__name__}_{count}", (base,), {"_fields_": [("_more", elem * extra)]})
        if count <= _CACHE_MAX:
            _sized_types[(base, count)] = cls
    return cast("type[_S]", cls)


def alloc_request(domid: int, flags: int, count: int) -> ga.ioctl_gntalloc_alloc_gref:
    """An IOCTL_GNTALLOC_ALLOC_GREF argument with room for ``count`` ``gref_ids``."""
    return _sized(ga.ioctl_gntalloc_alloc_gref, ctypes.c_uint32, count)(
        domid=domid, flags=flags, count=count
    )


def alloc_ids(op: ga.ioctl_gntalloc_alloc_gref, count: int) -> list[int]:
    """The ``count`` grant references the driver wrote into ``op.gref_ids``."""
    return list(struct.unpack_from(f"={count}I", op, _ALLOC_IDS))


def map_request(grants: Sequence[tuple[int, int]]) -> gd.ioctl_gntdev_map_grant_ref:
    """An IOCTL_GNTDEV_MAP_GRANT_REF argument for ``(domid, ref)`` pairs."""
    n = len(grants)
    op = _sized(gd.ioctl_gntdev_map_grant_ref, gd.ioctl_gntdev_grant_ref, n)(count=n)
    flat = [x for pair in grants for x in pair]
    struct.pack_into(f"={2 * n}I", op, _MAP_REFS, *flat)
    return op
