"""Who may connect, who is dom0, and who may attach to a domain.

- **Admission.** A connection is served only if its process runs as the
  service's uid, root, or a uid the operator admitted (``--allow-uid``,
  ``--allow-group``: the group's gid as the peer's primary group, or the
  peer's user listed in the group).  The kernel reports the peer's uid
  (``SO_PEERCRED``); the peer cannot choose it.
- **dom0** belongs to whoever started the service, never to the first
  connection: claiming domid 0 takes the service's uid *and* the token the
  service wrote (0600) beside its socket (:mod:`.paths`), or handed to the
  process that started it in-process (:attr:`Identity.token`).  Domid 0 is
  claimed once: after dom0 is gone nobody becomes dom0 again (Xen builds
  dom0 once, at boot).
- **Attach secrets.** A domain dom0 creates for another process
  (``DOMCTL_CREATE``) comes with a random secret; ``ATTACH`` must present it
  (compared in constant time), so nobody else can take the domain, nor a
  domid whose process died.
- **The toolstack's view** (``STATS``, debug keys) is dom0's, or the token
  holder's on an unbound connection (``xengrant inspect``).
"""

from __future__ import annotations

import grp
import hmac
import os
import pwd
import secrets
from collections.abc import Iterable

from .paths import Cred
from .protocol import SECRET_SIZE


class Identity:
    """The service's identity rules (sans-IO: fed peer credentials and secrets).

    Args:
        allow_uids: uids admitted besides the service's own and root.
        allow_groups: groups (names or gids) whose members are admitted.
        uid: the service's uid (default: this process's).

    Raises:
        KeyError: an unknown group name.
    """

    def __init__(
        self,
        allow_uids: Iterable[int] = (),
        allow_groups: Iterable[int | str] = (),
        uid: int | None = None,
    ) -> None:
        self.uid = os.getuid() if uid is None else uid
        #: the dom0 token (written beside the socket by the server)
        self.token = secrets.token_bytes(SECRET_SIZE)
        self.allow_uids = frozenset(allow_uids)
        gids = set()
        members: set[int] = set()
        for g in allow_groups:
            entry = grp.getgrnam(g) if isinstance(g, str) else grp.getgrgid(g)
            gids.add(entry.gr_gid)
            for name in entry.gr_mem:
                try:
                    members.add(pwd.getpwnam(name).pw_uid)
                except KeyError:
                    continue
        self.allow_gids = frozenset(gids)
        self.group_members = frozenset(members)
        #: domid 0 was claimed once (it cannot be claimed again)
        self.dom0_claimed = False
        self._secrets: dict[int, bytes] = {}

    def admits(self, cred: Cred) -> bool:
        """Whether a peer with ``cred`` may talk to the service at all."""
        return (
            cred.uid in (self.uid, 0)
            or cred.uid in self.allow_uids
            or cred.gid in self.allow_gids
            or cred.uid in self.group_members
        )

    def is_owner(self, cred: Cred, token: bytes) -> bool:
        """The service's uid presenting the dom0 token (constant-time compare)."""
        return cred.uid == self.uid and hmac.compare_digest(bytes(token), self.token)

    def new_secret(self, domid: int) -> bytes:
        """A fresh attach secret for ``domid`` (replacing any older one)."""
        s = secrets.token_bytes(SECRET_SIZE)
        self._secrets[domid] = s
        return s

    def check_secret(self, domid: int, secret: bytes) -> bool:
        """Whether ``secret`` is ``domid``'s attach secret (constant-time compare)."""
        want = self._secrets.get(domid)
        return want is not None and hmac.compare_digest(bytes(secret), want)

    def forget(self, domid: int) -> None:
        """``domid`` is gone, or attached: its secret no longer opens anything."""
        self._secrets.pop(domid, None)
