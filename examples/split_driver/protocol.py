"""The "vupper" protocol: what the frontend and backend agree on.

A real PV protocol is a header in xen/include/public/io/ (blkif.h, netif.h):
the request and response layouts, the ring they share (``DEFINE_RING_TYPES``)
and the xenstore keys of the handshake.  This one is as small as a protocol
can be: the frontend sends up to 48 bytes of text, the backend answers them
upper-cased.

xenstore keys (as blkif.h names them):

- backend ``max-ring-page-order``: the largest ring the backend maps (2**n pages);
- frontend ``ring-ref`` (one page) or ``ring-page-order`` and ``ring-ref0`` ...
  ``ring-ref<2**n - 1>``; frontend ``event-channel``.
"""

from __future__ import annotations

import ctypes

#: the device class in xenstore: device/vupper/<devid>, backend/vupper/<fe>/<devid>
KIND = "vupper"
TEXT = 48
OP_UPPER = 1
#: response status: done, or the request was not understood
STATUS_OK, STATUS_ERROR = 0, -1


class Request(ctypes.Structure):
    """``struct vupper_request``."""

    _fields_ = [("id", ctypes.c_uint64), ("op", ctypes.c_uint8), ("_pad", ctypes.c_uint8),
                ("len", ctypes.c_uint16), ("text", ctypes.c_char * TEXT)]


class Response(ctypes.Structure):
    """``struct vupper_response``."""

    _fields_ = [("id", ctypes.c_uint64), ("status", ctypes.c_int16),
                ("len", ctypes.c_uint16), ("text", ctypes.c_char * TEXT)]
