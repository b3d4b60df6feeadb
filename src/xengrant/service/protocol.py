"""The wire protocol between domain processes and ``xengrant hypervisor``.

Sans-IO: pure functions and a byte-fed decoder; nothing here touches a socket.

Every message is a fixed 12-byte header and a payload::

    u32 length   payload bytes that follow (at most MAX_PAYLOAD)
    u16 type     MSG_* below
    u16 flags    0 for a request, F_REPLY for its answer, F_ASYNC for an
                 unsolicited server message (an event, a watch firing);
                 F_POSTED on a request nobody waits for (see below)
    u32 seq      chosen by the client, echoed in the reply (0 for F_ASYNC)

All integers are little-endian.  A request with F_POSTED is answered as any
other, but its reply is not sent on its own: it is queued and leaves with the
next message for that connection (the next reply, or an event), so a posted
request never wakes its client.  Replies stay in request order.

A reply payload starts with an ``i32`` status: 0 or a negative errno (then
the rest is a UTF-8 explanation).  A request the server cannot parse, an
oversized one (its payload is skipped), a request of an unknown type, one
sent before the connection is bound to a domain or one that acts as another
domain gets such an error reply; the connection stays usable.  Hypercall
replies end with the caller's p2m changes (:func:`pack_p2m`) so a client
translates its own frames without asking.

Payloads (``q`` = i64, ``Q`` = u64, ``I`` = u32, ``i`` = i32, ``H`` = u16):

================  ===========================================  ==========================
type              request                                      reply body (after status)
================  ===========================================  ==========================
PING              anything (echoed)                            the same bytes
CREATE            I version, i domid (-1: the next free one;   I version, H domid,
                  0: dom0, with the token), I flags,           I flags, Q nr_frames,
                  i max_grant_frames, i max_maptrack_frames,   whole p2m, memfd by
                  q max_pages (-1: the service's defaults),    SCM_RIGHTS
                  [32 bytes: the dom0 token]
ATTACH            I version, H domid, 32 bytes: its secret     as CREATE
DOMCTL_CREATE     as CREATE, no token (dom0 only: a domain     H domid, 32 bytes: the
                  for another process to attach)               secret ATTACH needs
DOMCTL_DESTROY    H domid (dom0 only)                          --
CLOSE             -- (destroy my domain now; then hang up)      --
GNTTAB_OP         I cmd, q count, op structs                   i rc, I n, op structs,
                                                               delta, reasons
POPULATE          q gfn * n                                    q done * m, delta
DECREASE          q gfn * n                                    I released, delta
ADD_TO_PHYSMAP    I space, Q idx, q gpfn                       i rc, delta
TRANSLATE         I writable, q gfn * n                        (q mfn, I type) * n, delta
EVTCHN_*          see :mod:`xengrant.service.evtchn`           I port / status fields
XS_*              NUL-separated strings, as xenstored's wire   xenstored's reply body
XS_WIRE           one xsd_sockmsg and its payload (xs_wire.h)  xenstored's reply message
UNMAP_NOTIFY_SET  I kind, I key, I offset, I action, I port    --
UNMAP_NOTIFY_FIRE I kind, I key                                --
STATS             -- (dom0), or the dom0 token (unbound)       JSON (at most 1 MiB:
                                                               "truncated" says what
                                                               was left out)
DEBUG_KEY         1 byte key [, the dom0 token (unbound)]      UTF-8 text (at most
                                                               1 MiB, cut with a
                                                               "[truncated" line)
EVENT (async)     --                                           I port
WATCH_EVENT       --                                           path NUL token NUL
================  ===========================================  ==========================
"""

from __future__ import annotations

import errno
import struct
import sys
from array import array
from collections.abc import Sequence
from operator import itemgetter
from typing import NamedTuple

#: 2: column p2m deltas and F_POSTED.  3: the dom0 token, attach secrets.
PROTOCOL_VERSION = 3

#: ``struct {u32 length; u16 type; u16 flags; u32 seq;}``
HEADER = struct.Struct("<IHHI")
HEADER_SIZE = HEADER.size
#: Hard limit on a payload: bigger batches are split by the client (Xen
#: itself preempts long batches with continuations, so splitting is invisible).
MAX_PAYLOAD = 1 << 20
#: xenstored's XENSTORE_PAYLOAD_MAX: the largest xenstore request or reply.
XS_PAYLOAD_MAX = 4096

F_REPLY = 0x1
F_ASYNC = 0x2
#: A request whose reply the client does not wait for: the service sends the
#: reply with the next message for the connection instead of on its own.
F_POSTED = 0x4

# ----------------------------------------------------------------- types
MSG_PING = 1
MSG_CREATE = 2
MSG_ATTACH = 3
MSG_DOMCTL_CREATE = 4
MSG_DOMCTL_DESTROY = 5
MSG_CLOSE = 6
MSG_GNTTAB_OP = 10
MSG_POPULATE = 11
MSG_DECREASE = 12
MSG_ADD_TO_PHYSMAP = 13
MSG_TRANSLATE = 14
#: Set up the connection's request ring (service/ring.py); the reply brings
#: its page and two eventfds (SCM_RIGHTS).
MSG_RING_SETUP = 15
#: Files backing gfns of the caller's p2m (service/backing.py): u32 writable,
#: then i64 gfns; the reply's u32 says how many files came on the memory socket.
MSG_REACH = 16
#: Before granting RAM pages: u32 grantee, then i64 gfns; each gets a file of
#: its own (a PLACE record each); the reply's u32 says how many moved.
MSG_GRANT_PREPARE = 17
#: After ending access to pages the granter keeps: i64 gfns; those a peer
#: held move to fresh files; the reply's u32 says how many moved.
MSG_GRANT_END = 18
MSG_EVTCHN_ALLOC_UNBOUND = 20
MSG_EVTCHN_BIND_INTERDOMAIN = 21
MSG_EVTCHN_SEND = 22
MSG_EVTCHN_CLOSE = 23
MSG_EVTCHN_UNMASK = 24
MSG_EVTCHN_STATUS = 25
MSG_XS_READ = 30
MSG_XS_WRITE = 31
MSG_XS_MKDIR = 32
MSG_XS_RM = 33
MSG_XS_DIRECTORY = 34
MSG_XS_GET_PERMS = 35
MSG_XS_SET_PERMS = 36
MSG_XS_WATCH = 37
MSG_XS_UNWATCH = 38
MSG_XS_GET_DOMAIN_PATH = 39
#: One whole xs_wire message (``struct xsd_sockmsg`` and its payload, as
#: xen/io/xs_wire.h): the reply body is xenstored's reply message, byte for
#: byte (xengrant.xenstore.session).  MSG_XS_READ ... carry only the payload.
MSG_XS_WIRE = 42
MSG_UNMAP_NOTIFY_SET = 40
MSG_UNMAP_NOTIFY_FIRE = 41
MSG_STATS = 60
MSG_DEBUG_KEY = 61
MSG_EVENT = 100
MSG_WATCH_EVENT = 101

MSG_NAMES: dict[int, str] = {
    v: k[4:] for k, v in dict(globals()).items() if k.startswith("MSG_") and isinstance(v, int)
}

#: Requests that never get a reply (``write(2)`` of a port to /dev/xen/evtchn
#: answers nothing either).
ONE_WAY = frozenset({MSG_EVTCHN_UNMASK})

#: CREATE/ATTACH flags.
DOMFLAG_PV = 0x1

# ------------------------------------------------------------- payloads
CREATE_REQ = struct.Struct("<IiIiiq")
ATTACH_REQ = struct.Struct("<IH")
DOMAIN_REPLY = struct.Struct("<IHIQ")
DOMID = struct.Struct("<H")
#: Bytes of the dom0 token and of a domain's attach secret.
SECRET_SIZE = 32
GNTTAB_REQ = struct.Struct("<Iq")
ADD_TO_PHYSMAP_REQ = struct.Struct("<IQq")
U32 = struct.Struct("<I")
I32 = struct.Struct("<i")
TWO_U32 = struct.Struct("<II")
STATUS = I32
NOTIFY_SET_REQ = struct.Struct("<IIIII")
NOTIFY_FIRE_REQ = TWO_U32
EVTCHN_STATUS_REPLY = struct.Struct("<IHI")
#: One p2m change as :func:`pack_p2m` writes it when there is only one:
#: gfn, then mfn (-1: removed) and p2m type.
P2M_ONE = struct.Struct("<qqq")
TRANSLATE_ENTRY = struct.Struct("<qI")

#: UNMAP_NOTIFY kinds: a grant mapping (key: its maptrack handle), as gntdev;
#: a shared page (key: the grant ref), as gntalloc.
NOTIFY_GNTDEV = 1
NOTIFY_GNTALLOC = 2


class ProtocolError(Exception):
    """A message that cannot be accepted; ``errno`` goes back in the reply.

    Attributes:
        errno: the positive errno value the reply carries (negated).
    """

    def __init__(self, err: int, text: str) -> None:
        super().__init__(text)
        self.errno = err


class Frame(NamedTuple):
    """One decoded message.

    Attributes:
        type: ``MSG_*``.
        flags: ``F_*``.
        seq: the sequence number.
        payload: the payload, or None when it was over MAX_PAYLOAD (skipped).
        length: the payload length the header announced.
    """

    type: int
    flags: int
    seq: int
    payload: bytes | None
    length: int


def encode(mtype: int, flags: int, seq: int, payload: bytes = b"") -> bytes:
    """One message: header and payload.

    Raises:
        ProtocolError: EMSGSIZE if the payload is over MAX_PAYLOAD.
    """
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(errno.EMSGSIZE, f"payload of {len(payload)} bytes > {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), mtype, flags, seq) + payload


def encode_reply(mtype: int, seq: int, status: int, body: bytes = b"") -> bytes:
    """A reply: ``status`` (0 or -errno) then ``body``."""
    return encode(mtype, F_REPLY, seq, STATUS.pack(status) + body)


def encode_error(mtype: int, seq: int, err: int, text: str = "") -> bytes:
    """An error reply: ``-err`` and an explanation (truncated to 1 KiB)."""
    return encode_reply(mtype, seq, -abs(err), text.encode("utf-8", "replace")[:1024])


def split_status(payload: bytes) -> tuple[int, bytes]:
    """``(status, body)`` of a reply payload.

    Raises:
        ProtocolError: EBADMSG if shorter than the status.
    """
    if len(payload) < 4:
        raise ProtocolError(errno.EBADMSG, "reply without a status")
    return STATUS.unpack_from(payload)[0], payload[4:]


class Decoder:
    """Splits a byte stream into :class:`Frame` objects, enforcing MAX_PAYLOAD.

    An oversized message yields a Frame with ``payload=None`` as soon as its
    header arrives; its payload bytes are then skipped as they come, so the
    stream stays in step and a huge length cannot make anyone buffer it.

    Args:
        max_payload: the limit (default MAX_PAYLOAD).
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._skip = 0

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a message."""
        return len(self._buf)

    @property
    def idle(self) -> bool:
        """Nothing held and nothing to skip: the next byte starts a message."""
        return not self._buf and not self._skip

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add received bytes; return every message now complete."""
        if not self._buf and not self._skip:
            return self._feed_fresh(data)
        return self._feed_slow(data)

    def _feed_slow(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """:meth:`feed` through the held buffer (a message split across reads)."""
        buf = self._buf
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = memoryview(data)[n:]
        buf += data
        out: list[Frame] = []
        pos = 0
        end = len(buf)
        unpack = HEADER.unpack_from
        while end - pos >= HEADER_SIZE:
            length, mtype, flags, seq = unpack(buf, pos)
            if length > self.max_payload:
                out.append(Frame(mtype, flags, seq, None, length))
                pos += HEADER_SIZE
                have = min(length, end - pos)
                pos += have
                self._skip = length - have
                continue
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            out.append(Frame(mtype, flags, seq, bytes(buf[start : start + length]), length))
            pos = start + length
        if pos:
            del buf[:pos]
        return out

    def _feed_fresh(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """:meth:`feed` with nothing held: whole messages straight from ``data``."""
        mv = memoryview(data)
        end = len(mv)
        pos = 0
        out: list[Frame] = []
        unpack = HEADER.unpack_from
        limit = self.max_payload
        while end - pos >= HEADER_SIZE:
            length, mtype, flags, seq = unpack(mv, pos)
            start = pos + HEADER_SIZE
            if length > limit or end - start < length:
                break
            out.append(Frame(mtype, flags, seq, bytes(mv[start : start + length]), length))
            pos = start + length
        if pos < end:
            out += self._feed_slow(mv[pos:])  # it keeps the rest
        return out


# ---------------------------------------------------------- field helpers
def unpack_exact(st: struct.Struct, payload: bytes, what: str) -> tuple[int, ...]:
    """Unpack a fixed-size payload.

    Raises:
        ProtocolError: EBADMSG if the payload is not exactly ``st.size`` bytes.
    """
    if len(payload) != st.size:
        raise ProtocolError(errno.EBADMSG, f"{what}: {len(payload)} bytes, want {st.size}")
    return st.unpack(payload)


def pack_i64s(values: Sequence[int]) -> bytes:
    """``values`` as packed i64."""
    return struct.pack(f"<{len(values)}q", *values)


def unpack_i64s(payload: bytes | memoryview, what: str) -> list[int]:
    """Packed i64 values.

    Raises:
        ProtocolError: EBADMSG if the length is not a multiple of 8.
    """
    if len(payload) % 8:
        raise ProtocolError(errno.EBADMSG, f"{what}: {len(payload)} bytes is not a list of i64")
    return list(struct.unpack(f"<{len(payload) // 8}q", payload))


#: Set in a p2m delta's count: the entries are the whole p2m (replace, not update).
P2M_FULL = 0x80000000
#: An absent p2m entry as a delta carries it.
P2M_GONE = (-1, 0)
_LITTLE = sys.byteorder == "little"
_first = itemgetter(0)
_second = itemgetter(1)


def pack_p2m(
    gfns: Sequence[int], entries: Sequence[tuple[int, int]], full: bool = False
) -> bytes:
    """p2m entries as ``u32 n``, then three ``i64`` columns: ``gfn * n``,
    ``mfn * n`` (-1: nothing there now), ``type * n``.

    Columns rather than records, so both ends convert them with C loops
    (``array``, ``map``, memoryview casts) instead of one Python step per entry.

    Args:
        gfns: the gfns.
        entries: ``(mfn, type)`` of each gfn, in the same order;
            :data:`P2M_GONE` where the gfn holds nothing now.
        full: they are the whole p2m (the count carries :data:`P2M_FULL`).

    Raises:
        ValueError: not one entry per gfn.
    """
    n = len(gfns)
    if len(entries) != n:
        raise ValueError(f"pack_p2m: {len(entries)} entries for {n} gfns")
    head = U32.pack(n | (P2M_FULL if full else 0))
    if n == 1:
        mfn, p2mt = entries[0]
        return head + P2M_ONE.pack(gfns[0], mfn, p2mt)
    if entries.count(P2M_GONE) == n:  # an unmap batch: every gfn emptied
        body = array("q", gfns)
        body += array("q", (-1,)) * n
        body += array("q", (0,)) * n
    else:
        body = array("q", [*gfns, *map(_first, entries), *map(_second, entries)])
    if not _LITTLE:  # pragma: no cover - the wire is little-endian
        body.byteswap()
    return head + body.tobytes()


def pack_strings(*parts: str | bytes, terminate_last: bool = True) -> bytes:
    """NUL-separated strings, as xenstored's wire format.

    Args:
        parts: the strings (str is UTF-8 encoded).
        terminate_last: end with a NUL too (XS_WRITE's value is not terminated).
    """
    enc = [p.encode() if isinstance(p, str) else p for p in parts]
    out = b"\0".join(enc)
    return out + b"\0" if terminate_last else out


def split_strings(payload: bytes) -> list[bytes]:
    """The NUL-terminated strings of a payload (bytes after the last NUL dropped)."""
    parts = payload.split(b"\0")
    return parts[:-1]


def pack_reasons(reasons: Sequence[str], limit: int = 16) -> bytes:
    """Debug reasons (Xen's gdprintk lines) as ``u16 n`` + ``u16 len`` + UTF-8 each."""
    items = [r.encode("utf-8", "replace")[:512] for r in reasons[:limit]]
    out = bytearray(struct.pack("<H", len(items)))
    for b in items:
        out += struct.pack("<H", len(b)) + b
    return bytes(out)


def unpack_reasons(body: bytes | memoryview, pos: int) -> list[str]:
    """Reasons written by :func:`pack_reasons` (an empty list if absent or damaged)."""
    out: list[str] = []
    if len(body) - pos < 2:
        return out
    (n,) = struct.unpack_from("<H", body, pos)
    pos += 2
    for _ in range(n):
        if len(body) - pos < 2:
            break
        (ln,) = struct.unpack_from("<H", body, pos)
        pos += 2
        out.append(bytes(body[pos : pos + ln]).decode("utf-8", "replace"))
        pos += ln
    return out


def check_request(mtype: int, flags: int, payload: object, length: int) -> None:
    """Reject what a client must never send (``payload`` None: it was oversized).

    Raises:
        ProtocolError: EMSGSIZE (oversized), EPROTO (reply/async flags or
            unknown flag bits from a client), ENOSYS (unknown type).
    """
    if payload is None:
        raise ProtocolError(errno.EMSGSIZE, f"payload of {length} bytes > {MAX_PAYLOAD}: skipped")
    if flags & ~F_POSTED:
        raise ProtocolError(errno.EPROTO, f"flags {flags:#x} are not a request's")
    if mtype not in MSG_NAMES or mtype in (MSG_EVENT, MSG_WATCH_EVENT):
        raise ProtocolError(errno.ENOSYS, f"unknown request type {mtype}")


def check_request_header(frame: Frame) -> None:
    """:func:`check_request` of a decoded :class:`Frame`.

    Raises:
        ProtocolError: EMSGSIZE, EPROTO, ENOSYS.
    """
    check_request(frame.type, frame.flags, frame.payload, frame.length)
