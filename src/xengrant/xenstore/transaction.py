"""Transactions as xenstored 4.17 does them (tools/xenstore/xenstored_transaction.c).

A transaction sees the store as it is plus its own changes, and commits all
of them or none:

- Every node it looks at is copied into the transaction the first time
  (``access_node``), with the generation it had; a node it finds absent is
  recorded with no generation (``NO_GENERATION``).  Its changes touch only
  the copies.
- At ``XS_TRANSACTION_END "T"`` each recorded node's generation in the store
  is compared with the one seen (``finalize_transaction``): any difference
  (changed, created or removed meanwhile) fails the commit with ``EAGAIN``
  and nothing is applied; otherwise the changed nodes are written into the
  store, each with a new generation, and the watches fire then, once per
  node (``fire_watch`` / ``watch_exact``).
- An unprivileged domain's transaction may look at 1024 nodes
  (``quota_trans_nodes``: ENOSPC, and the transaction fails); a commit that
  would take a domain over its node quota fails with ENOSPC
  (``transaction_fix_domains``).
- ``"F"`` drops the transaction.

Watches are not part of a transaction (``XS_FLAG_NOTID``) and neither are the
``@`` nodes' permissions (``set_perms_special``).
"""

from __future__ import annotations

import errno
from collections.abc import Hashable

from ..errors import XenStoreError
from .store import (  # noqa: F401  (the quotas' defaults, re-exported)
    QUOTA_TRANS_NODES,
    QUOTA_TRANSACTIONS,
    Node,
    Perm,
    XenStore,
    _Counts,
    is_child,
    parent_of,
)


def _copy(node: Node) -> Node:
    out = Node([Perm(p.domid, p.perm) for p in node.perms], node.value, node.gen)
    out.children = dict(node.children)
    return out


class Transaction(XenStore):
    """One open transaction: a copy-on-access view of ``base``.

    Args:
        base: the store.
        domid: the domain that started it (its quotas apply).
        tx_id: its id on its connection.
        conn: the connection that owns it.
    """

    def __init__(self, base: XenStore, domid: int, tx_id: int, conn: Hashable = None) -> None:
        # not XenStore.__init__: the tree is the base's, seen through copies
        self.base = base
        self.domid = domid
        self.tx_id = tx_id
        self.conn = conn
        self.is_privileged = base.is_privileged
        self.quota_entries = base.quota_entries
        self.quota_watches = base.quota_watches
        self.quota_entry_size = base.quota_entry_size
        self.quota_perms = base.quota_perms
        self.quota_path_max = base.quota_path_max
        self.quota_transactions = base.quota_transactions
        self.quota_trans_nodes = base.quota_trans_nodes
        self.max_nodes = base.max_nodes
        self.max_watches = base.max_watches
        self.root = base.root
        self.special = base.special
        self.targets = base.targets
        self.watches = []
        self.events = []
        self.generation = base.generation
        self._counts = _Counts(dict(base._counts.entries), dict(base._counts.watches))
        self._start_entries = dict(base._counts.entries)
        #: path -> the transaction's node (None: removed in the transaction)
        self._copies: dict[str, Node | None] = {}
        #: path -> generation seen (None: absent), ``accessed`` with ``check_gen``
        self._accessed: dict[str, int | None] = {}
        #: paths changed, in order
        self._dirty: dict[str, None] = {}
        #: fire_watches calls to make at commit: name -> (node, exact, old perms)
        self._fired: dict[str, tuple[Node | None, bool, list[Perm] | None]] = {}
        self.node_created = False
        #: set when the transaction must not commit (``trans->fail``)
        self.fail = False

    def __repr__(self) -> str:
        return f"<Transaction {self.tx_id} of d{self.domid}: {len(self._accessed)} nodes seen>"

    # ------------------------------------------------------------- the view
    def _access(self, path: str, gen: int | None) -> None:
        if path in self._accessed:
            return
        limit = self.base.quota_trans_nodes
        if len(self._accessed) >= limit and not self.is_privileged(self.domid):
            self.fail = True  # access_node: "trans->fail = true"
            raise XenStoreError(errno.ENOSPC, f"transaction of over {limit} nodes")
        self._accessed[path] = gen

    def lookup(self, path: str) -> Node | None:
        """The transaction's node at ``path`` (copied from the store the first time), or None."""
        if path in self._copies:
            return self._copies[path]
        node: Node | None = self.base.root
        if path != "/":
            prefix = ""
            for part in path[1:].split("/"):
                prefix = f"{prefix}/{part}"
                if prefix in self._copies:
                    node = self._copies[prefix]
                else:
                    assert node is not None
                    node = node.children.get(part)
                if node is None:
                    break
        if node is None:
            self._access(path, None)
            return None
        self._access(path, node.gen)
        mine = _copy(node)
        self._copies[path] = mine
        return mine

    def _touch(self, path: str, node: Node) -> None:
        self.base.generation += 1
        node.gen = self.base.generation
        self._dirty[path] = None

    def _created(self, path: str, node: Node) -> None:
        self._copies[path] = node
        self._dirty[path] = None
        self.node_created = True

    def _removed(self, path: str, node: Node) -> None:
        for p in list(self._copies):
            if is_child(p, path) and self._copies[p] is not None:
                self._copies[p] = None
                self._dirty[p] = None
        self._copies[path] = None
        self._dirty[path] = None

    def _fire(
        self, name: str, node: Node | None, exact: bool, old_perms: list[Perm] | None = None
    ) -> None:
        """``queue_watches``: remembered, fired at commit."""
        if name in self._fired:
            n, was_exact, perms = self._fired[name]
            self._fired[name] = (n, was_exact and exact, perms)
        else:
            self._fired[name] = (node, exact, old_perms)

    def watch(self, conn: Hashable, domid: int, path: str, token: str) -> None:
        """Not in a transaction (XS_FLAG_NOTID)."""
        self.base.watch(conn, domid, path, token)

    def unwatch(self, conn: Hashable, domid: int, path: str, token: str) -> None:
        """Not in a transaction (XS_FLAG_NOTID)."""
        self.base.unwatch(conn, domid, path, token)

    # --------------------------------------------------------------- commit
    def commit(self) -> None:
        """``do_transaction_end`` with ``"T"``: apply every change, or none.

        Raises:
            XenStoreError: EAGAIN (a node seen changed meanwhile), ENOSPC (a
                domain's node quota), ENOMEM (the transaction failed earlier).
        """
        base = self.base
        if self.fail:
            raise XenStoreError(errno.ENOMEM, "the transaction failed earlier")
        # transaction_fix_domains(trans, chk_quota, false)
        if self.node_created and not self.is_privileged(self.domid):
            for domid, count in self._counts.entries.items():
                delta = count - self._start_entries.get(domid, 0)
                if delta > 0 and base.owned(domid) + delta > base.quota_entries:
                    raise XenStoreError(errno.ENOSPC, f"d{domid} node quota ({base.quota_entries})")
        # finalize_transaction: every node seen must be as it was
        for path, gen in self._accessed.items():
            now = base.lookup(path)
            if (None if now is None else now.gen) != gen:
                raise XenStoreError(errno.EAGAIN, f"{path} changed during the transaction")
        for path in sorted(self._dirty, key=lambda p: 0 if p == "/" else p.count("/")):
            self._apply(path, self._copies.get(path))
        for name, (node, exact, old_perms) in self._fired.items():
            base._fire(name, base.lookup(name) or node, exact, old_perms)

    def _apply(self, path: str, new: Node | None) -> None:
        base = self.base
        old = base.lookup(path)
        up = parent_of(path)
        leaf = path[path.rfind("/") + 1 :]
        if new is None:
            if old is None or path == "/":
                return
            parent = base.lookup(up)
            assert parent is not None
            for _p, n in base.walk(path):
                base._count_owner(n, -1)
            del parent.children[leaf]
            base._touch(up, parent)
            return
        if old is None:
            parent = base.lookup(up)
            if parent is None:  # pragma: no cover - parents sort first
                return
            old = Node([Perm(0, 0)])
            parent.children[leaf] = old
            base._touch(up, parent)
        else:
            base._count_owner(old, -1)
        old.value = new.value
        old.perms = [Perm(p.domid, p.perm) for p in new.perms]
        base._count_owner(old, +1)
        base._touch(path, old)
