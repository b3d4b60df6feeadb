"""The Linux backend's log: ``logging.getLogger("xengrant.linux")``.

What the drivers report goes here as the emulator's reasons go to
``xengrant.emu``: why a map or copy of another domain's grant failed (the
``GNTST_*`` status and Linux's errno) at DEBUG, as Xen's debug build prints
them with ``gdprintk``; errors of our own side (the device refused to release
what it handed out, no memory, gntalloc's limit) at WARNING.  Another domain
decides whether its grants map, so the lines it can cause are rate-limited per
kind, as Xen's ``printk_ratelimit``: at most :data:`BURST` in :data:`INTERVAL`
seconds, then one line saying how many were left out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable

logger = logging.getLogger("xengrant.linux")

#: lines per kind and interval
BURST = 10
#: seconds
INTERVAL = 5.0


class RateLimit:
    """Say at most ``burst`` lines per ``interval`` about one key; count the rest
    and say the count with the first line of the next interval.

    Args:
        burst: lines per interval per key.
        interval: seconds.
        clock: the time source (tests pass their own).
    """

    def __init__(self, burst: int = BURST, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.interval, self.clock = burst, interval, clock
        self._lock = threading.Lock()
        #: key -> (start of its interval, lines said, lines left out)
        self._keys: dict[Hashable, tuple[float, int, int]] = {}
        #: lines left out in all
        self.suppressed = 0

    def __call__(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` is over its budget.

        Returns:
            True if the line was said (or would be, at a level the logger drops).
        """
        if not logger.isEnabledFor(level):
            return True  # nothing to say: nothing to count either
        now = self.clock()
        with self._lock:
            start, said, left_out = self._keys.get(key, (now, 0, 0))
            if now - start >= self.interval:
                start, said = now, 0
            if said >= self.burst:
                self._keys[key] = (start, said, left_out + 1)
                self.suppressed += 1
                return False
            self._keys[key] = (start, said + 1, 0)
            if len(self._keys) > 4096:  # bounded: keys come from other domains' values
                self._keys.clear()
        if left_out:
            msg += " (%d similar lines left out)"
            args = (*args, left_out)
        logger.log(level, msg, *args)
        return True


#: the backend's limiter (one per process, as printk_ratelimit's state)
ratelimited = RateLimit()
