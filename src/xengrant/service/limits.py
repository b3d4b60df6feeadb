"""What one domain, one uid, one connection may take of the service.

Every limit is finite by default and set by the service's operator
(``xengrant hypervisor --max-pages ...``); a domain asks for less, never for
more:

- ``max_pages``, ``max_grant_frames``, ``max_maptrack_frames``: each domain's
  default and cap.  A CREATE asking for more is refused with EINVAL, as
  ``grant_table_init`` refuses ``max_grant_frames > opt_max_grant_frames`` or
  ``max_maptrack_frames > opt_max_maptrack_frames`` (xen/common/grant_table.c).
- xenstore: nodes and watches per unprivileged domain (xenstored's
  ``quota-nb-entry-per-domain=1000``, ``quota-nb-watch-per-domain=128``,
  tools/xenstored/xenstored_core.c in 4.17) and in all.
- connections per uid and in all (each costs a thread and descriptors).
- output: a connection with more than ``out_high`` bytes of replies queued
  (it stopped reading) is throttled -- its requests are not read -- until
  it takes them below half that; ``out_max`` (async events piling up on
  top) drops it.
- preemption: a batch is run ``preempt_ops`` ops at a time and a dying
  domain's mappings and memory are released ``preempt_teardown`` at a time,
  the service lock given up in between, as Xen's preemptible hypercalls
  (``hypercall_preempt_check`` and a continuation in ``do_grant_table_op``)
  and ``domain_relinquish_resources`` (``-ERESTART``) do.
- logs about one connection: ``log_burst`` lines per ``log_interval``
  seconds, then a count of those suppressed (Xen's printk ratelimit: 10
  lines per 5 s, xen/drivers/char/console.c).
"""

from __future__ import annotations

import errno
import resource
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ..emu.grant_table import DEFAULT_MAX_GRANT_FRAMES
from ..emu.maptrack import DEFAULT_MAX_MAPTRACK_FRAMES
from ..errors import HypercallError
from .xenstore import QUOTA_ENTRIES, QUOTA_WATCHES

#: descriptors a domain's connection holds in the service, measured
#: (test_a_connection_holds_what_fds_per_conn_budgets): its socket; the
#: service's end of its memory socket (service/backing.py); its ring page's
#: mapping (the mmap's own dup of the memfd) and the two eventfds; the mapping
#: of its generation page.  What is made only to be sent (the client's end of
#: the memory socket, the ring's memfd) is closed once sent.  Its memory files
#: come on top, budgeted apart (an allocation that finds no descriptor fails
#: as ENOMEM).
FDS_PER_CONN = 6


def default_max_connections() -> int:
    """Connections in all by default: what the descriptor limit leaves room for
    (``RLIMIT_NOFILE``, 32 kept for the service itself), at most 1024."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:  # pragma: no cover - unusual
        soft = 1 << 20
    return max(8, min(1024, (soft - 32) // FDS_PER_CONN))


@dataclass
class Limits:
    """The operator's limits (see the module docstring).

    Attributes:
        max_pages: frames of memory a domain may hold (None: ``nr_frames // 4``,
            set by :meth:`resolve`).
        max_grant_frames: grant-table frames per domain (Xen's default 64).
        max_maptrack_frames: maptrack frames per domain (Xen's default 1024).
        xs_entries: xenstore nodes an unprivileged domain may own.
        xs_watches: xenstore watches an unprivileged domain may set.
        xs_nodes_total: nodes in all (unprivileged creations stop there).
        xs_watches_total: watches in all.
        conns_total: connections in all (None: :func:`default_max_connections`).
        conns_per_uid: connections of one uid (None: three quarters of ``conns_total``).
        out_high: queued reply bytes that throttle a connection.
        out_max: queued bytes that drop it.
        preempt_ops: batch ops run between two chances for others to take the lock.
        preempt_teardown: mappings or frames released between two such chances.
        log_burst, log_interval: lines about one connection per interval.
    """

    max_pages: int | None = None
    max_grant_frames: int = DEFAULT_MAX_GRANT_FRAMES
    max_maptrack_frames: int = DEFAULT_MAX_MAPTRACK_FRAMES
    xs_entries: int = QUOTA_ENTRIES
    xs_watches: int = QUOTA_WATCHES
    xs_nodes_total: int = 100_000
    xs_watches_total: int = 10_000
    conns_total: int | None = None
    conns_per_uid: int | None = None
    out_high: int = 2 << 20
    out_max: int = 8 << 20
    preempt_ops: int = 1024
    preempt_teardown: int = 256
    log_burst: int = 10
    log_interval: float = 5.0

    def resolve(self, nr_frames: int) -> Limits:
        """Fill in the defaults that depend on the machine.

        Raises:
            ValueError: a limit below what any domain needs.
        """
        if self.max_pages is None:
            self.max_pages = max(nr_frames // 4, 64)
        if self.conns_total is None:
            self.conns_total = default_max_connections()
        if self.conns_per_uid is None:
            self.conns_per_uid = max(1, self.conns_total * 3 // 4)
        for name in ("max_pages", "max_grant_frames", "conns_total", "conns_per_uid",
                     "out_high", "preempt_ops", "preempt_teardown"):
            if getattr(self, name) < 1:
                raise ValueError(f"limit {name} must be at least 1")
        self.out_max = max(self.out_max, self.out_high * 2)
        return self

    def domain(
        self, max_pages: int, max_grant_frames: int, max_maptrack_frames: int
    ) -> tuple[int, int, int]:
        """A new domain's limits: -1 takes the operator's value, more is refused.

        Returns:
            ``(max_pages, max_grant_frames, max_maptrack_frames)``.

        Raises:
            HypercallError: EINVAL, over a cap (``grant_table_init``).
        """
        assert self.max_pages is not None
        asked = (max_pages, max_grant_frames, max_maptrack_frames)
        caps = (self.max_pages, self.max_grant_frames, self.max_maptrack_frames)
        names = ("max_pages", "max_grant_frames", "max_maptrack_frames")
        out = []
        for want, cap, name in zip(asked, caps, names):
            if want > cap:
                raise HypercallError(
                    "createdomain", errno.EINVAL, f"{name} {want} is over the service's {cap}"
                )
            out.append(cap if want == -1 else want)
        return out[0], out[1], out[2]


class RateLimitedLog:
    """A log that says at most ``burst`` lines per ``interval`` seconds about one key.

    Lines over the budget are counted, and the count is said with the first
    line of the next interval (as Xen's ``printk_ratelimit``).

    Args:
        log: where lines go.
        burst: lines per interval per key.
        interval: seconds.
        clock: the time source (tests pass their own).
    """

    def __init__(
        self,
        log: Callable[[str], None],
        burst: int = 10,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.burst = burst
        self.interval = interval
        self.clock = clock
        #: key -> (start of its interval, lines said in it, lines suppressed)
        self._keys: dict[Hashable, tuple[float, int, int]] = {}
        #: lines suppressed in all
        self.suppressed = 0

    def __call__(self, key: Hashable, text: str) -> bool:
        """Log ``text`` about ``key`` unless over budget; True if it was said."""
        now = self.clock()
        start, said, quiet = self._keys.get(key, (now, 0, 0))
        if now - start >= self.interval:
            if quiet:
                self.log(f"({quiet} more lines about {key} suppressed)")
            start, said, quiet = now, 0, 0
        if said >= self.burst:
            self._keys[key] = (start, said, quiet + 1)
            self.suppressed += 1
            return False
        self._keys[key] = (start, said + 1, quiet)
        self.log(text)
        return True

    def forget(self, key: Hashable) -> None:
        """``key`` is gone (its connection closed): say what was suppressed, drop it."""
        entry = self._keys.pop(key, None)
        if entry is not None and entry[2]:
            self.log(f"({entry[2]} more lines about {key} suppressed)")
