"""Xen's and Linux's binary interfaces, under their C names.

One module per header:

- :mod:`xengrant.abi.grant_table` -- xen/include/public/grant_table.h
- :mod:`xengrant.abi.memory` -- xen/include/public/memory.h (the grant-table parts)
- :mod:`xengrant.abi.gntalloc` -- Linux include/uapi/xen/gntalloc.h
- :mod:`xengrant.abi.gntdev` -- Linux include/uapi/xen/gntdev.h
- :mod:`xengrant.abi.evtchn` -- Linux include/uapi/xen/evtchn.h
- :mod:`xengrant.abi.privcmd` -- Linux include/uapi/xen/privcmd.h

Everything is re-exported here, so ``from xengrant import abi; abi.GNTST_okay`` works.
"""

from __future__ import annotations

from .evtchn import *  # noqa: F403
from .gntalloc import *  # noqa: F403
from .gntdev import *  # noqa: F403
from .grant_table import *  # noqa: F403
from .grant_table import (
    GNTST_NAMES,
    GNTTABOP_STRUCTS,
    GNTTABOP_error_msgs,
    gnttabop_error,
)
from .memory import *  # noqa: F403
from .privcmd import *  # noqa: F403

__all__ = [name for name in dir() if not name.startswith("__") and name not in ("annotations",)]
__all__ += ["GNTST_NAMES", "GNTTABOP_STRUCTS", "GNTTABOP_error_msgs", "gnttabop_error"]
