"""A small xenstore: the tree, Xen's permission model, watches.

Sans-IO: every call names the calling domain; watch events pile up in
:attr:`XenStore.events` for the server to send.  Rules follow
tools/xenstore/xenstored_core.c and xenstored_watch.c (Xen 4.17) and
docs/misc/xenstore.txt:

- Paths: absolute (``/local/domain/3/data``) or relative to the caller's home
  ``/local/domain/<domid>`` (``canonicalize``).  ``is_valid_nodename``: starts
  with ``/``, no trailing ``/``, no ``//``, only ``[A-Za-z0-9-/_@]``, at most
  2048 characters past ``/local/domain/<domid>/``.
- Permissions (``perm_for_conn``): a node's first permission names its owner
  and what everyone not listed may do; later entries grant one domain
  ``r``/``w``/``b``/``n``.  The owner and privileged domains (dom0) may do
  everything.  A domain given a target (``XS_SET_TARGET``: a stub domain and
  the guest it serves) has the target's rights as well: it owns what the
  target owns, and an entry naming the target applies to it (the first
  entry naming either, in order).  A missing node answers ENOENT only to a caller with the
  requested right on its nearest existing ancestor, else EACCES
  (``errno_from_parents``), so nobody learns what they may not see.
- A new node inherits its parent's permissions, but an unprivileged creator
  becomes its owner (``construct_node``); creating needs write access to the
  nearest existing ancestor; missing parents are created too.
- ``set_perms`` needs ownership; an unprivileged domain may not change the
  owner (EPERM) nor list more than 5 entries (ENOSPC).
- Quotas of unprivileged domains: 1000 owned nodes, 128 watches (E2BIG,
  checked as ``count > quota`` as xenstored does), and the size of every
  node record they write (``write_node_raw``): the record is the tdb
  record xenstored stores, ``struct xs_tdb_record_hdr`` (24 bytes), 8 bytes
  per permission, the value and the children's names each with its NUL; a
  record of ``quota_entry_size`` (2048) bytes or more is ENOSPC.  It is
  checked for the node written, for each node a write or mkdir creates and
  for the existing parent that gains a child (``create_node``), and for a
  node whose permissions change (``do_set_perms``); never for dom0, never
  when a child goes (``remove_child_entry``) nor at a commit.
- Watches fire for the node changed and, on ``rm``, for every node removed;
  a watcher must be able to read the node or its parent (``watch_permitted``)
  and gets paths relative if it watched a relative path.  Registering fires
  once at once.  ``@introduceDomain`` / ``@releaseDomain`` fire for watchers
  allowed to read them (dom0 unless dom0 changed their permissions).
- When a domain goes, nodes it owned pass to dom0 and its permission entries
  are dropped, so a later domain with the same id inherits nothing (XSA-322).

Every change stamps the node with a new generation (``access_node``:
``node->generation = ++generation``; a parent's children changing is a change
of the parent): transactions (:mod:`xengrant.xenstore.transaction`) compare
generations at commit, ``XS_DIRECTORY_PART`` returns them.
"""

from __future__ import annotations

import contextlib
import errno
import re
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field

from ..errors import XenStoreError as XenStoreError  # defined there: xengrant.linux uses it too
from .wire import XENSTORE_PAYLOAD_MAX, XENSTORE_REL_PATH_MAX

XS_PERM_NONE = 0
XS_PERM_READ = 1
XS_PERM_WRITE = 2
XS_PERM_OWNER = 8
_ALL = XS_PERM_READ | XS_PERM_WRITE | XS_PERM_OWNER

#: xenstored's default quotas (``quota_nb_entry_per_domain`` ...).
QUOTA_ENTRIES = 1000
#: ``quota_max_entry_size``: a node record of this many bytes or more is refused.
QUOTA_ENTRY_SIZE = 2048
#: ``sizeof(struct xs_tdb_record_hdr)`` (tools/xenstore/utils.h: u64 generation,
#: u32 num_perms, datalen, childlen; then the permissions)
RECORD_HEADER_SIZE = 24
#: ``sizeof(struct xs_permissions)`` (xenstore_lib.h: unsigned int id, perms)
RECORD_PERM_SIZE = 8
QUOTA_WATCHES = 128
QUOTA_PERMS = 5
#: xenstored's ``quota_trans_nodes``: nodes an unprivileged transaction may touch.
QUOTA_TRANS_NODES = 1024
#: xenstored's ``quota_max_transaction``: open transactions per connection.
QUOTA_TRANSACTIONS = 10
#: XENSTORE_REL_PATH_MAX: path length allowed past /local/domain/<domid>/.
REL_PATH_MAX = XENSTORE_REL_PATH_MAX
#: XENSTORE_PAYLOAD_MAX: a watch event longer than this is not sent.
PAYLOAD_MAX = XENSTORE_PAYLOAD_MAX

SPECIAL_INTRODUCE = "@introduceDomain"
SPECIAL_RELEASE = "@releaseDomain"

_VALID = re.compile(r"[A-Za-z0-9\-/_@]*\Z")
_LOCAL = re.compile(r"/local/domain/(\d{1,5})/")
_PERM_CHARS = {"n": XS_PERM_NONE, "r": XS_PERM_READ, "w": XS_PERM_WRITE, "b": 3}
_PERM_NAMES = {v: k for k, v in _PERM_CHARS.items()}


@dataclass
class Perm:
    """One permission entry: ``domid`` may ``perm`` (XS_PERM_* bits)."""

    domid: int
    perm: int

    def __str__(self) -> str:
        return f"{_PERM_NAMES[self.perm & 3]}{self.domid}"


def parse_perm(text: str) -> Perm:
    """``"r5"`` -> Perm(5, XS_PERM_READ) (``xs_strings_to_perms``).

    Raises:
        XenStoreError: EINVAL for anything else.
    """
    if len(text) < 2 or text[0] not in _PERM_CHARS or not text[1:].isdigit():
        raise XenStoreError(errno.EINVAL, f"bad permission {text!r}")
    domid = int(text[1:])
    if domid > 0xFFFF:
        raise XenStoreError(errno.EINVAL, f"bad permission {text!r}")
    return Perm(domid, _PERM_CHARS[text[0]])


class Node:
    """A node: value, permissions, children (in creation order), generation."""

    __slots__ = ("children", "gen", "perms", "value")

    def __init__(self, perms: list[Perm], value: bytes = b"", gen: int = 0) -> None:
        self.value = value
        self.perms = perms
        self.children: dict[str, Node] = {}
        #: the store's generation when the node last changed
        self.gen = gen


@dataclass
class Watch:
    """A registered watch.

    Attributes:
        conn: the connection that set it (opaque, hashable).
        domid: the domain that connection acts as.
        path: the absolute path (or ``@special``) watched.
        token: the client's token.
        relative: the home prefix to strip from event paths, or None.
    """

    conn: Hashable
    domid: int
    path: str
    token: str
    relative: str | None = None


@dataclass
class WatchEvent:
    """A watch firing: send ``path`` and ``token`` to ``conn``."""

    conn: Hashable
    path: str
    token: str


def record_size(perms: int, datalen: int, children: Iterable[str]) -> int:
    """The bytes of a node's record as ``write_node_raw`` sizes it.

    ``sizeof(*hdr) + perms.num * sizeof(perms.p[0]) + datalen + childlen``,
    the children's names NUL-separated.

    Args:
        perms: the number of permission entries.
        datalen: the value's length.
        children: the children's names.
    """
    childlen = sum(len(c) + 1 for c in children)
    return RECORD_HEADER_SIZE + perms * RECORD_PERM_SIZE + datalen + childlen


def home(domid: int) -> str:
    """A domain's home, ``/local/domain/<domid>`` (XS_GET_DOMAIN_PATH)."""
    return f"/local/domain/{domid}"


def parent_of(path: str) -> str:
    """``get_parent``: ``/a/b`` -> ``/a``; ``/a`` -> ``/``."""
    cut = path.rfind("/")
    return path[:cut] if cut > 0 else "/"


def is_child(child: str, parent: str) -> bool:
    """``is_child``: ``child`` is ``parent`` or below it (everything is below ``/``)."""
    if parent == "/":
        return True
    return child.startswith(parent) and (len(child) == len(parent) or child[len(parent)] == "/")


def is_valid_nodename(path: str, path_max: int = REL_PATH_MAX) -> bool:
    """xenstored's ``is_valid_nodename`` (``path_max``: ``quota_max_path_len``)."""
    if not path.startswith("/"):
        return False
    if path.endswith("/") and path != "/":
        return False
    if "//" in path:
        return False
    m = _LOCAL.match(path)
    local_off = m.end() if m else 0
    if len(path) > local_off + path_max:
        return False
    return _VALID.match(path) is not None


@dataclass
class _Counts:
    entries: dict[int, int] = field(default_factory=dict)
    watches: dict[int, int] = field(default_factory=dict)


class XenStore:
    """The store.

    Args:
        is_privileged: whether a domain is privileged (default: only dom0).
        quota_entries: nodes an unprivileged domain may own
            (xenstored's ``quota-nb-entry-per-domain``, 1000).
        quota_watches: watches an unprivileged domain may set
            (``quota-nb-watch-per-domain``, 128).
        quota_entry_size: the size a node record an unprivileged domain
            writes must stay below (``quota_max_entry_size``, 2048; see
            :func:`record_size`).
        max_nodes: nodes in all past which unprivileged domains create none
            (ENOSPC; xenstored bounds its memory per domain instead).
        max_watches: watches in all past which unprivileged domains set
            none (E2BIG).
    """

    def __init__(
        self,
        is_privileged: Callable[[int], bool] | None = None,
        *,
        quota_entries: int = QUOTA_ENTRIES,
        quota_watches: int = QUOTA_WATCHES,
        quota_entry_size: int = QUOTA_ENTRY_SIZE,
        max_nodes: int | None = None,
        max_watches: int | None = None,
    ) -> None:
        self.is_privileged = is_privileged or (lambda domid: domid == 0)
        self.quota_entries = quota_entries
        self.quota_watches = quota_watches
        self.quota_entry_size = quota_entry_size
        #: ``quota_nb_perms_per_node``: entries an unprivileged set_perms may give
        self.quota_perms = QUOTA_PERMS
        #: ``quota_max_path_len``: path length allowed past /local/domain/<domid>/
        self.quota_path_max = REL_PATH_MAX
        #: ``quota_max_transaction``: open transactions of an unprivileged connection
        self.quota_transactions = QUOTA_TRANSACTIONS
        #: ``quota_trans_nodes``: nodes an unprivileged transaction may touch
        self.quota_trans_nodes = QUOTA_TRANS_NODES
        self.max_nodes = max_nodes
        self.max_watches = max_watches
        self.root = Node([Perm(0, XS_PERM_NONE)])
        self.special: dict[str, list[Perm]] = {
            SPECIAL_INTRODUCE: [Perm(0, XS_PERM_NONE)],
            SPECIAL_RELEASE: [Perm(0, XS_PERM_NONE)],
        }
        self.watches: list[Watch] = []
        #: domid -> the domain whose rights it has too (``XS_SET_TARGET``)
        self.targets: dict[int, int] = {}
        #: Watch events not yet sent (the server drains them).
        self.events: list[WatchEvent] = []
        self._counts = _Counts()
        #: xenstored's global ``generation``: bumped by every change
        self.generation = 0
        self._count_owner(self.root, +1)
        # setup_structure: "/", "/tool", "/tool/xenstored", all dom0's
        self.mkdir(0, "/tool/xenstored")

    # ----------------------------------------------------------- helpers
    def _touch(self, path: str, node: Node) -> None:
        """``access_node`` for a change: the node gets a new generation."""
        self.generation += 1
        node.gen = self.generation

    def _created(self, path: str, node: Node) -> None:
        """A node was created (a transaction's view records it)."""

    def _removed(self, path: str, node: Node) -> None:
        """A node was removed (a transaction's view records it)."""

    def _count_owner(self, node: Node, delta: int) -> None:
        owner = node.perms[0].domid
        c = self._counts.entries
        c[owner] = c.get(owner, 0) + delta
        if not c[owner]:
            del c[owner]

    def _check_record(
        self, domid: int, path: str, perms: int, datalen: int, children: Iterable[str]
    ) -> None:
        """``write_node_raw``'s quota: an unprivileged writer's node record must
        stay below ``quota_entry_size`` bytes.

        Raises:
            XenStoreError: ENOSPC.
        """
        if self.is_privileged(domid):
            return
        size = record_size(perms, datalen, children)
        if size >= self.quota_entry_size:  # "data.dsize >= quota_max_entry_size"
            raise XenStoreError(
                errno.ENOSPC, f"{path}: a record of {size} bytes (quota {self.quota_entry_size})"
            )

    @property
    def nodes(self) -> int:
        """Nodes in the store."""
        return sum(self._counts.entries.values())

    def owned(self, domid: int) -> int:
        """Nodes ``domid`` owns (what the entry quota counts)."""
        return self._counts.entries.get(domid, 0)

    def watch_count(self, domid: int) -> int:
        """Watches set by connections acting as ``domid``."""
        return self._counts.watches.get(domid, 0)

    def perm_for(self, domid: int, perms: list[Perm]) -> int:
        """``perm_for_conn``: what ``domid`` may do on a node with ``perms``.

        "Owners and tools get it all", the owner being ``domid`` or its
        target (``conn->target``); else the first entry naming ``domid`` or
        its target; else the owner entry's rights for everyone.
        """
        if self.is_privileged(domid):
            return _ALL
        target = self.targets.get(domid, domid)
        if perms[0].domid in (domid, target):
            return _ALL
        for p in perms[1:]:
            if p.domid in (domid, target):
                return p.perm
        return perms[0].perm

    def set_target(self, domid: int, target: int) -> None:
        """``XS_SET_TARGET`` (``do_set_target``): ``domid`` gets ``target``'s
        rights over its nodes as well (the last call for ``domid`` counts)."""
        self.targets[domid] = target

    def canonicalize(self, domid: int, path: str) -> str:
        """Relative paths are under the caller's home; ``@`` names are kept."""
        if path.startswith("/") or path.startswith("@"):
            return path
        return f"{home(domid)}/{path}"

    def lookup(self, path: str) -> Node | None:
        """The node at an absolute path, or None."""
        if path == "/":
            return self.root
        node = self.root
        for part in path[1:].split("/"):
            nxt = node.children.get(part)
            if nxt is None:
                return None
            node = nxt
        return node

    def _errno_from_parents(self, domid: int, path: str, err: int, perm: int) -> int:
        p = path
        while True:
            p = parent_of(p)
            node = self.lookup(p)
            if node is not None:
                break
            if p == "/":  # pragma: no cover - the root always exists
                return errno.EACCES
        return err if self.perm_for(domid, node.perms) & perm else errno.EACCES

    def _get(self, domid: int, raw: str, perm: int) -> tuple[str, Node]:
        """``get_node_canonicalized``: the node, or XenStoreError with xenstored's errno."""
        path = self.canonicalize(domid, raw)
        if not is_valid_nodename(path, self.quota_path_max):
            raise XenStoreError(errno.EINVAL, f"invalid path {raw!r}")
        node = self.lookup(path)
        if node is not None:
            if (self.perm_for(domid, node.perms) & perm) == perm:
                return path, node
            err = errno.EACCES
        else:
            err = errno.ENOENT
        raise XenStoreError(self._errno_from_parents(domid, path, err, perm), path)

    # -------------------------------------------------------- operations
    def read(self, domid: int, path: str) -> bytes:
        """XS_READ.

        Raises:
            XenStoreError: EINVAL, ENOENT, EACCES.
        """
        return self._get(domid, path, XS_PERM_READ)[1].value

    def directory(self, domid: int, path: str) -> list[str]:
        """XS_DIRECTORY: child names, in creation order.

        Raises:
            XenStoreError: EINVAL, ENOENT, EACCES.
        """
        return list(self._get(domid, path, XS_PERM_READ)[1].children)

    def get_perms(self, domid: int, path: str) -> list[str]:
        """XS_GET_PERMS: ``["b0", "r5"]``-style strings.

        Raises:
            XenStoreError: EINVAL, ENOENT, EACCES.
        """
        if path.startswith("@"):
            perms = self.special.get(path)
            if perms is None:
                raise XenStoreError(errno.EINVAL, path)
            return [str(p) for p in perms]
        return [str(p) for p in self._get(domid, path, XS_PERM_READ)[1].perms]

    def write(self, domid: int, path: str, value: bytes) -> None:
        """XS_WRITE: set a value, creating the node (and missing parents).

        Raises:
            XenStoreError: EINVAL, EACCES, ENOENT, ENOSPC (quota).
        """
        try:
            name, node = self._get(domid, path, XS_PERM_WRITE)
        except XenStoreError as e:
            if e.errno != errno.ENOENT:
                raise
            name = self.canonicalize(domid, path)
            node = self._create(domid, name, len(value))
        else:  # do_write -> write_node(conn, node, false)
            self._check_record(domid, name, len(node.perms), len(value), node.children)
        node.value = bytes(value)
        self._touch(name, node)
        self._fire(name, node, exact=False)

    def mkdir(self, domid: int, path: str) -> None:
        """XS_MKDIR: create an empty node; fine if it exists.

        Raises:
            XenStoreError: EINVAL, EACCES, ENOENT, ENOSPC.
        """
        try:
            self._get(domid, path, XS_PERM_WRITE)
        except XenStoreError as e:
            if e.errno != errno.ENOENT:
                raise
            name = self.canonicalize(domid, path)
            node = self._create(domid, name)
            self._fire(name, node, exact=False)

    def _create(self, domid: int, path: str, datalen: int = 0) -> Node:
        """``create_node``: the node (to hold ``datalen`` bytes) and any missing
        ancestors, quotas checked first: nothing is created if one fails."""
        missing: list[str] = []
        p = path
        while self.lookup(p) is None:
            missing.append(p)
            p = parent_of(p)
        parent = self.lookup(p)
        assert parent is not None
        privileged = self.is_privileged(domid)
        if not privileged:
            if self.owned(domid) + len(missing) > self.quota_entries:
                raise XenStoreError(errno.ENOSPC, f"d{domid} node quota ({self.quota_entries})")
            if self.max_nodes is not None and self.nodes + len(missing) > self.max_nodes:
                raise XenStoreError(errno.ENOSPC, f"the store is full ({self.max_nodes} nodes)")
            # create_node writes bottom up, each with write_node(conn, i, false):
            # the new node with its value, each new ancestor with its one child,
            # then the existing parent with its new child's name
            nperms = len(parent.perms)
            child: list[str] = []
            for i, name in enumerate(missing):
                self._check_record(domid, name, nperms, datalen if i == 0 else 0, child)
                child = [name[name.rfind("/") + 1 :]]
            self._check_record(domid, p, nperms, len(parent.value), [*parent.children, *child])
        self._touch(p, parent)
        node = parent
        for name in reversed(missing):
            perms = [Perm(x.domid, x.perm) for x in parent.perms]
            if not privileged:
                perms[0].domid = domid
            node = Node(perms)
            parent.children[name[name.rfind("/") + 1 :]] = node
            self._touch(name, node)
            self._created(name, node)
            self._count_owner(node, +1)
            parent = node
        return node

    def rm(self, domid: int, path: str) -> None:
        """XS_RM: remove a node and everything below; fine if absent but its parent exists.

        Raises:
            XenStoreError: EINVAL (``/``), EACCES, ENOENT.
        """
        try:
            name, node = self._get(domid, path, XS_PERM_WRITE)
        except XenStoreError as e:
            if e.errno == errno.ENOENT:
                name = self.canonicalize(domid, path)
                if self.lookup(parent_of(name)) is not None:
                    return
            raise
        if name == "/":
            raise XenStoreError(errno.EINVAL, "cannot remove /")
        self._fire(name, node, exact=False)
        self._delete(name, node)

    def _delete(self, name: str, node: Node) -> None:
        for child in list(node.children):
            self._delete(f"{name}/{child}", node.children[child])
        self._fire(name, node, exact=True)
        up = parent_of(name)
        parent = self.lookup(up)
        assert parent is not None
        del parent.children[name[name.rfind("/") + 1 :]]
        self._touch(up, parent)
        self._removed(name, node)
        self._count_owner(node, -1)

    def set_perms(self, domid: int, path: str, perms: list[str]) -> None:
        """XS_SET_PERMS.

        Raises:
            XenStoreError: EINVAL (no or bad entries), ENOSPC (over 5 entries,
                unprivileged), EACCES (not the owner), EPERM (owner change).
        """
        if not perms:
            raise XenStoreError(errno.EINVAL, "no permissions")
        privileged = self.is_privileged(domid)
        if not privileged and len(perms) > self.quota_perms:
            raise XenStoreError(errno.ENOSPC, f"{len(perms)} permissions > {self.quota_perms}")
        new = [parse_perm(p) for p in perms]
        if path.startswith("@"):
            cur = self.special.get(path)
            if cur is None:
                raise XenStoreError(errno.EINVAL, path)
            if self.perm_for(domid, cur) & (XS_PERM_WRITE | XS_PERM_OWNER) != (
                XS_PERM_WRITE | XS_PERM_OWNER
            ):
                raise XenStoreError(errno.EACCES, path)
            self.special[path] = new
            return
        name, node = self._get(domid, path, XS_PERM_WRITE | XS_PERM_OWNER)
        if not privileged and new[0].domid != node.perms[0].domid:
            raise XenStoreError(errno.EPERM, "only a privileged domain may change the owner")
        # do_set_perms -> write_node(conn, node, false)
        self._check_record(domid, name, len(new), len(node.value), node.children)
        old = node.perms
        self._count_owner(node, -1)
        node.perms = new
        self._count_owner(node, +1)
        self._touch(name, node)
        self._fire(name, node, exact=False, old_perms=old)

    # ----------------------------------------------------------- watches
    def watch(self, conn: Hashable, domid: int, path: str, token: str) -> None:
        """XS_WATCH: fires once now, then on every change at or below ``path``.

        Raises:
            XenStoreError: EINVAL (bad path), EEXIST (same path and token),
                E2BIG (watch quota).
        """
        if path.startswith("@"):
            if len(path) > REL_PATH_MAX:
                raise XenStoreError(errno.EINVAL, "special path too long")
            full, relative = path, None
        else:
            full = self.canonicalize(domid, path)
            relative = None if path.startswith("/") else home(domid)
            if not is_valid_nodename(full, self.quota_path_max):
                raise XenStoreError(errno.EINVAL, f"invalid path {path!r}")
        for w in self.watches:
            if w.conn == conn and w.path == full and w.token == token:
                raise XenStoreError(errno.EEXIST, f"watch {path!r} {token!r} exists")
        if not self.is_privileged(domid):
            if self.watch_count(domid) > self.quota_watches:
                raise XenStoreError(errno.E2BIG, f"d{domid} watch quota ({self.quota_watches})")
            if self.max_watches is not None and len(self.watches) >= self.max_watches:
                raise XenStoreError(errno.E2BIG, f"watches are full ({self.max_watches})")
        w = Watch(conn, domid, full, token, relative)
        self.watches.append(w)
        self._counts.watches[domid] = self.watch_count(domid) + 1
        self._add_event(w, full)

    def unwatch(self, conn: Hashable, domid: int, path: str, token: str) -> None:
        """XS_UNWATCH.

        Raises:
            XenStoreError: ENOENT if no such watch.
        """
        full = self.canonicalize(domid, path)
        for i, w in enumerate(self.watches):
            if w.conn == conn and w.path == full and w.token == token:
                del self.watches[i]
                self._drop_watch_count(w.domid)
                return
        raise XenStoreError(errno.ENOENT, f"no watch {path!r} {token!r}")

    def _drop_watch_count(self, domid: int) -> None:
        n = self.watch_count(domid) - 1
        if n > 0:
            self._counts.watches[domid] = n
        else:
            self._counts.watches.pop(domid, None)

    def release_conn(self, conn: Hashable) -> None:
        """A connection went: drop its watches and undelivered events."""
        keep = []
        for w in self.watches:
            if w.conn == conn:
                self._drop_watch_count(w.domid)
            else:
                keep.append(w)
        self.watches = keep
        self.events = [e for e in self.events if e.conn != conn]

    def _add_event(self, w: Watch, name: str) -> None:
        path = name
        if w.relative is not None and path.startswith(w.relative):
            path = path[len(w.relative) :]
            if path.startswith("/"):
                path = path[1:]
        if len(path) + len(w.token) + 2 > PAYLOAD_MAX:
            return
        self.events.append(WatchEvent(w.conn, path, w.token))

    def _watch_permitted(
        self, domid: int, name: str, node: Node | None, old_perms: list[Perm] | None
    ) -> bool:
        if old_perms is not None and self.perm_for(domid, old_perms) & XS_PERM_READ:
            return True
        if node is None:
            node = self.lookup(name)
            if node is None:
                return False
        if self.perm_for(domid, node.perms) & XS_PERM_READ:
            return True
        parent = self.lookup(parent_of(name))
        return parent is not None and bool(self.perm_for(domid, parent.perms) & XS_PERM_READ)

    def _fire(
        self, name: str, node: Node | None, exact: bool, old_perms: list[Perm] | None = None
    ) -> None:
        """``fire_watches``."""
        special = name.startswith("@")
        allowed: dict[int, bool] = {}
        for w in self.watches:
            if exact:
                if w.path != name:
                    continue
            elif not is_child(name, w.path):
                continue
            ok = allowed.get(w.domid)
            if ok is None:
                if special:
                    perms = self.special.get(name, [Perm(0, XS_PERM_NONE)])
                    ok = bool(self.perm_for(w.domid, perms) & XS_PERM_READ)
                else:
                    ok = self._watch_permitted(w.domid, name, node, old_perms)
                allowed[w.domid] = ok
            if ok:
                self._add_event(w, name)

    def drain_events(self) -> list[WatchEvent]:
        """The watch events to send now (and forget)."""
        out, self.events = self.events, []
        return out

    # ----------------------------------------------------------- domains
    def introduce_domain(self, domid: int) -> None:
        """XS_INTRODUCE happened: fire ``@introduceDomain``."""
        self._fire(SPECIAL_INTRODUCE, None, exact=False)

    def release_domain(self, domid: int) -> None:
        """A domain is gone: its nodes pass to dom0, its ACL entries go; fire ``@releaseDomain``.

        A target relation it is part of goes too.  (xenstored keeps a stub
        domain's ``conn->target`` while the stub lives, even past its
        target's death, so a later domain given the same id would be its
        target again; dropped here, as the gone domain's permission entries
        are, so that a new domain with the same id inherits nothing.)
        """
        self.targets.pop(domid, None)
        for stub in [s for s, t in self.targets.items() if t == domid]:
            del self.targets[stub]
        for path, node in self.walk():
            perms = node.perms
            if perms[0].domid == domid:
                self._count_owner(node, -1)
                node.perms = perms = [Perm(0, perms[0].perm), *perms[1:]]
                self._count_owner(node, +1)
                self._touch(path, node)
            if any(p.domid == domid for p in perms[1:]):
                node.perms = [perms[0]] + [p for p in perms[1:] if p.domid != domid]
                self._touch(path, node)
        for name, perms in self.special.items():
            if any(p.domid == domid for p in perms[1:]):
                self.special[name] = [perms[0]] + [p for p in perms[1:] if p.domid != domid]
        self._fire(SPECIAL_RELEASE, None, exact=False)

    # ------------------------------------------------------------ inspect
    def walk(self, path: str = "/") -> Iterator[tuple[str, Node]]:
        """Every node at or below ``path``, depth first."""
        node = self.lookup(path)
        if node is None:
            return
        stack = [(path, node)]
        while stack:
            p, n = stack.pop()
            yield p, n
            for name, child in reversed(list(n.children.items())):
                stack.append((f"{p.rstrip('/')}/{name}", child))

    def node_count(self) -> int:
        """Nodes in the tree, ``/`` included."""
        return sum(1 for _ in self.walk())

    def dump(self) -> dict[str, tuple[str, list[str]]]:
        """``{path: (value, perms)}`` of the whole tree (for tests and STATS)."""
        return {
            p: (n.value.decode("utf-8", "replace"), [str(x) for x in n.perms])
            for p, n in self.walk()
        }

    # ------------------------------------------------------------ toolstack
    def make_domain_home(self, domid: int, name: str = "") -> None:
        """What libxl's ``libxl__domain_make`` writes as dom0 for a new domain.

        ``/local/domain/<domid>`` and its ``cpu``, ``memory``, ``device`` and
        ``control`` dirs are dom0's, readable by the domain (``roperm``);
        ``data``, ``drivers``, ``feature``, ``attr``, ``error`` and
        ``control/shutdown`` are the domain's own (``rwperm``).
        """
        dom = home(domid)
        ro = ["n0", f"r{domid}"]
        rw = [f"n{domid}"]
        with contextlib.suppress(XenStoreError):
            self.rm(0, dom)
        self.mkdir(0, dom)
        self.set_perms(0, dom, ro)
        self.write(0, f"{dom}/domid", str(domid).encode())
        self.write(0, f"{dom}/name", (name or f"domain-{domid}").encode())
        for sub in ("cpu", "memory", "device", "control"):
            self.mkdir(0, f"{dom}/{sub}")
            self.set_perms(0, f"{dom}/{sub}", ro)
        for sub in ("control/shutdown", "data", "drivers", "feature", "attr", "error"):
            self.mkdir(0, f"{dom}/{sub}")
            self.set_perms(0, f"{dom}/{sub}", rw)
