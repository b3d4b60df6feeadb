"""``xen/include/public/io/xs_wire.h``: the xenstore wire protocol, sans-IO.

Every message is a ``struct xsd_sockmsg`` (four native ``uint32_t``: ``type``,
``req_id``, ``tx_id``, ``len``) and ``len`` bytes of payload, at most
:data:`XENSTORE_PAYLOAD_MAX`.  Requests name their strings NUL-separated
(``XS_WRITE``: the path, NUL, then the value, not NUL-terminated); a reply
echoes the request's header with ``type`` and ``len`` changed (xenstored's
``send_reply``); a failure is an ``XS_ERROR`` reply whose payload is the
errno's name from :data:`XSD_ERRORS`, NUL-terminated (``send_error``).

The numbers and layouts here are checked against
``/usr/include/xen/io/xs_wire.h`` by compiling C (tests/test_xenstore_wire.py).
"""

from __future__ import annotations

import errno
import struct
from typing import NamedTuple

from ..errors import XenStoreError

# enum xsd_sockmsg_type
XS_CONTROL = 0
XS_DIRECTORY = 1
XS_READ = 2
XS_GET_PERMS = 3
XS_WATCH = 4
XS_UNWATCH = 5
XS_TRANSACTION_START = 6
XS_TRANSACTION_END = 7
XS_INTRODUCE = 8
XS_RELEASE = 9
XS_GET_DOMAIN_PATH = 10
XS_WRITE = 11
XS_MKDIR = 12
XS_RM = 13
XS_SET_PERMS = 14
XS_WATCH_EVENT = 15
XS_ERROR = 16
XS_IS_DOMAIN_INTRODUCED = 17
XS_RESUME = 18
XS_SET_TARGET = 19
# XS_RESTRICT (20) has been removed
XS_RESET_WATCHES = 21
XS_DIRECTORY_PART = 22
XS_TYPE_COUNT = 23
XS_INVALID = 0xFFFF

#: ``xs_debug_msg``-style names (xenstored's ``wire_funcs[].str``).
XS_NAMES: dict[int, str] = {
    v: k[3:] for k, v in dict(globals()).items()
    if k.startswith("XS_") and isinstance(v, int) and k not in ("XS_TYPE_COUNT", "XS_INVALID")
}

# enum xs_watch_type: the fields of an XS_WATCH_EVENT payload
XS_WATCH_PATH = 0
XS_WATCH_TOKEN = 1

#: XS_WRITE_NONE / XS_WRITE_CREATE / XS_WRITE_CREATE_EXCL (old write flags).
XS_WRITE_NONE = "NONE"
XS_WRITE_CREATE = "CREATE"
XS_WRITE_CREATE_EXCL = "CREATE|EXCL"

#: ``xsd_errors[]``, in the header's order (new errors go at the end).
XSD_ERRORS: tuple[tuple[int, str], ...] = tuple(
    (getattr(errno, name), name)
    for name in (
        "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
        "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
    )
)
_ERR_NAME = dict(XSD_ERRORS)
_ERR_NUM = {name: num for num, name in XSD_ERRORS}

#: struct xsd_sockmsg
HEADER = struct.Struct("=IIII")
HEADER_SIZE = HEADER.size

#: XENSTORE_PAYLOAD_MAX: "Violating this is very bad."
XENSTORE_PAYLOAD_MAX = 4096
#: XENSTORE_ABS_PATH_MAX / XENSTORE_REL_PATH_MAX: "Violating these just gets you an error back".
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

# struct xenstore_domain_interface (the ring page)
XENSTORE_RING_SIZE = 1024
RING_REQ = 0
RING_RSP = XENSTORE_RING_SIZE
RING_REQ_CONS = 2 * XENSTORE_RING_SIZE
RING_REQ_PROD = RING_REQ_CONS + 4
RING_RSP_CONS = RING_REQ_CONS + 8
RING_RSP_PROD = RING_REQ_CONS + 12
RING_SERVER_FEATURES = RING_REQ_CONS + 16
RING_CONNECTION = RING_REQ_CONS + 20
RING_ERROR = RING_REQ_CONS + 24
RING_INTERFACE_SIZE = RING_REQ_CONS + 28
XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1
XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMM = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3


def mask_xenstore_idx(idx: int) -> int:
    """``MASK_XENSTORE_IDX``: a free-running ring index -> its offset in the ring."""
    return idx & (XENSTORE_RING_SIZE - 1)


class Message(NamedTuple):
    """One ``xsd_sockmsg`` and its payload."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def pack(self) -> bytes:
        """The message's bytes (header then payload).

        Raises:
            XenStoreError: E2BIG if the payload is over XENSTORE_PAYLOAD_MAX.
        """
        return pack(self.type, self.req_id, self.tx_id, self.payload)


def pack(mtype: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """``struct xsd_sockmsg`` + payload.

    Args:
        mtype: the XS_* type.
        req_id: the request id (echoed by the reply).
        tx_id: the transaction id, 0 for none.
        payload: at most XENSTORE_PAYLOAD_MAX bytes.

    Returns:
        The bytes to send.

    Raises:
        XenStoreError: E2BIG for a payload over XENSTORE_PAYLOAD_MAX
            (``send_reply``: ``if (len > XENSTORE_PAYLOAD_MAX)``).
    """
    if len(payload) > XENSTORE_PAYLOAD_MAX:
        raise XenStoreError(errno.E2BIG, f"payload of {len(payload)} bytes > 4096")
    return HEADER.pack(mtype, req_id & 0xFFFFFFFF, tx_id & 0xFFFFFFFF, len(payload)) + payload


def strings(*parts: str | bytes) -> bytes:
    """Each part NUL-terminated (``xs_write``'s value is not: add it after)."""
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)


def split_strings(payload: bytes) -> list[bytes]:
    """The NUL-terminated strings of a payload (``get_strings``: a tail with no NUL is dropped)."""
    return payload.split(b"\0")[:-1]


def error_name(err: int) -> str:
    """``send_error``: the string for an errno; one missing from xsd_errors is "EINVAL"."""
    return _ERR_NAME.get(err, "EINVAL")


def error_payload(err: int) -> bytes:
    """The XS_ERROR payload for ``err``: its name, NUL-terminated."""
    return error_name(err).encode() + b"\0"


def errno_of(payload: bytes) -> int:
    """An XS_ERROR payload -> the errno (``xs_talkv``'s ``get_error``: EINVAL when unknown)."""
    name = payload.split(b"\0", 1)[0].decode("ascii", "replace")
    return _ERR_NUM.get(name, errno.EINVAL)


class ProtocolViolation(XenStoreError):
    """The peer broke xs_wire in a way xenstored answers by dropping the connection.

    Attributes:
        error: the XENSTORE_ERROR_* code xenstored puts in the ring's ``error``.
    """

    def __init__(self, err: int, text: str, error: int = XENSTORE_ERROR_PROTO) -> None:
        super().__init__(err, text)
        self.error = error


class Decoder:
    """Incremental, bounded ``xsd_sockmsg`` decoder: feed bytes, take whole messages.

    A header whose ``len`` is over XENSTORE_PAYLOAD_MAX is a protocol
    violation (``handle_input``: "Client tried to feed us", then
    ``ignore_connection``): :meth:`feed` raises and nothing is allocated for
    it.  Whatever is buffered is never more than one header and one payload
    plus the bytes of the chunk being fed.
    """

    __slots__ = ("_buf", "broken")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.broken = False

    @property
    def buffered(self) -> int:
        """Bytes held that do not make a whole message yet."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add bytes; return the whole messages they complete, in order.

        Args:
            data: bytes from the peer, any split.

        Returns:
            The complete messages.

        Raises:
            ProtocolViolation: EPROTO, a header's ``len`` over
                XENSTORE_PAYLOAD_MAX (the decoder stays broken after).
        """
        if self.broken:
            raise ProtocolViolation(errno.EPROTO, "the stream broke xs_wire earlier")
        self._buf += data
        out: list[Message] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER_SIZE:
            mtype, req_id, tx_id, length = HEADER.unpack_from(buf, pos)
            if length > XENSTORE_PAYLOAD_MAX:
                self.broken = True
                self._buf = bytearray()
                raise ProtocolViolation(
                    errno.EPROTO, f"message of {length} bytes > {XENSTORE_PAYLOAD_MAX}"
                )
            end = pos + HEADER_SIZE + length
            if len(buf) < end:
                break
            out.append(Message(mtype, req_id, tx_id, bytes(buf[pos + HEADER_SIZE : end])))
            pos = end
        if pos:
            del buf[:pos]
        return out
