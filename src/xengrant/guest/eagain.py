"""Retrying ops Xen answered ``GNTST_eagain`` (a granted frame paged out).

Linux ``gnttab_retry_eagain_gop`` (drivers/xen/grant-table.c), used by
``gnttab_map_refs``, ``gnttab_batch_map`` and ``gnttab_batch_copy``: re-issue
the one op, ``msleep(delay++)`` from 1 ms while it still answers eagain and
``delay < MAX_DELAY`` (256) -- 1 + 2 + ... + 255 ms, about 32.6 s in all --
then give up with ``GNTST_bad_page`` ("eagain grant").  Zephyr's
``gnttab_map_refs`` does the same with 10 ms steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..abi.grant_table import GNTST_bad_page, GNTST_eagain

#: Linux's MAX_DELAY: the retry stops once the next sleep would be 256 ms.
MAX_DELAY = 256


def retry_eagain_gop(issue: Callable[[], int], sleep: Callable[[float], None] | None = None) -> int:
    """Re-issue one op while it answers ``GNTST_eagain`` (``gnttab_retry_eagain_gop``).

    Args:
        issue: issues the op alone (count 1) and returns its status.
        sleep: how to wait (seconds); None for ``time.sleep``.

    Returns:
        The op's final status; ``GNTST_bad_page`` if it was still eagain
        after the last wait (the caller stores it in the op, as Linux does).
    """
    wait = time.sleep if sleep is None else sleep
    delay = 1
    while True:
        status = issue()
        if status != GNTST_eagain:
            return status
        wait(delay / 1000)
        delay += 1
        if delay >= MAX_DELAY:
            return GNTST_bad_page


__all__ = ["MAX_DELAY", "retry_eagain_gop"]
