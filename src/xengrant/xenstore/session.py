"""The server side of one xenstore connection, sans-IO: xs_wire in, xs_wire out.

:class:`Session` takes the bytes a connection sends, decodes
``xsd_sockmsg`` messages (:class:`~xengrant.xenstore.wire.Decoder`), runs
each against the store as the connection's domain, and returns the reply
messages, as xenstored's ``process_message`` does:

- a type past ``XS_TYPE_COUNT`` or with no handler (``XS_WATCH_EVENT``,
  ``XS_ERROR``, the removed 20) answers ``ENOSYS``;
- ``XS_FLAG_PRIV`` types (CONTROL, INTRODUCE, RELEASE, IS_DOMAIN_INTRODUCED,
  RESUME, SET_TARGET) answer ``EACCES`` to an unprivileged domain;
- a ``tx_id`` naming no open transaction answers ``ENOENT``, except for
  ``XS_FLAG_NOTID`` types (WATCH, UNWATCH), which ignore it;
- a reply echoes the request's ``req_id`` and ``tx_id``; an error is
  ``XS_ERROR`` with xenstored's string (``send_error``).

A header whose ``len`` is over XENSTORE_PAYLOAD_MAX breaks the connection
(``handle_input`` -> ``ignore_connection``): :meth:`Session.feed` raises
:class:`~xengrant.xenstore.wire.ProtocolViolation` and the caller closes it.
Everything else is answered and the connection stays usable.

Watch events are the store's: :meth:`Session.events` takes this
connection's from :attr:`XenStore.events` as ``XS_WATCH_EVENT`` messages
(``req_id`` and ``tx_id`` 0, as ``send_event`` leaves them).
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from ..errors import XenStoreError
from . import wire as w
from .store import XenStore, home
from .transaction import Transaction

#: DOMID_SELF (xen.h): ``XS_IS_DOMAIN_INTRODUCED`` answers "T" for it.
DOMID_SELF = 0x7FF0
_ATOI = re.compile(rb"[ \t\n\v\f\r]*([+-]?\d+)")
_OK = b"OK\0"


def atoi(text: bytes) -> int:
    """C's ``atoi`` as xenstored uses it (garbage reads as 0), cast to ``unsigned int``."""
    m = _ATOI.match(text)
    if m is None:
        return 0
    return int(m.group(1)) & 0xFFFFFFFF


@dataclass
class Domains:
    """Which domains xenstore knows (``XS_INTRODUCE`` / ``XS_RELEASE``), and hooks.

    Attributes:
        introduced: the domains introduced.
        on_introduce: called with a domid XS_INTRODUCE adds (after the store
            fired ``@introduceDomain``).
        on_release: called with a domid XS_RELEASE drops (the store's
            ``release_domain`` fires ``@releaseDomain``).
    """

    introduced: set[int] = field(default_factory=lambda: {0})
    on_introduce: Callable[[int], None] | None = None
    on_release: Callable[[int], None] | None = None


class Session:
    """One connection to xenstore.

    Args:
        store: the store.
        domid: the domain the connection acts as.
        conn: an id for the connection (its watches are keyed by it).
        domains: the introduced domains (shared by every session of a store).
        max_transactions: open transactions an unprivileged connection may
            have (default: the store's ``quota_transactions``, which
            ``XS_CONTROL quota set transactions`` changes).
    """

    def __init__(
        self,
        store: XenStore,
        domid: int,
        conn: Hashable | None = None,
        *,
        domains: Domains | None = None,
        max_transactions: int | None = None,
    ) -> None:
        self.store = store
        self.domid = domid
        self.conn: Hashable = conn if conn is not None else id(self)
        self.domains = domains if domains is not None else Domains()
        self._max_transactions = max_transactions
        self.decoder = w.Decoder()
        self.transactions: dict[int, Transaction] = {}
        self._next_tx = 0
        self.closed = False

    def __repr__(self) -> str:
        return f"<xenstore Session d{self.domid} {len(self.transactions)} transactions>"

    @property
    def max_transactions(self) -> int:
        """``quota_max_transaction`` for this connection."""
        if self._max_transactions is not None:
            return self._max_transactions
        return self.store.quota_transactions

    @property
    def privileged(self) -> bool:
        """``!domain_is_unprivileged(conn)``."""
        return self.store.is_privileged(self.domid)

    # ------------------------------------------------------------------ I/O
    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """Bytes from the connection -> the reply bytes to send back.

        Raises:
            ProtocolViolation: a header's ``len`` over XENSTORE_PAYLOAD_MAX
                (close the connection; xenstored ignores it from then on).
        """
        out = bytearray()
        for msg in self.decoder.feed(data):
            out += self.handle(msg)
        return bytes(out)

    def events(self) -> bytes:
        """This connection's pending watch events, as XS_WATCH_EVENT messages (taken)."""
        mine = [e for e in self.store.events if e.conn == self.conn]
        if not mine:
            return b""
        self.store.events = [e for e in self.store.events if e.conn != self.conn]
        return b"".join(event_message(e.path, e.token) for e in mine)

    def close(self) -> None:
        """The connection went: its watches and transactions go (``destroy_conn``)."""
        if self.closed:
            return
        self.closed = True
        self.transactions.clear()
        self.store.release_conn(self.conn)

    # ------------------------------------------------------------- dispatch
    def handle(self, msg: w.Message) -> bytes:
        """``process_message``: one request -> its reply message's bytes."""
        try:
            mtype, body = self._dispatch(msg)
        except XenStoreError as e:
            mtype, body = w.XS_ERROR, w.error_payload(e.errno or errno.EINVAL)
        if len(body) > w.XENSTORE_PAYLOAD_MAX:  # send_reply
            mtype, body = w.XS_ERROR, w.error_payload(errno.E2BIG)
        return w.HEADER.pack(mtype, msg.req_id, msg.tx_id, len(body)) + body

    def _dispatch(self, msg: w.Message) -> tuple[int, bytes]:
        handler = _HANDLERS.get(msg.type)
        if handler is None:
            raise XenStoreError(errno.ENOSYS, f"unknown operation {msg.type}")
        if msg.type in _PRIV and not self.privileged:
            raise XenStoreError(errno.EACCES, f"XS_{w.XS_NAMES[msg.type]} is dom0's")
        view: XenStore = self.store
        tx: Transaction | None = None
        if msg.type not in _NOTID and msg.tx_id:
            tx = self.transactions.get(msg.tx_id)
            if tx is None:  # transaction_lookup
                raise XenStoreError(errno.ENOENT, f"no transaction {msg.tx_id}")
            view = tx
        return msg.type, handler(self, view, tx, msg.payload)

    # ------------------------------------------------------------- argument
    @staticmethod
    def _onearg(payload: bytes) -> str:
        """``onearg``: exactly one NUL, at the end; else the request is EINVAL."""
        if not payload or payload.find(b"\0") != len(payload) - 1:
            raise XenStoreError(errno.EINVAL, "want one NUL-terminated string")
        return payload[:-1].decode("latin-1")

    @staticmethod
    def _strings(payload: bytes) -> list[str]:
        return [s.decode("latin-1") for s in w.split_strings(payload)]

    # ------------------------------------------------------------- handlers
    def _read(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        return view.read(self.domid, self._onearg(payload))  # do_read

    def _directory(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        names = view.directory(self.domid, self._onearg(payload))  # send_directory
        return b"".join(n.encode("latin-1") + b"\0" for n in names)

    def _directory_part(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        # send_directory_part: "<generation>\0" then whole names from offset,
        # ending with an empty string once the list is complete
        strs = w.split_strings(payload)
        if len(strs) != 2:
            raise XenStoreError(errno.EINVAL, "XS_DIRECTORY_PART: path and offset")
        path = strs[0].decode("latin-1")
        _name, node = view._get(self.domid, path, 1)
        names = b"".join(n.encode("latin-1") + b"\0" for n in node.children)
        off = atoi(strs[1])
        gen = str(node.gen).encode() + b"\0"
        if off >= len(names):
            return gen + b"\0"
        maxlen = w.XENSTORE_PAYLOAD_MAX - len(gen) - 1
        length = 0
        while True:
            nul = names.index(b"\0", off + length)
            child = nul - (off + length)
            if length + child >= maxlen:
                break
            length += child + 1
            if off + length == len(names):
                break
        data = gen + names[off : off + length]
        return data + b"\0" if off + length == len(names) else data

    def _get_perms(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        perms = view.get_perms(self.domid, self._onearg(payload))  # do_get_perms
        return b"".join(p.encode() + b"\0" for p in perms)

    def _write(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        nul = payload.find(b"\0")  # do_write: the path, then the value's bytes
        if nul < 0:
            raise XenStoreError(errno.EINVAL, "XS_WRITE: no path")
        view.write(self.domid, payload[:nul].decode("latin-1"), payload[nul + 1 :])
        return _OK

    def _mkdir(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        view.mkdir(self.domid, self._onearg(payload))  # do_mkdir
        return _OK

    def _rm(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        view.rm(self.domid, self._onearg(payload))  # do_rm
        return _OK

    def _set_perms(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        strs = self._strings(payload)  # do_set_perms: path and at least one permission
        if len(strs) < 2:
            raise XenStoreError(errno.EINVAL, "XS_SET_PERMS: path and permissions")
        view.set_perms(self.domid, strs[0], strs[1:])
        return _OK

    def _watch(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        strs = self._strings(payload)  # do_watch: exactly path and token
        if len(strs) != 2:
            raise XenStoreError(errno.EINVAL, "XS_WATCH: path and token")
        self.store.watch(self.conn, self.domid, strs[0], strs[1])
        return _OK

    def _unwatch(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        strs = self._strings(payload)  # do_unwatch
        if len(strs) != 2:
            raise XenStoreError(errno.EINVAL, "XS_UNWATCH: path and token")
        self.store.unwatch(self.conn, self.domid, strs[0], strs[1])
        return _OK

    def _transaction_start(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        if tx is not None:  # do_transaction_start: "We don't support nested transactions."
            raise XenStoreError(errno.EBUSY, "a transaction is open on this message")
        if not self.privileged and len(self.transactions) > self.max_transactions:
            raise XenStoreError(errno.ENOSPC, f"over {self.max_transactions} transactions")
        while True:  # "Pick an unused transaction identifier." (0 is never one)
            tx_id = self._next_tx
            self._next_tx = (self._next_tx + 1) & 0xFFFFFFFF
            if tx_id and tx_id not in self.transactions:
                break
        self.transactions[tx_id] = Transaction(self.store, self.domid, tx_id, self.conn)
        return str(tx_id).encode() + b"\0"

    def _transaction_end(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        arg = self._onearg(payload) if payload else None  # do_transaction_end
        if arg not in ("T", "F"):
            raise XenStoreError(errno.EINVAL, "XS_TRANSACTION_END: want T or F")
        if tx is None:
            raise XenStoreError(errno.ENOENT, "no transaction")
        del self.transactions[tx.tx_id]
        if arg == "T":
            tx.commit()
        return _OK

    def _get_domain_path(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        domid = atoi(self._onearg(payload).encode("latin-1"))  # do_get_domain_path
        return home(domid).encode() + b"\0"

    def _is_domain_introduced(
        self, view: XenStore, tx: Transaction | None, payload: bytes
    ) -> bytes:
        domid = atoi(self._onearg(payload).encode("latin-1"))  # do_is_domain_introduced
        yes = domid == DOMID_SELF or domid in self.domains.introduced
        return b"T\0" if yes else b"F\0"

    def _introduce(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        strs = w.split_strings(payload)  # do_introduce: domid, gfn (ignored), port
        if len(strs) < 3:
            raise XenStoreError(errno.EINVAL, "XS_INTRODUCE: domid, mfn, port")
        domid, port = atoi(strs[0]), atoi(strs[2])
        if port == 0 or port & 0x80000000:  # "if (port <= 0)"
            raise XenStoreError(errno.EINVAL, "XS_INTRODUCE: bad port")
        if domid not in self.domains.introduced:  # introduce_domain: fire once
            self.domains.introduced.add(domid)
            self.store.introduce_domain(domid)
            if self.domains.on_introduce is not None:
                self.domains.on_introduce(domid)
        return _OK

    def _onearg_domain(self, payload: bytes) -> int:
        domid = atoi(self._onearg(payload).encode("latin-1"))  # onearg_domain
        if domid == 0:
            raise XenStoreError(errno.EINVAL, "dom0")
        if domid not in self.domains.introduced:  # find_connected_domain
            raise XenStoreError(errno.ENOENT, f"d{domid} is not introduced")
        return domid

    def _release(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        domid = self._onearg_domain(payload)  # do_release
        self.domains.introduced.discard(domid)
        self.store.release_domain(domid)
        if self.domains.on_release is not None:
            self.domains.on_release(domid)
        return _OK

    def _resume(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        self._onearg_domain(payload)  # do_resume: clears the shutdown flag we do not keep
        return _OK

    def _set_target(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        strs = w.split_strings(payload)  # do_set_target: domid, target domid
        if len(strs) < 2:
            raise XenStoreError(errno.EINVAL, "XS_SET_TARGET: domid and target")
        domid, target = atoi(strs[0]), atoi(strs[1])
        for d in (domid, target):  # find_connected_domain
            if d not in self.domains.introduced:
                raise XenStoreError(errno.ENOENT, f"d{d} is not introduced")
        self.store.set_target(domid, target)  # domain->conn->target = tdomain->conn
        return _OK

    def _reset_watches(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        # do_reset_watches: conn_delete_all_watches + conn_delete_all_transactions
        self.store.release_conn(self.conn)
        self.transactions.clear()
        return _OK

    def _control(self, view: XenStore, tx: Transaction | None, payload: bytes) -> bytes:
        strs = self._strings(payload)  # do_control: a few of xenstored_control.c's commands
        if not strs or strs[0] not in _CONTROL:
            raise XenStoreError(errno.EINVAL, "XS_CONTROL: unknown command")
        cmd, args = strs[0], strs[1:]
        if cmd == "help":
            if args:
                raise XenStoreError(errno.EINVAL, "help takes no parameters")
            text = "".join(f"{c}\t{p}\n" for c, p in _CONTROL.items())
            return text.encode() + b"\0"
        if cmd == "quota":  # do_control_quota
            if not args:
                return _quota_text(self.store).encode() + b"\0"  # quota_show_current
            if args[0] != "set":
                raise XenStoreError(errno.EINVAL, "quota <domid> is not implemented")
            _quota_set(self.store, args[1:])
            return _OK
        if cmd == "check" and args:
            raise XenStoreError(errno.EINVAL, "check takes no parameters")
        if cmd in ("log", "print") and len(args) != 1:
            raise XenStoreError(errno.EINVAL, f"{cmd} takes one parameter")
        if cmd == "log" and args[0] not in ("on", "off"):
            raise XenStoreError(errno.EINVAL, "log on|off")
        return _OK


#: hard_quotas[] (xenstored_control.c) that the store enforces: name -> (the
#: store's attribute, the description); "outstanding" and "memory" are not modelled
_QUOTAS: dict[str, tuple[str, str]] = {
    "nodes": ("quota_entries", "Nodes per domain"),
    "watches": ("quota_watches", "Watches per domain"),
    "transactions": ("quota_transactions", "Transactions per domain"),
    "transaction-nodes": ("quota_trans_nodes", "Max. number of accessed nodes per transaction"),
    "node-size": ("quota_entry_size", "Max. size of a node"),
    "path-max": ("quota_path_max", "Max. length of a node path"),
    "permissions": ("quota_perms", "Max. number of permissions per node"),
}


def _quota_text(store: XenStore) -> str:
    """``quota_show_current``'s text."""
    rows = [(n, getattr(store, attr), d) for n, (attr, d) in _QUOTAS.items()]
    return "Quota settings:\n" + "".join(f"{n:<17}: {v:8d} {d}\n" for n, v, d in rows)


def _quota_set(store: XenStore, args: list[str]) -> None:
    """``quota_set``: ``<name> <value>``, the value an ``atoi`` of at least 1.

    Raises:
        XenStoreError: EINVAL (not two arguments, a value below 1, a name not
            in the table, or one of xenstored's not modelled here).
    """
    if len(args) != 2:
        raise XenStoreError(errno.EINVAL, "quota set <name> <value>")
    val = atoi(args[1].encode("latin-1"))
    if val & 0x80000000:  # atoi's int: negative
        val -= 1 << 32
    if val < 1:
        raise XenStoreError(errno.EINVAL, f"quota set {args[0]}: {args[1]!r} < 1")
    entry = _QUOTAS.get(args[0])
    if entry is None:
        raise XenStoreError(errno.EINVAL, f"quota set: no quota {args[0]!r} here")
    setattr(store, entry[0], val)


def event_message(path: str, token: str) -> bytes:
    """An ``XS_WATCH_EVENT``: path NUL token NUL, ``req_id``/``tx_id`` 0 (``send_event``)."""
    return w.pack(w.XS_WATCH_EVENT, 0, 0, w.strings(path, token))


_Handler = Callable[[Session, XenStore, "Transaction | None", bytes], bytes]
#: wire_funcs[]
_HANDLERS: dict[int, _Handler] = {
    w.XS_CONTROL: Session._control,
    w.XS_DIRECTORY: Session._directory,
    w.XS_READ: Session._read,
    w.XS_GET_PERMS: Session._get_perms,
    w.XS_WATCH: Session._watch,
    w.XS_UNWATCH: Session._unwatch,
    w.XS_TRANSACTION_START: Session._transaction_start,
    w.XS_TRANSACTION_END: Session._transaction_end,
    w.XS_INTRODUCE: Session._introduce,
    w.XS_RELEASE: Session._release,
    w.XS_GET_DOMAIN_PATH: Session._get_domain_path,
    w.XS_WRITE: Session._write,
    w.XS_MKDIR: Session._mkdir,
    w.XS_RM: Session._rm,
    w.XS_SET_PERMS: Session._set_perms,
    w.XS_IS_DOMAIN_INTRODUCED: Session._is_domain_introduced,
    w.XS_RESUME: Session._resume,
    w.XS_SET_TARGET: Session._set_target,
    w.XS_RESET_WATCHES: Session._reset_watches,
    w.XS_DIRECTORY_PART: Session._directory_part,
}
#: XS_FLAG_PRIV
_PRIV = frozenset({w.XS_CONTROL, w.XS_INTRODUCE, w.XS_RELEASE, w.XS_IS_DOMAIN_INTRODUCED,
                   w.XS_RESUME, w.XS_SET_TARGET})
#: XS_FLAG_NOTID
_NOTID = frozenset({w.XS_WATCH, w.XS_UNWATCH})
#: the XS_CONTROL commands answered, with xenstored's parameter help
_CONTROL: dict[str, str] = {
    "check": "", "log": "on|off", "print": "<string>", "quota": "[set <name> <val>]",
    "help": "",
}

